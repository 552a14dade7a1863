"""Runs whose job failed for good end ``failed``: the tasks' final-failure hooks and the orphaned-run
sweeper, in-process, against real PostgreSQL and Redis.

The sweeper reads every tenant's runs, so this module migrates a database of its own: no other test's
runs can be swept, and the counts it returns are exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from redis.asyncio import Redis

from agentworker import keys
from agentworker.config import load_config
from agentworker.db import Database, DatabaseUnavailable, approvals, definitions, open_database, runs
from agentworker.db.runs import RunRecord, RunStatus, StepStatus
from agentworker.events import EventPublisher
from agentworker.jobs import job_key, make_job_id
from agentworker.logs import get_logger
from agentworker.settings import Settings
from agentworker.tasks.agent_tasks import InvalidAgentInput, job_digest, run_tool_agent
from agentworker.tasks.context import JobContext, JobRuntime
from agentworker.tasks.envelope import JobPoisoned, JobTimedOut, JobTriesExhausted
from agentworker.tasks.registry import REGISTRY
from agentworker.tasks.run_sweeper import SweepLock, sweep_forever, sweep_once, sweep_orphaned_runs
from agentworker.tasks.workflow_tasks import run_event
from tests.conftest import make_client, new_tenant, scratch_database, wait_for

UNREACHABLE_DATABASE = "postgresql://postgres@127.0.0.1:1/nowhere"
WORKFLOW = {"id": "wf", "steps": [{"id": "only", "kind": "transform", "template": {"x": 1}}]}


@pytest.fixture(scope="module")
def sweep_database_url() -> Iterator[str]:
    with scratch_database("aw_sweep") as url:
        yield url


@pytest.fixture
async def db(sweep_database_url: str) -> AsyncIterator[Database]:
    database = await open_database(sweep_database_url)
    try:
        # Each test starts with no runs: the sweeper's counts are then this test's alone.
        async with database._pool.acquire() as conn:
            await conn.execute("RESET ROLE")
            await conn.execute("TRUNCATE agentworker.workflow_steps, agentworker.workflow_approvals, "
                               "agentworker.workflow_runs CASCADE")
            await conn.execute("SET ROLE agentworker_app")
        yield database
    finally:
        await database.close()


def make_runtime(redis: Redis, redis_url: str, quota_file: Path, database_url: str) -> JobRuntime:
    settings = Settings(redis_url=redis_url, database_url=database_url, config=str(quota_file))
    return JobRuntime(pool="standard", slot=0, settings=settings, redis=redis, events=EventPublisher(redis),
                      config=load_config(quota_file))


@pytest.fixture
async def runtime(redis: Redis, redis_url: str, quota_file: Path, sweep_database_url: str,
                  db: Database) -> AsyncIterator[JobRuntime]:
    made = make_runtime(redis, redis_url, quota_file, sweep_database_url)
    try:
        yield made
    finally:
        await made.resources.aclose()


def job_context(runtime: JobRuntime, tenant: str, task: str, key: str | None = None) -> JobContext:
    job_id = str(make_job_id(tenant, task, key or uuid.uuid4().hex))
    return JobContext(tenant_id=tenant, job_id=job_id, task=task, job_try=1, queue=keys.queue("standard", 0),
                      shard=0, enqueue_time_ms=int(time.time() * 1000), timeout=10.0, runtime=runtime,
                      log=get_logger("tests").bind(tenant_id=tenant, job_id=job_id))


async def new_run(database: Database, tenant: str, job_id: str, *, status: RunStatus = RunStatus.RUNNING,
                  idle_s: float = 0.0, running_step: bool = True) -> RunRecord:
    """A run made by job ``job_id`` (its idempotency key), with a step attempt left running, last updated
    ``idle_s`` seconds ago."""
    async with database.tenant(tenant) as tx:
        stored = await definitions.save_definition(tx, "wf", WORKFLOW)
        run, created = await runs.create_run(tx, workflow_id="wf", workflow_version=stored.version,
                                             idempotency_key=job_id, trigger="manual", input_data={},
                                             job_id=job_id)
        assert created
        if running_step:
            await runs.start_step(tx, run.run_id, "only", kind="transform", input_data={}, job_id=job_id)
        if status == RunStatus.WAITING_APPROVAL:
            await approvals.request_approval(tx, run.run_id, "gate", {"message": "ok?"})
        if status != RunStatus.RUNNING:
            await runs.set_run_status(tx, run.run_id, status)
        if idle_s:
            await tx.execute("UPDATE agentworker.workflow_runs SET updated_at = now() - make_interval(secs => $2) "
                             "WHERE run_id = $1", runs.parse_run_id(run.run_id), float(idle_s))
    return run


async def read_run(database: Database, tenant: str, run_id: str) -> RunRecord:
    async with database.tenant(tenant) as tx:
        run = await runs.get_run(tx, run_id, with_steps=True)
    assert run is not None
    return run


async def events(runtime: JobRuntime, tenant: str, name: str) -> list[dict[str, Any]]:
    """The data of the tenant's ``name`` events in its stream, once the events ``runtime`` has queued are
    written (promised events are published after their commit, not before the hook returns)."""
    await runtime.events.flush(timeout=5.0)
    entries = await runtime.redis.xrange(keys.event_stream(tenant))
    bodies = [json.loads(fields[b"event"]) for _id, fields in entries]
    return [body["data"] for body in bodies if body["event"] == name]


def hook_of(task: str) -> Any:
    found = REGISTRY.get(task)
    assert found is not None and found.on_final_failure is not None, f"{task} has no final-failure hook"
    return found.on_final_failure


# -- workflow hooks -----------------------------------------------------------------------------------------


async def test_execute_workflow_hook_fails_a_running_run_once(runtime: JobRuntime, db: Database,
                                                              redis: Redis) -> None:
    tenant = new_tenant("hook")
    ctx = job_context(runtime, tenant, "execute_workflow")
    run = await new_run(db, tenant, ctx.job_id)
    payload = {"tenant_id": tenant, "workflow_id": "wf"}
    hook = hook_of("execute_workflow")

    await hook(ctx, payload, "poisoned", JobPoisoned("its worker died 6 times running it"))
    failed = await read_run(db, tenant, run.run_id)
    expected = {"error": "JobPoisoned", "message": "its worker died 6 times running it", "reason": "poisoned"}
    assert failed.status == "failed" and failed.error == expected and failed.finished_at is not None
    assert [s.status for s in failed.steps] == [StepStatus.INTERRUPTED]
    assert await events(runtime, tenant, "workflow_run_failed") == [run_event(run, "failed", None,
                                                                             {"error": expected})]

    # A second report (the worker retrying its hook, or the sweeper) changes nothing and says nothing.
    await hook(ctx, payload, "tries_exhausted", JobTriesExhausted("no tries left"))
    assert (await read_run(db, tenant, run.run_id)).error == expected
    assert len(await events(runtime, tenant, "workflow_run_failed")) == 1


async def test_execute_workflow_hook_leaves_finished_and_waiting_runs_alone(runtime: JobRuntime, db: Database,
                                                                            redis: Redis) -> None:
    tenant = new_tenant("hook")
    hook = hook_of("execute_workflow")
    for status in (RunStatus.COMPLETED, RunStatus.WAITING_APPROVAL, RunStatus.FAILED):
        ctx = job_context(runtime, tenant, "execute_workflow")
        run = await new_run(db, tenant, ctx.job_id, status=status, running_step=False)
        await hook(ctx, {"tenant_id": tenant, "workflow_id": "wf"}, "timeout", JobTimedOut("too slow"))
        after = await read_run(db, tenant, run.run_id)
        assert after.status == status and after.error is None, status
    # No run for the job at all (it failed before making one): nothing to do.
    await hook(job_context(runtime, tenant, "execute_workflow"), {"tenant_id": tenant}, "rejected",
               RuntimeError("misrouted"))
    assert await events(runtime, tenant, "workflow_run_failed") == []


async def test_resume_run_hook_fails_only_a_run_its_own_job_drives(runtime: JobRuntime, db: Database,
                                                                   redis: Redis) -> None:
    tenant = new_tenant("resume")
    hook = hook_of("resume_run")
    made_by = job_context(runtime, tenant, "execute_workflow")
    run = await new_run(db, tenant, made_by.job_id)

    # A resume that failed before taking the run over (say RunNotWaiting) must not fail a run another
    # job is driving.
    stranger = job_context(runtime, tenant, "resume_run")
    await hook(stranger, {"tenant_id": tenant, "run_id": run.run_id}, "error", RuntimeError("not waiting"))
    assert (await read_run(db, tenant, run.run_id)).status == "running"

    resumer = job_context(runtime, tenant, "resume_run")
    async with db.tenant(tenant) as tx:
        await runs.count_attempt(tx, run.run_id, job_id=resumer.job_id)
    await hook(resumer, {"tenant_id": tenant, "run_id": "not-a-uuid"}, "poisoned", JobPoisoned("died"))
    assert (await read_run(db, tenant, run.run_id)).status == "running"
    await hook(resumer, {"tenant_id": tenant, "run_id": run.run_id}, "poisoned", JobPoisoned("died"))
    failed = await read_run(db, tenant, run.run_id)
    assert failed.status == "failed" and failed.job_id == resumer.job_id and failed.attempts == 2
    assert failed.error == {"error": "JobPoisoned", "message": "died", "reason": "poisoned"}
    assert len(await events(runtime, tenant, "workflow_run_failed")) == 1


async def test_a_hook_with_postgresql_down_returns_quickly_without_raising(
        redis: Redis, redis_url: str, quota_file: Path) -> None:
    down = make_runtime(redis, redis_url, quota_file, UNREACHABLE_DATABASE)
    tenant = new_tenant("down")
    ctx = job_context(down, tenant, "execute_workflow")
    started = time.monotonic()
    await hook_of("execute_workflow")(ctx, {"tenant_id": tenant}, "poisoned", JobPoisoned("died"))
    assert time.monotonic() - started < 8
    assert await events(down, tenant, "workflow_run_failed") == []
    await down.resources.aclose()


# -- agent hooks ----------------------------------------------------------------------------------------------


async def test_agent_hooks_report_a_poisoned_run(runtime: JobRuntime, redis: Redis) -> None:
    tenant = new_tenant("agent")
    tool_ctx = job_context(runtime, tenant, "run_tool_agent")
    await hook_of("run_tool_agent")(tool_ctx, {"tenant_id": tenant, "instructions": "go"}, "poisoned",
                                    JobPoisoned("its worker died 6 times running it"))
    await hook_of("run_chat_agent")(job_context(runtime, tenant, "run_chat_agent"),
                                    {"tenant_id": tenant, "conversation_id": "c1", "message": "hi"}, "timeout",
                                    JobTimedOut("run_chat_agent timed out after 5s"))
    await hook_of("resume_agent")(job_context(runtime, tenant, "resume_agent"),
                                  {"tenant_id": tenant, "run_id": "r-7", "decision": "approve"},
                                  "tries_exhausted", JobTriesExhausted("no tries left"))
    assert await events(runtime, tenant, "agent_run_failed") == [
        {"agent": "tool", "run_id": f"job-{job_digest(tool_ctx.job_id)}", "error": "JobPoisoned",
         "message": "its worker died 6 times running it", "reason": "poisoned"},
        {"agent": "chat", "conversation_id": "c1", "error": "JobTimedOut",
         "message": "run_chat_agent timed out after 5s", "reason": "timeout"},
        {"agent": "tool", "run_id": "r-7", "error": "JobTriesExhausted", "message": "no tries left",
         "reason": "tries_exhausted"},
    ]


async def test_agent_hook_does_not_repeat_what_the_task_reported(redis: Redis, redis_url: str,
                                                                 quota_file: Path) -> None:
    down = make_runtime(redis, redis_url, quota_file, UNREACHABLE_DATABASE)
    tenant = new_tenant("agent")
    ctx = job_context(down, tenant, "run_tool_agent")
    payload: dict[str, Any] = {"tenant_id": tenant, "instructions": "go", "run_id": "r-1"}
    hook = hook_of("run_tool_agent")
    # The run itself failed (PostgreSQL unreachable): the task reported it, the hook adds nothing.
    with pytest.raises(DatabaseUnavailable) as raised:
        await run_tool_agent(ctx, **payload)
    await hook(ctx, payload, "error", raised.value)
    reported = await events(down, tenant, "agent_run_failed")
    assert [(e["run_id"], e["error"], "reason" in e) for e in reported] == [("r-1", "DatabaseUnavailable", False)]
    # Invalid input fails before the run starts, past the task's except block: the hook reports it.
    bad: dict[str, Any] = {"tenant_id": tenant, "instructions": "", "run_id": "r-2"}
    with pytest.raises(InvalidAgentInput) as invalid:
        await run_tool_agent(ctx, **bad)
    await hook(ctx, bad, "error", invalid.value)
    reported = await events(down, tenant, "agent_run_failed")
    assert [(e["run_id"], e["error"], e.get("reason")) for e in reported] == [
        ("r-1", "DatabaseUnavailable", None), ("r-2", "InvalidAgentInput", "error")]
    await down.resources.aclose()


async def test_handle_message_hook_fails_its_workflow_run_and_reports_the_message(
        runtime: JobRuntime, db: Database, redis: Redis) -> None:
    tenant = new_tenant("msg")
    ctx = job_context(runtime, tenant, "handle_message")
    run = await new_run(db, tenant, ctx.job_id)  # the workflow it routed to, run in-process under its job id
    await hook_of("handle_message")(ctx, {"tenant_id": tenant, "conversation_id": "c9", "message": "hi"},
                                    "poisoned", JobPoisoned("died"))
    assert (await read_run(db, tenant, run.run_id)).status == "failed"
    assert len(await events(runtime, tenant, "workflow_run_failed")) == 1
    assert await events(runtime, tenant, "agent_run_failed") == [
        {"agent": "chat", "conversation_id": "c9", "error": "JobPoisoned", "message": "died", "reason": "poisoned"}]


# -- the sweeper ----------------------------------------------------------------------------------------------


async def test_the_sweeper_fails_runs_whose_job_is_gone_and_only_those(
        runtime: JobRuntime, db: Database, redis: Redis, redis_url: str, quota_file: Path) -> None:
    tenant, other = new_tenant("sweep"), new_tenant("sweep")
    orphan = await new_run(db, tenant, str(make_job_id(tenant, "execute_workflow", "gone")), idle_s=600)
    other_orphan = await new_run(db, other, str(make_job_id(other, "execute_workflow", "gone")), idle_s=600)
    recent = await new_run(db, tenant, str(make_job_id(tenant, "execute_workflow", "new")), idle_s=5)
    waiting = await new_run(db, tenant, str(make_job_id(tenant, "execute_workflow", "wait")), idle_s=600,
                            status=RunStatus.WAITING_APPROVAL)
    # A run whose job is still queued: its record is in Redis, written by the real client.
    async with make_client(redis_url, quota_file) as client:
        handle = await client.enqueue("execute_workflow", tenant, {"workflow_id": "wf"}, idempotency_key="alive")
    assert await redis.exists(job_key(handle.job_id))
    alive = await new_run(db, tenant, handle.job_id, idle_s=600)
    # A run made before migration 0004 (no job_id): its idempotency key names its job.
    legacy = await new_run(db, tenant, str(make_job_id(tenant, "execute_workflow", "legacy")), idle_s=600)
    async with db.tenant(tenant) as tx:
        await tx.execute("UPDATE agentworker.workflow_runs SET job_id = NULL WHERE run_id = $1",
                         runs.parse_run_id(legacy.run_id))

    # The cross-tenant index lists idle running runs (ids only), oldest first, and not the recent one.
    listed = await runs.idle_running_runs(db, idle_for_s=60, limit=100)
    assert [(r.tenant_id, r.run_id, r.job_id) for r in listed] == [
        (run.tenant_id, run.run_id, run.idempotency_key) for run in (orphan, other_orphan, alive, legacy)]
    assert await sweep_orphaned_runs(runtime, older_than_s=60, limit=1) == 3  # pages of one run
    for run, owner in ((orphan, tenant), (other_orphan, other), (legacy, tenant)):
        failed = await read_run(db, owner, run.run_id)
        job = run.idempotency_key
        assert failed.status == "failed" and failed.error == {
            "error": "RunOrphaned", "message": f"no job is left to continue this run (job {job} is gone)",
            "reason": "orphaned"}
        assert [s.status for s in failed.steps] == [StepStatus.INTERRUPTED]
    for run in (recent, alive):
        assert (await read_run(db, tenant, run.run_id)).status == "running"
    assert (await read_run(db, tenant, waiting.run_id)).status == "waiting_approval"
    announced = await events(runtime, tenant, "workflow_run_failed")
    assert sorted(e["run_id"] for e in announced) == sorted([orphan.run_id, legacy.run_id])
    assert announced[0] == run_event(orphan, "failed", None, {"error": (await read_run(db, tenant,
                                                                                        orphan.run_id)).error})
    assert [e["run_id"] for e in await events(runtime, other, "workflow_run_failed")] == [other_orphan.run_id]

    # The job finished for good: its record is gone, and its run is swept on the next pass.
    await redis.delete(job_key(handle.job_id))
    assert await sweep_orphaned_runs(runtime, older_than_s=60, limit=100) == 1
    assert (await read_run(db, tenant, alive.run_id)).status == "failed"
    assert await sweep_orphaned_runs(runtime, older_than_s=60, limit=100) == 0


async def test_two_sweepers_at_once_fail_a_run_once(runtime: JobRuntime, db: Database, redis: Redis) -> None:
    tenant = new_tenant("race")
    made = [await new_run(db, tenant, str(make_job_id(tenant, "execute_workflow", f"k{i}")), idle_s=600)
            for i in range(5)]
    counts = await asyncio.gather(*(sweep_orphaned_runs(runtime, older_than_s=60, limit=2) for _ in range(3)))
    assert sum(counts) == 5
    announced = await events(runtime, tenant, "workflow_run_failed")
    assert sorted(e["run_id"] for e in announced) == sorted(r.run_id for r in made)


async def test_only_the_lock_holder_sweeps(runtime: JobRuntime, db: Database, redis: Redis) -> None:
    tenant = new_tenant("lock")
    run = await new_run(db, tenant, str(make_job_id(tenant, "execute_workflow", "gone")), idle_s=600)
    # Another process holds the lock: this one does nothing, and cannot release that process's lock.
    theirs = SweepLock(redis, 30)
    assert await theirs.acquire()
    assert await sweep_once(runtime, older_than_s=60) is None
    assert (await read_run(db, tenant, run.run_id)).status == "running"
    assert await SweepLock(redis, 30).release() is False
    assert await redis.get(keys.run_sweeper_lock()) == theirs.token.encode()
    assert await theirs.release() is True

    # Two at once: one sweeps, the other stands aside; the winner keeps the lock for the interval.
    results = await asyncio.gather(sweep_once(runtime, older_than_s=60), sweep_once(runtime, older_than_s=60))
    assert sorted(results, key=str) == [1, None]
    assert (await read_run(db, tenant, run.run_id)).status == "failed"
    assert 0 < await redis.pttl(keys.run_sweeper_lock()) <= 30_000
    assert len(await events(runtime, tenant, "workflow_run_failed")) == 1


class CountingRuntime(JobRuntime):
    """A runtime that counts how often the sweeper asks for its database (each sweep does once)."""

    asked = 0

    async def database(self) -> Database:
        self.asked += 1
        return await super().database()


async def test_sweep_forever_rides_out_a_postgresql_outage(redis: Redis, redis_url: str, quota_file: Path,
                                                           sweep_database_url: str, db: Database) -> None:
    tenant = new_tenant("outage")
    run = await new_run(db, tenant, str(make_job_id(tenant, "execute_workflow", "gone")), idle_s=600)
    settings = Settings(redis_url=redis_url, database_url=UNREACHABLE_DATABASE, config=str(quota_file))
    runtime = CountingRuntime(pool="standard", slot=0, settings=settings, redis=redis,
                              events=EventPublisher(redis), config=load_config(quota_file))
    with structlog.testing.capture_logs() as logs:
        sweeping = asyncio.create_task(sweep_forever(runtime, interval=0.05, older_than_s=60))
        try:
            await wait_for(lambda: runtime.asked >= 4, 10, what="several sweeps with PostgreSQL down")
            assert not sweeping.done()
            runtime.settings = dataclasses.replace(settings, database_url=sweep_database_url)

            async def swept() -> bool:
                return (await read_run(db, tenant, run.run_id)).status == "failed"

            await wait_for(swept, 10, what="the orphan to be swept once PostgreSQL is back")
            await wait_for(lambda: any(e["event"] == "run sweeping resumed" for e in logs), 5,
                           what="the sweeper to log that it resumed")
            assert not sweeping.done()
        finally:
            sweeping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeping
            await runtime.resources.aclose()
    paused = [e for e in logs if e["event"] == "run sweeping paused; will retry"]
    assert len(paused) == 1 and paused[0]["log_level"] == "warning", logs
    assert [e["event"] for e in logs].count("run sweeping resumed") == 1
    assert [e["run_id"] for e in await events(runtime, tenant, "workflow_run_failed")] == [run.run_id]
