"""Workflows end to end: real worker subprocesses, real Redis, real PostgreSQL, driven through the client."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from redis.asyncio import Redis

from agentworker.client import JobFailed
from agentworker.db import Database
from tests.conftest import new_tenant
from tests.workflow_helpers import (
    collect_events,
    counts,
    probe,
    workflow_client,
    workflow_events,
    workflow_worker_env,
)

pytestmark = pytest.mark.slow

SIX_STEPS: dict[str, Any] = {
    "id": "order-flow",
    "steps": [
        {"id": "start", "kind": "transform",
         "template": {"order": "{{ input.order_id }}", "items": "{{ input.items }}"}},
        probe("a_fetch", ["start"], seen="{{ steps.start.output.order }}"),
        {"id": "a_enrich", "kind": "transform", "depends_on": ["a_fetch"],
         "template": {"enriched": "{{ steps.a_fetch.output.name }}-ok", "order": "{{ steps.start.output.order }}"}},
        probe("b_fetch", ["start"]),
        {"id": "join", "kind": "transform", "depends_on": ["a_enrich", "b_fetch"],
         "merge": ["{{ steps.a_enrich.output }}", {"b": "{{ steps.b_fetch.output.name }}"}]},
        {"id": "finish", "kind": "tool", "tool": "probe_effect", "depends_on": ["join"],
         "args": {"name": "finish", "summary": "{{ steps.join.output }}"}},
    ],
    "output": {"joined": "{{ steps.join.output }}", "finished": "{{ steps.finish.output.name }}"},
}
STEP_IDS = [s["id"] for s in SIX_STEPS["steps"]]
DEPENDS = {s["id"]: s.get("depends_on", []) for s in SIX_STEPS["steps"]}


@pytest.fixture
async def serving(redis_url: str, quota_file: Path, database_url: str, database: Database,
                  spawn_worker: Any) -> AsyncIterator[Any]:
    worker = spawn_worker(quota_file, **workflow_worker_env(database_url))
    await worker.wait_serving()
    async with workflow_client(redis_url, quota_file, database) as client:
        yield client


async def test_six_steps_with_two_parallel_branches_run_once_in_order(serving: Any, redis: Redis) -> None:
    client = serving
    tenant = new_tenant("six")
    saved = await client.save_workflow(tenant, SIX_STEPS)
    assert (saved.workflow_id, saved.version, saved.created) == ("order-flow", 1, True)
    job = await client.enqueue("execute_workflow", tenant_id=tenant, idempotency_key="order-1",
                               payload={"workflow_id": "order-flow", "trigger": "webhook",
                                        "input_data": {"order_id": "o-1", "items": [1, 2]}})
    result = await job.result(timeout=60)
    assert result["status"] == "completed"
    assert result["output"] == {"joined": {"enriched": "a_fetch-ok", "order": "o-1", "b": "b_fetch"},
                                "finished": "finish"}
    run_id = result["run_id"]

    run = await client.get_run(tenant, run_id)
    assert run is not None and run.status == "completed" and run.trigger == "webhook"
    assert run.input == {"order_id": "o-1", "items": [1, 2]} and run.attempts == 1
    assert run.finished_at is not None
    steps = {s.step_id: s for s in run.steps}
    assert sorted(steps) == sorted(STEP_IDS) and len(run.steps) == 6
    assert {s.status for s in run.steps} == {"completed"} and {s.attempt for s in run.steps} == {1}
    assert steps["a_fetch"].input == {"args": {"name": "a_fetch", "seen": "o-1"}}
    for step_id, deps in DEPENDS.items():
        for dep in deps:
            finished = steps[dep].finished_at
            assert finished is not None and steps[step_id].started_at >= finished, (step_id, dep)
    assert await counts(redis, tenant, ["a_fetch", "b_fetch", "finish"]) == {"a_fetch": 1, "b_fetch": 1, "finish": 1}

    events = workflow_events(await collect_events(client, tenant, lambda e: e.event == "workflow_run_completed"),
                             run_id)
    names = [e.event for e in events]
    assert names[0] == "workflow_run_started" and names[-1] == "workflow_run_completed"
    assert names.count("workflow_step_started") == 6 and names.count("workflow_step_completed") == 6
    assert "workflow_step_failed" not in names
    position = {(e.event, e.data["step_id"]): i for i, e in enumerate(events)}
    for step_id, deps in DEPENDS.items():
        assert position[("workflow_step_started", step_id)] < position[("workflow_step_completed", step_id)]
        for dep in deps:
            assert position[("workflow_step_completed", dep)] < position[("workflow_step_started", step_id)]
    completed = [e for e in events if e.event == "workflow_step_completed"]
    for event in completed:
        assert event.tenant_id == tenant and event.ts
        assert set(event.data) == {"workflow_id", "run_id", "step_id", "status", "output"}
        assert event.data["workflow_id"] == "order-flow" and event.data["status"] == "success"
        assert event.data["output"] == steps[event.data["step_id"]].output
    assert events[-1].data["status"] == "completed" and events[-1].data["output"] == result["output"]

    listed = await client.list_runs(tenant, workflow_id="order-flow")
    assert [r.run_id for r in listed] == [run_id]
    assert await client.list_runs(tenant, status="failed") == []


async def test_step_retries_and_timeouts_follow_the_policy(serving: Any, redis: Redis) -> None:
    client = serving
    tenant = new_tenant("retry")
    await client.save_workflow(tenant, {"id": "flaky", "steps": [
        {**probe("flaky", fail_until=3), "retry": {"max_attempts": 3, "backoff_seconds": 0.05}},
        {**probe("slow", ["flaky"], block_first=30), "timeout_seconds": 0.5,
         "retry": {"max_attempts": 2, "backoff_seconds": 0}},
    ]})
    job = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "flaky"})
    result = await job.result(timeout=60)
    assert result["status"] == "completed"
    run = await client.get_run(tenant, result["run_id"])
    assert run is not None
    attempts = [(s.step_id, s.attempt, s.status) for s in run.steps]
    assert attempts == [("flaky", 1, "failed"), ("flaky", 2, "failed"), ("flaky", 3, "completed"),
                        ("slow", 1, "failed"), ("slow", 2, "completed")]
    assert run.steps[0].error == {"error": "RuntimeError", "message": "flaky fails on execution 1"}
    assert run.steps[3].error["message"] == "step 'slow' timed out after 0.5s"
    events = workflow_events(await collect_events(client, tenant, lambda e: e.event == "workflow_run_completed"),
                             result["run_id"])
    failed = [(e.data["step_id"], e.data["attempt"], e.data["will_retry"]) for e in events
              if e.event == "workflow_step_failed"]
    assert failed == [("flaky", 1, True), ("flaky", 2, True), ("slow", 1, True)]
    assert await counts(redis, tenant, ["flaky", "slow"]) == {"flaky": 3, "slow": 2}


async def test_a_step_that_keeps_failing_fails_the_run_and_the_job(serving: Any, redis: Redis) -> None:
    client = serving
    tenant = new_tenant("fail")
    await client.save_workflow(tenant, {"id": "doomed", "steps": [
        probe("first"),
        {**probe("broken", ["first"], fail_until=99), "retry": {"max_attempts": 2, "backoff_seconds": 0}},
        probe("never", ["broken"]),
    ]})
    job = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "doomed"})
    with pytest.raises(JobFailed) as info:
        await job.result(timeout=60)
    assert info.value.error == "WorkflowRunFailed"
    assert "failed at step 'broken': broken fails on execution 2" in info.value.message
    (run,) = await client.list_runs(tenant)
    assert run.status == "failed" and run.error["step_id"] == "broken"
    events = await collect_events(client, tenant, lambda e: e.event == "workflow_run_failed")
    assert events[-1].data["error"]["step_id"] == "broken"
    assert await counts(redis, tenant, ["first", "broken", "never"]) == {"first": 1, "broken": 2, "never": 0}


async def test_agent_steps_run_the_tool_agent_with_the_listed_tools(serving: Any) -> None:
    client = serving
    tenant = new_tenant("agent")
    await client.save_workflow(tenant, {"id": "agentic", "steps": [
        {"id": "think", "kind": "agent", "tools": ["echo", "notify"],
         "instructions": 'Plan {{ input.goal }}\ncall echo {"goal": "{{ input.goal }}"}\n'
                         'call notify {"text": "planned"}'},
        {"id": "other", "kind": "agent", "depends_on": ["think"], "tools": ["echo"],
         "instructions": 'call notify {"text": "not listed, so never called"}'},
        {"id": "broken", "kind": "agent", "depends_on": ["other"], "tools": ["send_fax"], "instructions": "x",
         "retry": {"max_attempts": 3}}]})
    job = await client.enqueue("execute_workflow", tenant_id=tenant,
                               payload={"workflow_id": "agentic", "input_data": {"goal": "a trip"}})
    with pytest.raises(JobFailed) as info:
        await job.result(timeout=60)
    assert "failed at step 'broken': step 'broken': tool(s) 'send_fax' not available to tenant" in info.value.message
    (run,) = await client.list_runs(tenant)
    run = await client.get_run(tenant, run.run_id)
    assert run is not None
    outputs = {s.step_id: s.output for s in run.steps}
    think = outputs["think"]
    assert think["model"] == "offline" and [c["tool"] for c in think["tool_calls"]] == ["echo", "notify"]
    assert {c["status"] for c in think["tool_calls"]} == {"success"}
    assert think["text"].startswith('[offline] echo returned {\n  "goal": "a trip"\n}')
    assert outputs["other"]["tool_calls"] == [], "a tool the step does not list is not offered to its agent"
    assert [s.attempt for s in run.steps if s.step_id == "broken"] == [1], "not retried: retrying cannot help"
    events = await collect_events(client, tenant, lambda e: e.event == "workflow_run_failed")
    assert [e.data["message"] for e in events if e.event == "workflow_notification"] == [{"text": "planned"}]
    assert any(e.event == "agent_tool_call" and e.data["step_id"] == "think" for e in events)


async def test_http_llm_and_builtin_tool_steps(serving: Any, http_peer: Any) -> None:
    client = serving
    tenant = new_tenant("kinds")
    base = http_peer.base
    await client.save_workflow(tenant, {"id": "kinds", "steps": [
        {"id": "lookup", "kind": "http", "url": base + "/items/{{ input.item }}"},
        {"id": "post", "kind": "http", "method": "POST", "url": base + "/orders", "depends_on": ["lookup"],
         "headers": {"X-Tenant": tenant}, "body": {"item": "{{ steps.lookup.output.body }}"}},
        {"id": "summary", "kind": "llm", "prompt": "Summarize order {{ steps.post.output.body.order }}",
         "depends_on": ["post"]},
        {"id": "tell", "kind": "tool", "tool": "notify", "depends_on": ["summary"],
         "args": {"text": "{{ steps.summary.output.text }}"}},
    ]})
    job = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "kinds",
                                                                              "input_data": {"item": "42"}})
    result = await job.result(timeout=60)
    assert result["status"] == "completed", result
    run = await client.get_run(tenant, result["run_id"])
    assert run is not None
    out = {s.step_id: s.output for s in run.steps}
    assert out["lookup"]["status"] == 200 and out["lookup"]["body"] == {"id": "42", "name": "widget"}
    assert out["post"]["body"]["order"] == "o-1"
    assert out["summary"] == {"text": "[offline] Summarize order o-1", "model": "offline"}
    assert out["tell"]["notified"] is True
    received = http_peer.received
    assert [r["method"] for r in received] == ["GET", "POST"]
    assert received[0]["idempotency_key"] is None, "GET is not a side effect"
    assert received[1]["idempotency_key"] and received[1]["tenant"] == tenant
    assert received[1]["json"] == {"item": {"id": "42", "name": "widget"}}
    events = await collect_events(client, tenant, lambda e: e.event == "workflow_notification")
    assert events[-1].data["message"] == {"text": "[offline] Summarize order o-1"}


class _HttpPeer:
    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        self.base = ""


@pytest.fixture
async def http_peer() -> AsyncIterator[_HttpPeer]:
    """A small local HTTP API for http steps to call."""
    peer = _HttpPeer()

    async def item(request: web.Request) -> web.Response:
        peer.received.append({"method": "GET", "idempotency_key": request.headers.get("Idempotency-Key")})
        return web.json_response({"id": request.match_info["item"], "name": "widget"})

    async def order(request: web.Request) -> web.Response:
        peer.received.append({"method": "POST", "idempotency_key": request.headers.get("Idempotency-Key"),
                              "tenant": request.headers.get("X-Tenant"), "json": await request.json()})
        return web.json_response({"order": "o-1"}, status=201)

    app = web.Application()
    app.router.add_get("/items/{item}", item)
    app.router.add_post("/orders", order)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    peer.base = f"http://127.0.0.1:{port}"
    try:
        yield peer
    finally:
        await runner.cleanup()
