"""Workflow jobs through fast restarts of PostgreSQL: every job retries and every run completes.

Two worker processes run ~20 workflow runs of several tenants against a private PostgreSQL
(tests/pg_server.py), which is restarted with ``pg_ctl restart -m fast`` three times while they run. Each
restart terminates every session: the jobs hit by it fail their try with ``DatabaseUnavailable``, are
retried with backoff, and continue their run from its last checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker.client import AgentWorkerClient
from agentworker.db import open_database
from tests.conftest import new_tenant, wait_for
from tests.pg_server import PrivatePostgres, create_migrated_database
from tests.restart_probes import probe_key
from tests.workflow_helpers import WORKER_MODULES, workflow_client, workflow_worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TENANTS = 5
RUNS_PER_TENANT = 4
RESTARTS = 3
STEPS = ["fetch", "notify", "transform", "charge", "report"]
EFFECTS = ["notify", "charge"]


def _step(step_id: str, depends_on: list[str]) -> dict[str, Any]:
    if step_id in EFFECTS:
        return {"id": step_id, "kind": "tool", "tool": "restart_delivery", "depends_on": depends_on, "args": {}}
    return {"id": step_id, "kind": "tool", "tool": "restart_step", "depends_on": depends_on,
            "args": {"sleep": 0.5}}


WORKFLOW: dict[str, Any] = {"id": "restartable", "steps": [
    _step(step, STEPS[i - 1:i]) for i, step in enumerate(STEPS)]}


async def all_events(client: AgentWorkerClient, tenant_id: str) -> list[str]:
    """The names of every event in the tenant's stream (read until it has been quiet for a second)."""
    seen: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0) as quiet:
            async for event in client.events(tenant_id, since="0", block_ms=200):
                seen.append(event.event)
                quiet.reschedule(asyncio.get_running_loop().time() + 1.0)
    return seen


@pytest.fixture
def private_database() -> Iterator[tuple[PrivatePostgres, str]]:
    server = PrivatePostgres()
    try:
        server.start()
        yield server, create_migrated_database(server)
    finally:
        server.cleanup()


async def test_fast_restarts_of_postgresql_under_concurrent_workflow_jobs_fail_no_run(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any,
        private_database: tuple[PrivatePostgres, str]) -> None:
    server, url = private_database
    path = write_quotas({"pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 10,
                                                "job_timeout": 90, "max_tries": 10}}})
    env = workflow_worker_env(url, AGENTWORKER_TASK_MODULES=f"{WORKER_MODULES},tests.restart_probes")
    workers = [spawn_worker(path, slot=slot, **env) for slot in range(2)]
    for worker in workers:
        await worker.wait_serving()
    tenants = [new_tenant("pgrestart") for _ in range(TENANTS)]
    database = await open_database(url)
    try:
        async with workflow_client(redis_url, path, database) as client:
            for tenant in tenants:
                await client.save_workflow(tenant, WORKFLOW)
            handles = [(tenant, await client.enqueue("execute_workflow", tenant_id=tenant, idempotency_key=f"r{n}",
                                                     payload={"workflow_id": "restartable", "input_data": {"n": n}}))
                       for tenant in tenants for n in range(RUNS_PER_TENANT)]

            async def started(count: int) -> bool:
                found = [key async for key in redis.scan_iter("rsprobe:*:fetch:runs")]
                return len(found) >= count

            # Restart while runs are under way: once most have begun, then twice more a second apart,
            # catching retried tries as well as first ones.
            await wait_for(lambda: started(len(handles) // 2), 60, what="half the runs to start")
            for _ in range(RESTARTS):
                await asyncio.to_thread(server.restart, "fast")
                await asyncio.sleep(1.0)

            results = [await handle.result(timeout=240) for _, handle in handles]
            assert [r["status"] for r in results] == ["completed"] * len(handles), results
            infos = [await handle.info() for _, handle in handles]
            tries = [info.job_try if info is not None else 0 for info in infos]
            assert all(info is not None and info.success for info in infos)
            assert sum(t > 1 for t in tries) > 0, f"no job was hit by the restarts (tries {tries})"

            executions: dict[str, int] = {}
            for (tenant, _), result in zip(handles, results, strict=True):
                run = await client.get_run(tenant, result["run_id"])
                assert run is not None and run.status == "completed" and run.error is None
                completed = [s.step_id for s in run.steps if s.status == "completed"]
                assert sorted(completed) == sorted(STEPS), "each step completed exactly once"
                assert {s.status for s in run.steps} <= {"completed", "interrupted"}, run.steps
                for step in STEPS:
                    key = probe_key(tenant, run.run_id, step, "executions" if step in EFFECTS else "runs")
                    executions[f"{run.run_id}:{step}"] = int(await redis.get(key) or 0)
                for effect in EFFECTS:
                    # The ledger handed every execution of this call the same idempotency key, so the
                    # receiving system delivered it once, and the step's recorded output is that delivery.
                    delivered = await redis.smembers(probe_key(tenant, run.run_id, effect, "keys"))
                    output = next(s.output for s in run.steps if s.step_id == effect and s.status == "completed")
                    assert delivered == {output["key"].encode()}, (effect, delivered, output)
            assert all(count >= 1 for count in executions.values())

            retrying = 0
            for tenant in tenants:
                events = await all_events(client, tenant)
                assert "job_failed" not in events and "workflow_run_failed" not in events, events
                retrying += events.count("job_retrying")
            assert retrying >= sum(t - 1 for t in tries)
    finally:
        await database.close()
    repeated = {k: v for k, v in executions.items() if v > 1}
    print(f"tries per job: {sorted(tries)}; steps executed more than once (a restart between the work and "
          f"its record): {repeated}")
