"""Workflows through crashes, retries, approvals across processes and a PostgreSQL outage."""

from __future__ import annotations

import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs
from agentworker.client import JobFailed, JobStatus
from agentworker.db import Database
from tests.conftest import new_tenant, wait_for
from tests.workflow_helpers import (
    collect_events,
    counts,
    probe,
    workflow_client,
    workflow_events,
    workflow_worker_env,
)
from tests.workflow_probes import counter_key

pytestmark = pytest.mark.slow

# s1 -> (s2 | s3) -> s4 -> s5 -> s6; s4 blocks on its first execution so the test can kill the worker there.
CRASHY: dict[str, Any] = {"id": "crashy", "steps": [
    probe("s1"), probe("s2", ["s1"]), probe("s3", ["s1"]), probe("s4", ["s2", "s3"], block_first=120),
    probe("s5", ["s4"]), {"id": "s6", "kind": "tool", "tool": "probe_effect", "depends_on": ["s5"],
                          "args": {"name": "s6"}},
]}
NAMES = ["s1", "s2", "s3", "s4", "s5", "s6"]


async def test_a_run_survives_kill_9_during_step_4_without_repeating_steps_1_to_3(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], database_url: str, database: Database,
        spawn_worker: Any) -> None:
    # Without a supervisor to release it, a SIGKILLed worker's job lease lapses after AGENTWORKER_JOB_LEASE_TTL
    # (6 s here, not the default 10).
    path = write_quotas({"pools": {"standard": {"shards": 2, "job_timeout": 8, "max_tries": 3}}})
    env = workflow_worker_env(database_url, AGENTWORKER_JOB_LEASE_TTL="6")  # a loaded host may stall a loop 3 s
    first = spawn_worker(path, slot=0, **env)
    await first.wait_serving()
    tenant = new_tenant("crash")
    async with workflow_client(redis_url, path, database) as client:
        await client.save_workflow(tenant, CRASHY)
        job = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "crashy"},
                                   idempotency_key="crash-1")

        async def step_4_running() -> bool:
            return await redis.get(counter_key(tenant, "s4")) is not None

        await wait_for(step_4_running, 30, what="step 4 to start")
        first.signal(signal.SIGKILL)
        await first.wait_exit()
        assert await job.status() == JobStatus.IN_PROGRESS
        second = spawn_worker(path, slot=1, **env)
        await second.wait_serving()
        result = await job.result(timeout=60)
        assert result["status"] == "completed"
        info = await job.info()
        assert info is not None and info.job_try == 1, "a re-run after a crash spends no try"
        assert await counts(redis, tenant, NAMES) == {"s1": 1, "s2": 1, "s3": 1, "s4": 2, "s5": 1, "s6": 1}
        run = await client.get_run(tenant, result["run_id"])
        assert run is not None and run.status == "completed" and run.attempts == 2
        history = [(s.step_id, s.attempt, s.status) for s in run.steps]
        assert history.count(("s4", 1, "interrupted")) == 1 and ("s4", 2, "completed") in history
        assert all(status == "completed" for step, _, status in history if step != "s4")
        assert len(history) == 7
        assert [s.job_id for s in run.steps] == [job.job_id] * 7
        assert len(await client.list_runs(tenant)) == 1

        events = workflow_events(await collect_events(client, tenant,
                                                      lambda e: e.event == "workflow_run_completed"),
                                 result["run_id"])
        names = [e.event for e in events]
        assert names.count("workflow_run_started") == 1
        completed = [e.data["step_id"] for e in events if e.event == "workflow_step_completed"]
        assert sorted(completed) == NAMES, "every step reported completed exactly once"


async def test_a_retried_job_with_the_same_key_makes_no_second_run_and_no_second_effect(
        redis: Redis, redis_url: str, quota_file: Path, database_url: str, database: Database,
        spawn_worker: Any) -> None:
    worker = spawn_worker(quota_file, **workflow_worker_env(database_url))
    await worker.wait_serving()
    tenant = new_tenant("idem")
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, {"id": "once", "steps": [
            probe("prepare"),
            {"id": "charge", "kind": "tool", "tool": "probe_effect", "depends_on": ["prepare"],
             "args": {"name": "charge"}}]})
        payload = {"workflow_id": "once", "input_data": {"amount": 5}}
        first = await client.enqueue("execute_workflow", tenant_id=tenant, payload=payload, idempotency_key="pay-1")
        done = await first.result(timeout=60)
        again = await client.enqueue("execute_workflow", tenant_id=tenant, payload=payload, idempotency_key="pay-1")
        assert again.created is False, "same key while the result is kept: not enqueued at all"
        # Once the result has expired, the same key runs the task again: it finds the run and stops there.
        await redis.delete(jobs.result_key(first.job_id))
        rerun = await client.enqueue("execute_workflow", tenant_id=tenant, payload=payload, idempotency_key="pay-1")
        assert rerun.created is True
        assert await rerun.result(timeout=60) == done
        assert await counts(redis, tenant, ["prepare", "charge"]) == {"prepare": 1, "charge": 1}
        (run,) = await client.list_runs(tenant)
        assert run.run_id == done["run_id"]
        full = await client.get_run(tenant, run.run_id)
        assert full is not None and len(full.steps) == 2


