"""Job control end to end: real worker subprocesses (and one ``agentworker run``), real Redis and
PostgreSQL, driven through the client and the CLI as users do."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.client import AgentWorkerClient, JobFailed, JobNotCancellable, RunNotCancellable
from agentworker.db import Database
from tests.conftest import ROOT, make_client, new_tenant, wait_for, worker_env
from tests.job_control_probes import flag_key
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory
from tests.workflow_helpers import collect_events, counts, probe, workflow_client, workflow_worker_env
from tests.workflow_probes import counter_key

pytestmark = pytest.mark.slow

MODULES = "tests.probe_tasks,tests.workflow_probes,tests.job_control_probes"


@pytest.fixture
async def client(redis_url: str, quota_file: Path, spawn_worker: Any) -> AsyncIterator[AgentWorkerClient]:
    worker = spawn_worker(quota_file, AGENTWORKER_TASK_MODULES=MODULES)
    await worker.wait_serving()
    async with make_client(redis_url, quota_file) as made:
        yield made


async def _running(redis: Redis, group: str) -> bool:
    return int(await redis.get(f"probe:{group}:running") or 0) == 1


async def _tenant_events(redis: Redis, tenant: str) -> list[dict[str, Any]]:
    return [json.loads(fields[b"event"]) for _id, fields in await redis.xrange(keys.event_stream(tenant))]


def _cli(redis_url: str, config: Path, *args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agentworker", *args, "--config", str(config)],
                          env=worker_env(redis_url), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


async def test_a_running_job_cancelled_through_the_client_ends_cancelled(client: AgentWorkerClient,
                                                                        redis: Redis) -> None:
    tenant = new_tenant("run")
    job = await client.enqueue("probe_sleep", tenant_id=tenant, payload={"seconds": 120, "group": tenant})
    await wait_for(lambda: _running(redis, tenant), 30, what="the job to start")
    view = await client.cancel(job.job_id, by="test:dana")
    assert view.status == "running" and view.cancel_requested and view.started_at is not None

    with pytest.raises(JobFailed) as failed:
        await job.result(timeout=30)
    assert failed.value.error == "JobCancelled" and "test:dana" in failed.value.message
    assert int(await redis.get(f"probe:{tenant}:running") or 0) == 0  # its task was cancelled, not left running
    assert await redis.hget("probe:runs", job.job_id) is None  # the sleep never finished
    for key in (jobs.job_key(job.job_id), jobs.in_progress_key(job.job_id), jobs.retry_key(job.job_id),
                keys.job_attempt(job.job_id)):
        assert not await redis.exists(key), key  # finished for good: nothing left to run it again
    assert await redis.zscore("arq:abort", job.job_id) is None

    final = await client.get_job(job.job_id)
    assert final.status == "cancelled" and final.tries == 1 and final.finished_at is not None
    events = [e for e in await _tenant_events(redis, tenant) if e["data"].get("job_id") == job.job_id]
    names = [e["event"] for e in events]
    assert names[0] == "job_started" and names.count("job_cancelled") == 1
    assert "job_failed" not in names and "job_retrying" not in names
    cancelled = next(e for e in events if e["event"] == "job_cancelled")
    assert cancelled["data"]["by"] == "test:dana" and cancelled["data"]["error"] == "JobCancelled"


async def test_a_bare_cancel_request_in_redis_finishes_a_queued_job_when_it_is_claimed(
        client: AgentWorkerClient, redis: Redis) -> None:
    """docs/protocol.md: a producer without the client may only ZADD the request; the claim honours it."""
    tenant = new_tenant("bare")
    job = await client.enqueue("probe_sleep", tenant_id=tenant, payload={"seconds": 0.1, "group": tenant},
                               defer=2)
    assert (await client.get_job(job.job_id)).status == "deferred"
    await redis.zadd("arq:abort", {job.job_id: int(time.time() * 1000)}, nx=True)
    with pytest.raises(JobFailed) as failed:
        await job.result(timeout=60)
    assert failed.value.error == "JobCancelled" and "before it started" in failed.value.message
    assert await redis.hget("probe:runs", job.job_id) is None  # it never ran
    assert await redis.zscore("arq:abort", job.job_id) is None
    assert (await client.get_job(job.job_id)).status == "cancelled"
    assert await client.pending_count(tenant) == 0


async def test_a_running_job_cancelled_through_the_cli(client: AgentWorkerClient, redis: Redis, redis_url: str,
                                                       quota_file: Path) -> None:
    tenant = new_tenant("runcli")
    job = await client.enqueue("probe_sleep", tenant_id=tenant, payload={"seconds": 120, "group": tenant})
    await wait_for(lambda: _running(redis, tenant), 30, what="the job to start")
    done = await asyncio.to_thread(_cli, redis_url, quota_file, "cancel", job.job_id, "--json")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["status"] == "running" and view["cancel_requested"] is True
    with pytest.raises(JobFailed, match="JobCancelled"):
        await job.result(timeout=30)
    shown = await asyncio.to_thread(_cli, redis_url, quota_file, "job", job.job_id)
    assert shown.returncode == 0 and shown.stdout.startswith(f"job {job.job_id}: cancelled")
    assert "error JobCancelled" in shown.stdout


async def test_retry_of_a_failed_job_runs_it_again_and_it_completes(client: AgentWorkerClient, redis: Redis,
                                                                   redis_url: str, quota_file: Path) -> None:
    tenant = new_tenant("retry")
    flag = tenant
    job = await client.enqueue("probe_needs_flag", tenant_id=tenant, payload={"flag": flag})
    with pytest.raises(JobFailed, match="RuntimeError"):
        await job.result(timeout=30)
    assert (await client.get_job(job.job_id)).status == "failed"

    await redis.set(flag_key(flag), 1)
    retried = await asyncio.to_thread(_cli, redis_url, quota_file, "retry", job.job_id, "--json")
    assert retried.returncode == 0, retried.stderr
    assert json.loads(retried.stdout)["status"] in ("queued", "running", "completed")
    assert await job.result(timeout=30) == "done"
    assert int(await redis.hget("jcprobe:runs", job.job_id) or 0) == 1
    final = await client.get_job(job.job_id)
    assert final.status == "completed" and final.result == "done" and final.tries == 1


async def test_cancel_a_running_job_then_retry_it(client: AgentWorkerClient, redis: Redis) -> None:
    tenant = new_tenant("again")
    job = await client.enqueue("probe_needs_flag", tenant_id=tenant, payload={"flag": tenant}, defer=3600)
    await job.cancel(by="test")
    await redis.set(flag_key(tenant), 1)
    view = await job.retry()
    assert view.status in ("queued", "running", "completed")
    assert await job.result(timeout=30) == "done"


async def test_enqueue_wait_prints_the_jobs_progress(client: AgentWorkerClient, redis_url: str,
                                                    quota_file: Path) -> None:
    tenant = new_tenant("wait")
    done = await asyncio.to_thread(_cli, redis_url, quota_file, "enqueue", "probe_flaky", "--tenant", tenant,
                                   "--payload", json.dumps({"failures": 1}), "--wait", "--timeout", "60")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "2"  # the result on stdout, as before
    lines = [line.split(": ", 1)[1] for line in done.stderr.splitlines() if line.startswith("job ")]
    assert lines[0] == "started (try 1)"
    assert lines[1].startswith("retrying (try 1) after ConnectionError: transient failure on try 1, again in")
    assert lines[2:] == ["started (try 2)", "finished (try 2)"]

    failed = await asyncio.to_thread(_cli, redis_url, quota_file, "enqueue", "probe_fail", "--tenant", tenant,
                                     "--wait")
    assert failed.returncode == 1
    assert "failed (try 1) (error): RuntimeError: boom" in failed.stderr


# -- workflow runs ---------------------------------------------------------------------------------------


@pytest.fixture
async def workflows(redis_url: str, quota_file: Path, database_url: str, database: Database,
                    spawn_worker: Any) -> AsyncIterator[AgentWorkerClient]:
    worker = spawn_worker(quota_file, **workflow_worker_env(database_url, AGENTWORKER_TASK_MODULES=MODULES))
    await worker.wait_serving()
    async with workflow_client(redis_url, quota_file, database) as made:
        yield made


async def _only_run(client: AgentWorkerClient, tenant: str) -> Any:
    listed = await client.list_runs(tenant)
    assert len(listed) == 1
    run = await client.get_run(tenant, listed[0].run_id)
    assert run is not None
    return run


async def test_a_workflow_run_cancelled_while_a_step_runs_starts_no_later_step(workflows: AgentWorkerClient,
                                                                             redis: Redis) -> None:
    client = workflows
    tenant = new_tenant("wfc")
    await client.save_workflow(tenant, {"id": "slow", "steps": [
        probe("first", block_first=120), probe("second", ["first"]), probe("third", ["second"])]})
    job = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "slow"})

    async def first_running() -> bool:
        return int(await redis.get(counter_key(tenant, "first")) or 0) == 1

    await wait_for(first_running, 60, what="the first step to start")
    view = await client.cancel(job.job_id, by="test:erin")
    assert view.status == "running" and view.cancel_requested
    with pytest.raises(JobFailed, match="JobCancelled"):
        await job.result(timeout=30)

    run = await _only_run(client, tenant)
    assert run.status == "cancelled" and run.finished_at is not None
    assert run.error["error"] == "JobCancelled" and run.error["reason"] == "cancelled"
    assert [(s.step_id, s.status) for s in run.steps] == [("first", "interrupted")]
    assert await counts(redis, tenant, ["first", "second", "third"]) == {"first": 1, "second": 0, "third": 0}
    events = await collect_events(client, tenant, lambda e: e.event == "workflow_cancelled")
    assert [e.data["run_id"] for e in events if e.event == "workflow_cancelled"] == [run.run_id]
    assert not any(e.event == "workflow_run_failed" for e in events)


async def test_a_cancel_that_lands_between_two_steps_is_honoured(workflows: AgentWorkerClient, redis: Redis) -> None:
    """The first step itself asks for the cancel and returns at once: the request arrives after it and
    before the second, which never starts."""
    client = workflows
    tenant = new_tenant("wfb")
    job_id = f"{tenant}:execute_workflow:between"
    await client.save_workflow(tenant, {"id": "between", "steps": [
        {"id": "ask", "kind": "tool", "tool": "probe_request_cancel", "args": {"job_id": job_id}},
        probe("second", ["ask"]), probe("third", ["second"])]})
    job = await client.enqueue("execute_workflow", tenant_id=tenant, idempotency_key="between",
                               payload={"workflow_id": "between"})
    assert job.job_id == job_id
    with pytest.raises(JobFailed, match="JobCancelled"):
        await job.result(timeout=60)
    run = await _only_run(client, tenant)
    assert run.status == "cancelled"
    assert [s.step_id for s in run.steps] == ["ask"]  # finished (or cut short on its last write); none after
    assert await counts(redis, tenant, ["second", "third"]) == {"second": 0, "third": 0}


async def test_a_run_waiting_for_approval_is_cancelled_with_cancel_run(workflows: AgentWorkerClient,
                                                                      redis: Redis) -> None:
    """Its job has finished (the run waits with no job behind it): cancelling the job is refused, and
    ``cancel_run`` ends the run; a decision sent later finds it finished and runs nothing."""
    client = workflows
    tenant = new_tenant("wfa")
    await client.save_workflow(tenant, {"id": "approve", "steps": [
        {"id": "manager", "kind": "approval", "message": "Approve?"}, probe("after", ["manager"])]})
    job = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "approve"})
    waiting = await job.result(timeout=60)
    assert waiting["status"] == "waiting_approval"
    with pytest.raises(JobNotCancellable):
        await client.cancel(job.job_id)

    run = await client.cancel_run(tenant, waiting["run_id"], by="test:fay")
    assert run is not None and run.status == "cancelled" and "test:fay" in run.error["message"]
    assert [(s.step_id, s.status) for s in run.steps] == [("manager", "interrupted")]
    with pytest.raises(RunNotCancellable):
        await client.cancel_run(tenant, waiting["run_id"])
    events = await collect_events(client, tenant, lambda e: e.event == "workflow_cancelled")
    assert events[-1].data["run_id"] == waiting["run_id"]

    resumed = await client.enqueue("resume_run", tenant_id=tenant,
                                   payload={"run_id": waiting["run_id"], "decision": "approve"})
    assert (await resumed.result(timeout=60))["status"] == "cancelled"
    assert await counts(redis, tenant, ["after"]) == {"after": 0}


# -- the whole service ------------------------------------------------------------------------------------


@pytest.fixture
def supervisor(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


async def test_a_cancelled_job_is_counted_as_cancelled_by_the_service(supervisor: Any, redis_url: str,
                                                                     quota_file: Path, redis: Redis) -> None:
    sup = supervisor(quota_file, AGENTWORKER_TASK_MODULES=MODULES)
    await sup.wait_ready()
    tenant = new_tenant("svc")
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("probe_sleep", tenant_id=tenant, payload={"seconds": 120, "group": tenant})
        await wait_for(lambda: _running(redis, tenant), 30, what="the job to start")
        await client.cancel(job.job_id)
        with pytest.raises(JobFailed, match="JobCancelled"):
            await job.result(timeout=30)

    async def counted() -> bool:
        samples = await sup.metrics()
        return any(name == "agentworker_jobs_total" and dict(labels).get("outcome") == "cancelled"
                   and dict(labels).get("task") == "probe_sleep" and value >= 1
                   for (name, labels), value in samples.items())

    await wait_for(counted, 30, what='agentworker_jobs_total{outcome="cancelled"}')
