"""Tenant-scoped tools (email, calendar, CRM) served to agents over MCP, and the registry that finds them."""

from agentworker.tools.registry import TOOLS, Tool, ToolContext, ToolRegistry, UnknownTool, tool

__all__ = ["TOOLS", "Tool", "ToolContext", "ToolRegistry", "UnknownTool", "tool"]
