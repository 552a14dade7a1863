"""Tenant-scoped tools (email, calendar, CRM) served to agents over MCP, and the registry that finds them.

Importing the package registers the built-in tools (no LangChain, no MCP: those load with the agents).
"""

from agentworker.tools import builtin, calendar, crm, email  # noqa: F401 - register the built-ins
from agentworker.tools.registry import (
    TOOLS,
    Tool,
    ToolContext,
    ToolError,
    ToolInputError,
    ToolNotConfigured,
    ToolRegistry,
    ToolTimeout,
    UnknownTool,
    tool,
)

__all__ = ["TOOLS", "Tool", "ToolContext", "ToolError", "ToolInputError", "ToolNotConfigured", "ToolRegistry",
           "ToolTimeout", "UnknownTool", "tool"]
