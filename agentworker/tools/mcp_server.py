"""Our tools as an MCP server, built per job for one tenant (the ``mcp`` SDK's low-level ``Server``).

Agents reach it through ``langchain-mcp-adapters`` over the SDK's in-memory transport: one server and
one client session per job, in the worker's own event loop. No subprocess per call or per job, and no
port to open: the tools need the job's tenant, database pool and ledger, which live in this process, and
a server built for one tenant lists that tenant's tools and nothing else.

The low-level server (rather than ``FastMCP``'s decorators) lets each tool publish the JSON schema of
its pydantic input model as is; arguments are validated by the tool itself, with one-sentence errors.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from agentworker.tools.registry import Tool, UnknownTool

if TYPE_CHECKING:
    from mcp.server.lowlevel import Server

SERVER_NAME = "agentworker"

#: runs one tool call (validation, ledger, timeout are the caller's and the tool's business)
ToolCaller = Callable[[Tool, dict[str, Any]], Awaitable[Any]]


def build_mcp_server(tools: Sequence[Tool], call: ToolCaller, *, name: str = SERVER_NAME) -> Server[Any, Any]:
    """An MCP server listing ``tools`` and running each call through ``call``."""
    from mcp import types
    from mcp.server.lowlevel import Server

    server: Server[Any, Any] = Server(name)
    by_name = {t.name: t for t in tools}

    @server.list_tools()  # type: ignore[no-untyped-call, untyped-decorator]
    async def list_tools() -> list[types.Tool]:
        return [types.Tool(name=t.name, description=t.description, inputSchema=t.input_schema(),
                           annotations=types.ToolAnnotations(readOnlyHint=not t.side_effects,
                                                             destructiveHint=t.side_effects,
                                                             idempotentHint=True, openWorldHint=False))
                for t in tools]

    @server.call_tool(validate_input=False)  # type: ignore[untyped-decorator]
    async def call_tool(tool_name: str, arguments: dict[str, Any] | None) -> dict[str, Any]:
        found = by_name.get(tool_name)
        if found is None:
            raise UnknownTool(f"tool {tool_name!r} is not served here (available: {', '.join(by_name) or 'none'})")
        result = await call(found, dict(arguments or {}))
        # Structured content must be an object: other JSON values are wrapped.
        return result if isinstance(result, dict) else {"result": result}

    return server
