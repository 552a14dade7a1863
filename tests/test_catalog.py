"""Saving a schedule or a workflow that names a task, tool or workflow that does not exist is refused
when it is saved (agentworker.catalog), with every problem at once."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from redis.asyncio import Redis

from agentworker import catalog
from agentworker.client import AgentWorkerClient
from agentworker.db import Database
from agentworker.schedules import InvalidSchedule
from agentworker.workflows import InvalidWorkflow
from tests.conftest import BASIC_QUOTAS, make_client, new_tenant


@pytest.fixture
async def client(redis_url: str, write_quotas: Callable[..., Path],
                 database: Database) -> AsyncIterator[AgentWorkerClient]:
    async with make_client(redis_url, write_quotas(BASIC_QUOTAS)) as made:
        made._database = database
        yield made


def _tool_workflow(*tools: str) -> dict[str, object]:
    return {"id": "wf", "steps": [{"id": f"s{i}", "kind": "tool", "tool": name} for i, name in enumerate(tools)]}


async def test_before_any_worker_published_nothing_is_refused(client: AgentWorkerClient) -> None:
    tenant = new_tenant("cat")
    await client.save_workflow(tenant, _tool_workflow("anything_at_all"))
    await client.save_schedule(tenant, {"id": "s", "cron": "0 * * * *", "task": "whatever"})


async def test_unknown_tasks_tools_and_workflows_are_refused_at_save(client: AgentWorkerClient, redis: Redis) -> None:
    tenant = new_tenant("cat")
    await catalog.publish(redis, ["echo", "execute_workflow"],
                          [("send_email", None), ("crm_find_contacts", None), ("vip_tool", frozenset({"vip"}))])
    with pytest.raises(InvalidWorkflow) as refused:
        await client.save_workflow(tenant, _tool_workflow("send_email", "no_such_tool", "vip_tool"))
    assert refused.value.errors == [
        f"steps[1].tool: no tool named 'no_such_tool' is available to tenant {tenant!r} "
        "(available: crm_find_contacts, send_email)",
        f"steps[2].tool: no tool named 'vip_tool' is available to tenant {tenant!r} "
        "(available: crm_find_contacts, send_email)",
    ]
    await client.save_workflow("vip", _tool_workflow("vip_tool"))  # restricted to it: fine
    assert await client.get_workflow(tenant, "wf") is None  # nothing was saved

    with pytest.raises(InvalidSchedule, match=r"task: no worker serves a task named 'echoo' \(served: echo, "):
        await client.save_schedule(tenant, {"id": "s", "cron": "0 * * * *", "task": "echoo"})
    with pytest.raises(InvalidSchedule) as refused_schedule:
        await client.save_schedule(tenant, {"id": "s", "cron": "0 * * * *", "workflow_id": "ghost"})
    assert refused_schedule.value.errors == [
        f"workflow_id: tenant {tenant!r} has no workflow 'ghost' (save it first)"]
    assert await client.get_schedule(tenant, "s") is None

    await client.save_workflow(tenant, _tool_workflow("send_email"))
    await client.save_schedule(tenant, {"id": "s", "cron": "0 * * * *", "workflow_id": "wf"})
    await client.save_schedule(tenant, {"id": "t", "cron": "0 * * * *", "task": "echo"})