async def test_approval_pauses_and_resume_run_from_another_process_completes_or_rejects(
        redis: Redis, redis_url: str, quota_file: Path, database_url: str, database: Database,
        spawn_worker: Any) -> None:
    env = workflow_worker_env(database_url)
    first = spawn_worker(quota_file, slot=0, **env)
    await first.wait_serving()
    tenant = new_tenant("appr")
    definition = {"id": "expense", "steps": [
        probe("prepare"),
        {"id": "manager", "kind": "approval", "depends_on": ["prepare"],
         "message": "Approve {{ input.amount }} EUR?", "details": {"who": "{{ input.who }}"}},
        probe("pay", ["manager"]),
    ]}
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, definition)
        runs_by_name = {}
        for name in ("yes", "no"):
            job = await client.enqueue("execute_workflow", tenant_id=tenant, idempotency_key=name,
                                       payload={"workflow_id": "expense", "input_data": {"amount": 12, "who": name}})
            paused = await job.result(timeout=60)
            assert paused["status"] == "waiting_approval" and paused["waiting_for"] == ["manager"]
            runs_by_name[name] = paused["run_id"]
            run = await client.get_run(tenant, paused["run_id"])
            assert run is not None and run.status == "waiting_approval"
            assert [(s.step_id, s.status) for s in run.steps] == [("prepare", "completed"),
                                                                   ("manager", "waiting_approval")]
            assert run.steps[1].input == {"message": "Approve 12 EUR?", "details": {"who": name}}
        assert await counts(redis, tenant, ["prepare", "pay"]) == {"prepare": 2, "pay": 0}
        waiting = await collect_events(client, tenant, lambda e: e.event == "workflow_waiting_for_approval")
        assert waiting[-1].data["step_id"] == "manager" and waiting[-1].data["status"] == "waiting_approval"
        assert waiting[-1].data["output"]["message"] == "Approve 12 EUR?"

        # The first process goes away; a new one resumes both runs from their checkpoints.
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
        second = spawn_worker(quota_file, slot=1, **env)
        await second.wait_serving()
        approve = await client.enqueue("resume_run", tenant_id=tenant, payload={
            "run_id": runs_by_name["yes"], "decision": {"decision": "approve", "by": "boss", "comment": "ok"}})
        done = await approve.result(timeout=60)
        assert done["status"] == "completed"
        assert done["output"]["pay"]["pid"] == second.pid
        reject = await client.enqueue("resume_run", tenant_id=tenant,
                                      payload={"run_id": runs_by_name["no"], "decision": "reject"})
        rejected = await reject.result(timeout=60)
        assert rejected["status"] == "rejected" and rejected["output"] == {"rejected_at": "manager"}
        assert await counts(redis, tenant, ["prepare", "pay"]) == {"prepare": 2, "pay": 1}

        yes = await client.get_run(tenant, runs_by_name["yes"])
        no = await client.get_run(tenant, runs_by_name["no"])
        assert yes is not None and no is not None
        assert [(s.step_id, s.status) for s in yes.steps] == [("prepare", "completed"), ("manager", "completed"),
                                                               ("pay", "completed")]
        assert yes.steps[1].output == {"approved": True, "comment": "ok", "by": "boss"}
        assert no.status == "rejected"
        assert [(s.step_id, s.status) for s in no.steps] == [("prepare", "completed"), ("manager", "rejected"),
                                                              ("pay", "skipped")]
        # Resuming a finished run changes nothing; a bad decision is refused in one sentence.
        repeat = await client.enqueue("resume_run", tenant_id=tenant,
                                      payload={"run_id": runs_by_name["no"], "decision": "approve"})
        assert (await repeat.result(timeout=60))["status"] == "rejected"
        bad = await client.enqueue("resume_run", tenant_id=tenant,
                                   payload={"run_id": runs_by_name["no"], "decision": "maybe"})
        with pytest.raises(JobFailed) as info:
            await bad.result(timeout=60)
        assert info.value.message == "decision 'maybe': use 'approve' or 'reject'"
        events = await collect_events(client, tenant, lambda e: e.event == "workflow_run_completed"
                                      and e.data["run_id"] == runs_by_name["no"])
        waits = [e for e in events if e.event == "workflow_waiting_for_approval"]
        assert len(waits) == 2, "one waiting event per run, none repeated by the resume"


async def test_workers_start_without_postgresql_and_fail_workflow_jobs_clearly(
        redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any) -> None:
    path = write_quotas({"pools": {"standard": {"shards": 1, "job_timeout": 30, "max_tries": 1}}})
    worker = spawn_worker(path, **workflow_worker_env("postgresql://postgres:secret@127.0.0.1:1/none"))
    await worker.wait_serving()
    async with workflow_client(redis_url, path) as client:
        job = await client.enqueue("execute_workflow", tenant_id="acme", payload={"workflow_id": "wf-1"})
        with pytest.raises(JobFailed) as info:
            await job.result(timeout=60)
        assert info.value.error == "DatabaseUnavailable"
        assert "cannot reach PostgreSQL at postgresql://postgres:***@127.0.0.1:1/none" in info.value.message
        echo = await client.enqueue("echo", tenant_id="acme", payload={"message": "still here"})
        assert await echo.result(timeout=30) == "still here"
    assert "secret" not in worker.log()
