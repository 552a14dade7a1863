"""The console's HTTP side: the status token, the read endpoints under /status/..., the job actions and
approval decisions under /admin/..., the console's files and their headers, and ``agentworker status
--watch``. The real app on the real SupervisorBackend, real Redis and PostgreSQL (no worker runs here:
jobs stay queued; the browser tests in test_console_browser.py drive a real ``agentworker run``)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from redis.asyncio import Redis

from agentworker import job_control
from agentworker.config import load_config
from agentworker.db import Database
from agentworker.db import approvals as approval_rows
from agentworker.db import runs as run_rows
from agentworker.events import EventPublisher
from agentworker.health.app import create_app
from agentworker.health.openapi import openapi_document
from agentworker.submit import JobSubmitter
from tests.conftest import ROOT, new_tenant, worker_env
from tests.supervisor_helpers import in_process_backend
from tests.test_openapi import check_shape
from tests.workflow_helpers import workflow_client

ADMIN, READER = "console-admin-token", "console-status-token"
QUOTAS: dict[str, Any] = {"default_pool": "standard",
                          "pools": {"standard": {"shards": 2, "job_timeout": 30}}, "tenants": {}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def quotas(write_quotas: Callable[[dict[str, Any]], Path]) -> Path:
    return write_quotas(QUOTAS)


@pytest.fixture
async def served(redis: Redis, quotas: Path, tmp_path: Path,
                 database_url: str) -> AsyncIterator[TestClient[Any, Any]]:
    backend = in_process_backend(redis, quotas, tmp_path, database_url=database_url, admin_token=ADMIN,
                                 status_token=READER)
    async with TestClient(TestServer(create_app(backend))) as client:
        try:
            yield client
        finally:
            await backend.close()


async def refused(response: Any, status: int) -> str:
    """The sentence of a JSON refusal answered ``status``."""
    assert response.status == status, await response.text()
    body = await response.json()
    assert isinstance(body["error"], str) and body["error"] and isinstance(body["errors"], list)
    return str(body["error"])


async def queued_job(redis: Redis, quotas: Path, tenant: str, key: str = "k1") -> str:
    submitter = JobSubmitter(redis, load_config(quotas))
    return (await submitter.submit("probe_sleep", tenant, {"seconds": 1}, idempotency_key=key)).job_id


# -- tokens ------------------------------------------------------------------------------------------------


async def test_with_a_status_token_reads_need_it_or_the_admin_token(served: TestClient[Any, Any]) -> None:
    tenant = new_tenant("tok")
    reads = ["/status", f"/status/jobs/{tenant}:echo:k", "/status/dead-letters",
             f"/status/tenants/{tenant}/runs", f"/status/tenants/{tenant}/failures",
             f"/status/tenants/{tenant}/schedules", f"/status/tenants/{tenant}/runs/{uuid.uuid4()}"]
    for path in reads:
        for headers in ({}, bearer("wrong"), {"Authorization": READER}):
            response = await served.get(path, headers=headers)
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"].startswith("Bearer")
        for token in (READER, ADMIN):
            response = await served.get(path, headers=bearer(token))
            assert response.status in (200, 404), (path, await response.text())
    # Probes, metrics and the console's shell stay open; the shell holds no data.
    for path in ("/health", "/metrics", "/ui", "/ui/static/console.js", "/ui/static/console.css"):
        assert (await served.get(path)).status == 200, path
    # The status token reads; it does not act.
    job = f"{tenant}:echo:k"
    assert (await served.post(f"/admin/jobs/{job}/cancel", headers=bearer(READER))).status == 401
    assert (await served.post("/admin/reload", headers=bearer(READER))).status == 401


async def test_without_a_status_token_status_is_open(redis: Redis, quotas: Path, tmp_path: Path,
                                                     database_url: str) -> None:
    backend = in_process_backend(redis, quotas, tmp_path, database_url=database_url)
    async with TestClient(TestServer(create_app(backend))) as client:
        try:
            assert (await client.get("/status")).status == 200
            assert (await client.get("/status/dead-letters")).status == 200
            # no admin token configured: every /admin/ path answers 404, the console's actions too
            assert (await client.post(f"/admin/jobs/{new_tenant()}:echo:k/cancel")).status == 404
        finally:
            await backend.close()


# -- the console's files -----------------------------------------------------------------------------------


async def test_the_console_is_served_with_a_strict_policy_and_no_inline_script(
        served: TestClient[Any, Any]) -> None:
    page = await served.get("/ui")
    assert page.status == 200 and page.content_type == "text/html"
    html = await page.text()
    policy = page.headers["Content-Security-Policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "frame-ancestors 'none'" in policy
    assert page.headers["X-Content-Type-Options"] == "nosniff"
    assert html.count("<script") == 1 and 'src="ui/static/console.js"' in html and "</script>" in html
    assert "<script>" not in html and " on" + "click=" not in html and "style=" not in html
    assert "http://" not in html and "https://" not in html, "nothing loaded from elsewhere"
    script = await served.get("/ui/static/console.js")
    assert script.content_type == "text/javascript" and script.headers["X-Content-Type-Options"] == "nosniff"
    code = await script.text()
    for parsing in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert parsing not in code, f"the console's script must not use {parsing}"
    assert "http://" not in code and "https://" not in code
    assert (await served.get("/ui/static/console.css")).content_type == "text/css"
    for name in ("app.py", "..%2Fapp.py", "index.html", "console.JS"):
        assert (await served.get(f"/ui/static/{name}")).status == 404, name


# -- bad input ----------------------------------------------------------------------------------------------


async def test_bad_ids_and_query_values_are_400_with_one_sentence(served: TestClient[Any, Any]) -> None:
    tenant = new_tenant("bad")
    auth = bearer(ADMIN)
    cases = [
        "/status/jobs/not-a-job-id", "/status/jobs/Bad!:echo:k", f"/status/jobs/{tenant}:echo:{'k' * 400}",
        "/status/tenants/Bad!/runs", f"/status/tenants/{'x' * 80}/failures",
        f"/status/tenants/{tenant}/runs/not-a-uuid",
        f"/status/tenants/{tenant}/runs?limit=0", f"/status/tenants/{tenant}/runs?limit=201",
        f"/status/tenants/{tenant}/runs?limit=abc", f"/status/tenants/{tenant}/runs?status=bogus",
        f"/status/tenants/{tenant}/failures?limit=100000", "/status/dead-letters?pool=nope",
        "/status/dead-letters?limit=-1",
    ]
    for path in cases:
        sentence = await refused(await served.get(path, headers=auth), 400)
        assert "\n" not in sentence, path
    assert "limit" in json.dumps(await (await served.get(f"/status/tenants/{tenant}/runs?limit=0",
                                                          headers=auth)).json())
    job = f"{tenant}:echo:k"
    await refused(await served.post(f"/admin/jobs/{job}/cancel", headers=auth, data=b"[1]"), 400)
    await refused(await served.post(f"/admin/jobs/{job}/cancel", headers=auth, json={"by": "x" * 300}), 400)
    await refused(await served.post(f"/admin/jobs/{job}/retry", headers=auth, json={"who": "me"}), 400)
    await refused(await served.post(f"/admin/jobs/{job}/cancel", headers=auth, data=b"x" * (65 * 1024)), 413)


# -- jobs ----------------------------------------------------------------------------------------------------


async def test_a_job_with_its_events_then_cancel_and_retry_over_http(
        served: TestClient[Any, Any], redis: Redis, quotas: Path) -> None:
    tenant = new_tenant("job")
    auth = bearer(ADMIN)
    job_id = await queued_job(redis, quotas, tenant)
    other = await queued_job(redis, quotas, tenant, key="other")
    events = EventPublisher(redis)
    await events.publish(tenant, "job_started", {"job_id": job_id, "task": "probe_sleep", "try": 1})
    await events.publish(tenant, "job_started", {"job_id": other, "task": "probe_sleep", "try": 1})
    await events.publish(tenant, "job_retrying", {"job_id": job_id, "task": "probe_sleep", "try": 1, "defer": 1})

    view = await (await served.get(f"/status/jobs/{job_id}", headers=auth)).json()
    assert view["status"] == "queued" and view["tenant_id"] == tenant and view["task"] == "probe_sleep"
    assert [e["event"] for e in view["events"]] == ["job_started", "job_retrying"], "its own, oldest first"
    assert all(e["data"]["job_id"] == job_id for e in view["events"])
    check_shape(openapi_document(), "JobView", view)  # what /openapi.json promises

    await refused(await served.get(f"/status/jobs/{tenant}:probe_sleep:never", headers=auth), 404)
    await refused(await served.post(f"/admin/jobs/{tenant}:probe_sleep:never/cancel", headers=auth), 404)
    await refused(await served.post(f"/admin/jobs/{job_id}/retry", headers=auth), 409)  # queued: not failed

    response = await served.post(f"/admin/jobs/{job_id}/cancel", headers=auth, json={"by": "alice"})
    assert response.status == 200, await response.text()
    assert (await response.json())["status"] == "cancelled"
    assert (await job_control.get_job(redis, job_id)).status == "cancelled"
    await refused(await served.post(f"/admin/jobs/{job_id}/cancel", headers=auth), 409)  # finished: cancelled
    retried = await served.post(f"/admin/jobs/{job_id}/retry", headers=auth)  # an empty body: by defaults
    assert retried.status == 200, await retried.text()
    assert (await retried.json())["status"] in ("queued", "deferred")
    assert (await job_control.get_job(redis, job_id)).status in ("queued", "deferred")


async def test_recent_failures_and_dead_letters(served: TestClient[Any, Any], redis: Redis) -> None:
    tenant = new_tenant("fail")
    auth = bearer(READER)
    events = EventPublisher(redis)
    for n in range(3):
        await events.publish(tenant, "job_failed", {"job_id": f"{tenant}:probe_fail:{n}", "task": "probe_fail",
                                                    "try": 1, "error": "RuntimeError", "message": f"boom {n}",
                                                    "reason": "error"})
        await events.publish(tenant, "job_completed", {"job_id": f"{tenant}:echo:{n}", "task": "echo", "try": 1})
    failures = await (await served.get(f"/status/tenants/{tenant}/failures?limit=2", headers=auth)).json()
    assert [f["data"]["message"] for f in failures] == ["boom 2", "boom 1"], "newest first, limited"
    assert await (await served.get(f"/status/tenants/{new_tenant()}/failures", headers=auth)).json() == []
    dead = await (await served.get("/status/dead-letters?limit=5", headers=auth)).json()
    assert dead == {"standard": {"letters": [], "total": 0, "more": 0}}


# -- runs, approvals, schedules ------------------------------------------------------------------------------


async def waiting_run(database: Database, redis_url: str, quotas: Path, tenant: str) -> str:
    async with workflow_client(redis_url, quotas, database) as client:
        await client.save_workflow(tenant, {"id": "expense", "steps": [
            {"id": "manager", "kind": "approval", "message": "Approve?"}]})
    async with database.tenant(tenant) as tx:
        run, _ = await run_rows.create_run(tx, workflow_id="expense", workflow_version=1, idempotency_key="r1",
                                           trigger="manual", input_data={"amount": 12})
        await run_rows.start_step(tx, run.run_id, "manager", kind="approval", input_data={"message": "Approve?"},
                                  job_id="j")
        await approval_rows.request_approval(tx, run.run_id, "manager", {"message": "Approve <b>now</b>?"})
        await run_rows.set_run_status(tx, run.run_id, run_rows.RunStatus.WAITING_APPROVAL)
    return run.run_id


async def test_runs_a_run_with_its_approvals_and_a_decision(
        served: TestClient[Any, Any], redis: Redis, redis_url: str, quotas: Path, database: Database) -> None:
    tenant = new_tenant("run")
    run_id = await waiting_run(database, redis_url, quotas, tenant)
    auth = bearer(ADMIN)
    runs = await (await served.get(f"/status/tenants/{tenant}/runs?status=waiting_approval",
                                   headers=auth)).json()
    assert [r["run_id"] for r in runs] == [run_id] and runs[0]["steps"] == []
    assert await (await served.get(f"/status/tenants/{tenant}/runs?status=completed", headers=auth)).json() == []
    run = await (await served.get(f"/status/tenants/{tenant}/runs/{run_id}", headers=auth)).json()
    assert run["status"] == "waiting_approval" and run["waiting"] == ["manager"]
    assert [s["step_id"] for s in run["steps"]] == ["manager"]
    assert run["approvals"][0]["request"] == {"message": "Approve <b>now</b>?"}
    check_shape(openapi_document(), "Run", run)
    await refused(await served.get(f"/status/tenants/{tenant}/runs/{uuid.uuid4()}", headers=auth), 404)
    await refused(await served.get(f"/status/tenants/{new_tenant()}/runs/{run_id}", headers=auth), 404)

    path = f"/admin/tenants/{tenant}/runs/{run_id}/decision"
    for body in ({"decision": "maybe", "by": "bob"}, {"decision": "approve"}, {"decision": "approve", "by": ""},
                 {"decision": "approve", "by": "bob", "extra": 1}, [1], {"decision": "approve", "by": "b",
                                                                          "comment": "c" * 3000}):
        await refused(await served.post(path, headers=auth, json=body), 400)
    await refused(await served.post(path, headers=auth, json={"decision": "approve", "by": "bob",
                                                                "step_id": "other"}), 409)
    await refused(await served.post(f"/admin/tenants/{tenant}/runs/{uuid.uuid4()}/decision", headers=auth,
                                    json={"decision": "approve", "by": "bob"}), 404)
    assert (await served.post(path, headers=bearer(READER), json={"decision": "approve", "by": "b"})).status == 401

    first = await served.post(path, headers=auth, json={"decision": "approve", "by": "bob", "comment": "ok"})
    assert first.status == 202, await first.text()
    answer = await first.json()
    check_shape(openapi_document(), "Accepted", answer)
    assert answer["created"] is True and answer["step_id"] == "manager"
    assert answer["job_id"].startswith(f"{tenant}:resume_run:")
    job = await job_control.get_job(redis, answer["job_id"])
    assert job.status == "queued" and job.task == "resume_run"
    again = await (await served.post(path, headers=auth, json={"decision": "approve", "by": "bob"})).json()
    assert again == {**answer, "created": False}, "a second click enqueues nothing"

    async with database.tenant(tenant) as tx:
        await approval_rows.decide(tx, run_id, "manager", approved=True, decision={"approved": True})
        await run_rows.set_run_status(tx, run_id, run_rows.RunStatus.COMPLETED)
    await refused(await served.post(path, headers=auth, json={"decision": "reject", "by": "bob"}), 409)


async def test_schedules_of_a_tenant(served: TestClient[Any, Any], redis_url: str, quotas: Path,
                                     database: Database) -> None:
    tenant = new_tenant("sch")
    auth = bearer(READER)
    assert await (await served.get(f"/status/tenants/{tenant}/schedules", headers=auth)).json() == {
        "schedules": [], "more": False}
    async with workflow_client(redis_url, quotas, database) as client:
        await client.save_schedule(tenant, {"id": "nightly", "cron": "0 3 * * *", "task": "echo",
                                            "payload": {"message": "hi"}})
    found = await (await served.get(f"/status/tenants/{tenant}/schedules", headers=auth)).json()
    (schedule,) = found["schedules"]
    assert schedule["id"] == "nightly" and schedule["failures"] == 0 and schedule["last_error"] is None
    assert "next_due_at" in schedule and "last_due_at" in schedule


# -- agentworker status --watch ------------------------------------------------------------------------------


async def test_status_watch_redraws_with_the_token_until_ctrl_c(served: TestClient[Any, Any],
                                                                redis_url: str) -> None:
    url = str(served.make_url("/")).rstrip("/")
    env = worker_env(redis_url, AGENTWORKER_STATUS_TOKEN=READER)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentworker", "status", "--watch", "--interval", "0.5", "--url", url,
        env=env, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    seen = 0
    try:
        async with asyncio.timeout(60):
            while seen < 2:
                line = (await proc.stdout.readline()).decode()
                assert line, (await proc.stderr.read()).decode()
                assert "HTTP 401" not in line
                seen += line.startswith("supervisor pid ")
    finally:
        os.kill(proc.pid, signal.SIGINT)
    async with asyncio.timeout(30):
        assert await proc.wait() == 0
    assert b"Traceback" not in await proc.stderr.read()

    # Without the token: one line naming what to set, exit 1.
    once = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentworker", "status", "--url", url, env=worker_env(redis_url), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await once.communicate()
    assert once.returncode == 1 and out == b""
    assert err.decode().count("\n") == 1 and "AGENTWORKER_STATUS_TOKEN" in err.decode()


@pytest.mark.parametrize(("args", "message"), [
    (["--interval", "1"], "--interval is only used with --watch"),
    (["--watch", "--interval", "0.1"], "--interval 0.1 is out of range: give 0.5 to 3600 seconds"),
])
def test_status_watch_options_are_checked(args: list[str], message: str, redis_url: str) -> None:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "agentworker", "status", *args, "--url", "http://127.0.0.1:9"],
                          capture_output=True, text=True, env=worker_env(redis_url), cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"agentworker: {message}"], proc.stderr
