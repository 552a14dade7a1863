"""The tools one agent run may use, loaded over MCP: ours (in memory) and the tenant's external servers.

:func:`open_toolset` is entered once per job: it builds our MCP server for the job's tenant, opens one
in-memory client session to it and one streamable-HTTP session per external MCP server the tenant has
configured, loads all their tools through ``langchain-mcp-adapters``, and closes every session when the
job is done. Tenant A's toolset is built from tenant A's registry view and tenant A's settings rows
(row-level security) only, so it never holds tenant B's tools, servers or credentials.

Our side-effecting tools run through the side-effect ledger, one effect per (tenant, run, step, tool and
arguments): the same call repeated in one run — by a retried job, or by the model itself — runs once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentworker import egress
from agentworker.db import integrations as integration_rows
from agentworker.db.database import Database
from agentworker.integrations import McpServerSettings
from agentworker.tools.mcp_server import SERVER_NAME, ToolCaller, build_mcp_server
from agentworker.tools.registry import TOOLS, Tool, UnknownTool
from agentworker.tools.scope import TenantScope

if TYPE_CHECKING:
    from langchain_core.tools import BaseTool



@dataclass(frozen=True, slots=True)
class AgentToolset:
    tools: list[BaseTool]
    #: names (as the model sees them) of the tools that wait for a person's approval
    approval_required: frozenset[str]
    #: external MCP servers whose tools were loaded
    servers: tuple[str, ...]

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tools]


def arguments_digest(args: dict[str, Any]) -> str:
    canonical = json.dumps(args, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:24]


def ledger_caller(scope: TenantScope, run_id: str, step_id: str) -> ToolCaller:
    """Run a tool for ``scope`` under ``run_id`` and ``step_id``: side-effecting ones once, through the
    ledger."""
    ledger = scope.ledger

    async def call(found: Tool, args: dict[str, Any]) -> Any:
        call_key = f"{found.name}:{arguments_digest(args)}"
        if not found.side_effects:
            return await found.func(scope.tool_context(run_id, step_id, call_key=call_key), args)

        async def effect(key: str) -> Any:
            return await found.func(scope.tool_context(run_id, step_id, idempotency_key=key), args)

        return await ledger.run_once(scope.tenant_id, run_id, step_id, call_key, effect)

    return call


async def external_servers(database: Database, tenant_id: str) -> list[tuple[str, McpServerSettings]]:
    async with database.tenant(tenant_id) as tx:
        rows = await integration_rows.list_integrations(tx, "mcp")
    return [(row.name, McpServerSettings.model_validate(row.config)) for row in rows]


@asynccontextmanager
async def open_toolset(scope: TenantScope, *, run_id: str, step_id: str, names: Sequence[str] | None = None,
                       read_only: bool = False, external: bool = True) -> AsyncIterator[AgentToolset]:
    """Open the MCP sessions of one job and yield the tools loaded from them; our side-effecting tools
    are recorded in the ledger under ``run_id`` and ``step_id``.

    ``names``: only these tools (ours by name, an external server's as ``SERVER_TOOL``); an unknown name
    raises :class:`UnknownTool`. ``read_only``: only our tools without side effects, no external server.
    """
    wanted = None if names is None else set(names)
    ours = [t for t in TOOLS.available(scope.tenant_id)
            if (not read_only or not t.side_effects) and (wanted is None or t.name in wanted)]
    # The MCP sessions run in anyio task groups, which wrap whatever is raised inside them in exception
    # groups: errors are caught in here and raised again once every session is closed, unwrapped.
    error: Exception | None = None
    async with AsyncExitStack() as stack:
        try:
            toolset = await _load(stack, scope, ledger_caller(scope, run_id, step_id), ours, wanted,
                                  external=external and not read_only)
        except Exception as exc:
            error = exc
        else:
            try:
                yield toolset
            except Exception as exc:
                error = exc
    if error is not None:
        raise error


async def _load(stack: AsyncExitStack, scope: TenantScope, caller: ToolCaller, ours: list[Tool],
                wanted: set[str] | None, *, external: bool) -> AgentToolset:
    from langchain_mcp_adapters.tools import load_mcp_tools
    from mcp.shared.memory import create_connected_server_and_client_session

    session = await stack.enter_async_context(
        create_connected_server_and_client_session(build_mcp_server(ours, caller)))
    tools: list[BaseTool] = list(await load_mcp_tools(session, server_name=SERVER_NAME))
    approval = {t.name for t in ours if t.approval}
    servers: list[str] = []
    if external:
        for server_name, settings in await external_servers(scope.database, scope.tenant_id):
            loaded = await _load_external(stack, scope, server_name, settings)
            if loaded is None:
                continue
            servers.append(server_name)
            tools += [t for t in loaded if wanted is None or t.name in wanted]
            approval |= {f"{server_name}_{name}" for name in settings.approval_required}
    if wanted is not None:
        missing = sorted(wanted - {t.name for t in tools})
        if missing:
            available = ", ".join(sorted(t.name for t in TOOLS.available(scope.tenant_id))) or "none"
            raise UnknownTool(f"tool(s) {', '.join(map(repr, missing))} not available to tenant "
                              f"{scope.tenant_id!r} (available: {available})")
    return AgentToolset(tools=tools, approval_required=frozenset(approval), servers=tuple(servers))


async def _load_external(stack: AsyncExitStack, scope: TenantScope, name: str,
                         settings: McpServerSettings) -> list[BaseTool] | None:
    """One session to a tenant's external server and its tools (prefixed ``NAME_``); None if unreachable."""
    from langchain_mcp_adapters.sessions import create_session
    from langchain_mcp_adapters.tools import load_mcp_tools

    connection: Any = {
        "transport": "streamable_http", "url": settings.url, "timeout": settings.timeout,
        "sse_read_timeout": settings.timeout,
        "headers": {k: v.get_secret_value() for k, v in settings.headers.items()},
        # The tenant's server is reached through the egress guard (every connection, redirects too).
        "httpx_client_factory": egress.mcp_client_factory(),
    }
    inner = AsyncExitStack()
    try:
        session = await inner.enter_async_context(create_session(connection))
        await session.initialize()
        tools = await load_mcp_tools(session, server_name=name, tool_name_prefix=True)
    except BaseException as first:
        # A failure inside the session's task group reaches us as a cancellation; leaving the session
        # turns it into the real error. A cancellation from outside (the job's timeout) passes on.
        error: BaseException = first
        try:
            await inner.aclose()
        except Exception as exc:
            error = exc
        if not isinstance(error, Exception):
            raise
        # A tenant's broken server must not stop its agents; the reason goes to the log and the events.
        reason = _reason(error)
        scope.log.warning("external MCP server unavailable", server=name, error=reason)
        await scope.emit("agent_mcp_server_unavailable", {"server": name, "error": reason})
        return None
    stack.push_async_exit(inner)
    return list(tools)


def _reason(error: BaseException) -> str:
    """The innermost error's class name (task groups wrap them in exception groups), or the egress
    guard's sentence when it refused the server's address."""
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    cause: BaseException | None = error
    for _ in range(10):  # the client may wrap it (bounded: a chain can loop)
        if cause is None or isinstance(cause, egress.EgressRefused):
            break
        cause = cause.__cause__ or cause.__context__
    return str(cause) if isinstance(cause, egress.EgressRefused) else type(error).__name__
