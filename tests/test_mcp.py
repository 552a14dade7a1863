"""Our tools over MCP and tenants' external MCP servers (a real FastMCP server over streamable HTTP on
loopback): each tenant's agents load their own tools, servers and credentials, one session per job."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import structlog
from mcp.server.fastmcp import Context

from agentworker.db import Database
from agentworker.db import integrations as integration_rows
from agentworker.tools import ToolContext, tool
from agentworker.tools.scope import TenantScope
from agentworker.tools.toolset import open_toolset
from tests.conftest import free_port

TENANT_A, TENANT_B = "mcpscope-a", "mcpscope-b"


@tool(side_effects=False, tenants=[TENANT_A], description="A tool only tenant A has")
async def only_for_a(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    return {"tenant": ctx.tenant_id, "args": args}


class ExternalServer:
    def __init__(self) -> None:
        self.sessions: set[int] = set()
        self.authorization: list[str | None] = []
        self.url = ""


@pytest.fixture
async def external_mcp(loopback_peers_allowed: None) -> AsyncIterator[ExternalServer]:
    import uvicorn
    from mcp.server.fastmcp import FastMCP

    state = ExternalServer()
    port = free_port()
    server = FastMCP("extras", host="127.0.0.1", port=port)

    @server.tool()
    async def weather(city: str, ctx: Context) -> str:  # type: ignore[type-arg]
        """The weather in a city."""
        state.sessions.add(id(ctx.session))
        request = ctx.request_context.request
        state.authorization.append(request.headers.get("authorization") if request is not None else None)
        return f"sunny in {city}"

    web = uvicorn.Server(uvicorn.Config(server.streamable_http_app(), host="127.0.0.1", port=port,
                                        log_level="warning", lifespan="on", ws="none"))
    task = asyncio.create_task(web.serve())
    for _ in range(500):
        if web.started:
            break
        await asyncio.sleep(0.01)
    state.url = f"http://127.0.0.1:{port}/mcp"
    try:
        yield state
    finally:
        web.should_exit = True
        await asyncio.wait_for(task, 10)


def scope(database: Database, tenant: str, events: list[tuple[str, dict[str, Any]]]) -> TenantScope:
    async def emit(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))

    return TenantScope(tenant_id=tenant, database=database, emit=emit, log=structlog.get_logger("test"))


def text_of(content: Any) -> str:
    return "".join(part["text"] for part in content) if isinstance(content, list) else str(content)


async def test_each_tenant_sees_only_its_tools_servers_and_credentials(database: Database,
                                                                       external_mcp: ExternalServer) -> None:
    async with database.tenant(TENANT_A) as tx:
        await integration_rows.save_integration(tx, "mcp", "extras", {
            "url": external_mcp.url, "headers": {"Authorization": "Bearer ext-secret-a"},
            "approval_required": ["weather"]})
    async with database.tenant(TENANT_B) as tx:
        await integration_rows.save_integration(tx, "mcp", "broken", {"url": f"http://127.0.0.1:{free_port()}/mcp",
                                                                      "timeout": 2})
    events: list[tuple[str, dict[str, Any]]] = []
    async with open_toolset(scope(database, TENANT_A, events), run_id="agent:r1", step_id="tools") as a, \
            open_toolset(scope(database, TENANT_B, events), run_id="agent:r1", step_id="tools") as b:
        assert {"extras_weather", "only_for_a", "send_email", "crm_find_contacts"} <= set(a.names)
        assert "extras_weather" not in b.names and "only_for_a" not in b.names and "send_email" in b.names
        assert a.servers == ("extras",) and b.servers == ()
        assert {"send_email", "extras_weather"} <= a.approval_required and "extras_weather" not in b.approval_required
        tools = {t.name: t for t in a.tools}
        assert text_of(await tools["extras_weather"].ainvoke({"city": "Paris"})) == "sunny in Paris"
        assert text_of(await tools["extras_weather"].ainvoke({"city": "Oslo"})) == "sunny in Oslo"
        mine = json.loads(text_of(await tools["only_for_a"].ainvoke({"x": 1})))
        assert mine == {"tenant": TENANT_A, "args": {"x": 1}}
        schema = tools["send_email"].args_schema
        assert isinstance(schema, dict) and schema["required"] == ["to", "subject", "body"]
        assert tools["send_email"].metadata is not None and tools["send_email"].metadata["destructiveHint"] is True
    assert len(external_mcp.sessions) == 1, "one session for the whole job, not one per call"
    assert external_mcp.authorization == ["Bearer ext-secret-a"] * 2, "tenant A's credentials, on every call"
    assert events == [("agent_mcp_server_unavailable", {"server": "broken", "error": "ConnectError"})], \
        "tenant B's unreachable server is reported and skipped"


async def test_read_only_and_named_toolsets(database: Database) -> None:
    events: list[tuple[str, dict[str, Any]]] = []
    async with open_toolset(scope(database, TENANT_B, events), run_id="agent:r1", step_id="tools",
                            read_only=True) as chat_tools:
        assert "crm_find_contacts" in chat_tools.names and "calendar_list_events" in chat_tools.names
        assert not {"send_email", "crm_create_contact", "calendar_create_event"} & set(chat_tools.names)
    async with open_toolset(scope(database, TENANT_B, events), run_id="agent:r1", step_id="tools",
                            names=["echo"]) as named:
        assert named.names == ["echo"]
    from agentworker.tools import UnknownTool

    with pytest.raises(UnknownTool, match="tool\\(s\\) 'only_for_a' not available to tenant 'mcpscope-b'"):
        async with open_toolset(scope(database, TENANT_B, events), run_id="agent:r1", step_id="tools",
                                names=["echo", "only_for_a"]):
            pass
