"""The tenant store with real supervisors: a stored limit changed with jobs in flight applies in the
workers of two supervisors at once, and a plan moving a tenant to another pool moves its queued jobs."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from agentworker import keys
from tests.conftest import ROOT, make_client, new_tenant, wait_for, worker_env
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory

QUOTAS = {
    "default_pool": "standard",
    "pools": {"standard": {"shards": 1, "processes": 1, "concurrency": 8, "job_timeout": 60},
              "premium": {"shards": 1, "processes": 1, "concurrency": 8, "job_timeout": 60}},
    "plans": {"pro": {"pool": "premium", "max_concurrency": 8}},
    "tenant_defaults": {"max_concurrency": 4},
}


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


async def _running(redis: Redis, tenant: str) -> int:
    return int(await redis.get(f"probe:tenant:{tenant}:running") or 0)


async def _cli(redis_url: str, database_url: str, config: Path, *args: str) -> tuple[int, str]:
    env = worker_env(redis_url, AGENTWORKER_DATABASE_URL=database_url)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentworker", "--config", str(config), *args, env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode()


@pytest.mark.timeout(180)
async def test_a_stored_cap_raised_with_jobs_in_flight_applies_across_two_supervisors_and_a_plan_moves_jobs(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str, database_url: str, database: object) -> None:
    config = write_quotas(QUOTAS)
    env = {"AGENTWORKER_DATABASE_URL": database_url}
    first = supervisors(config, name="first", **env)
    second = supervisors(config, name="second", **env)
    await first.wait_ready()
    await second.wait_ready()
    tenant = new_tenant("acme")
    async with make_client(redis_url, config, database_url=database_url) as client:
        await client.set_tenant(tenant, overrides={"max_concurrency": 2}, by="test")
        ids = [(await client.enqueue("probe_sleep", tenant, {"seconds": 3, "group": tenant})).job_id
               for _ in range(12)]
        await wait_for(lambda: _at(redis, tenant, 2), 30, what="2 jobs of the tenant running")
        await asyncio.sleep(1.0)  # 4 slots per process, 2 processes: only the stored cap holds it at 2
        assert int(await redis.get(f"probe:tenant:{tenant}:max") or 0) == 2

        started = time.monotonic()
        code, out = await _cli(redis_url, database_url, config, "tenants", "set", tenant, "--max-concurrency", "6",
                               "--by", "test:upgrade")
        assert code == 0, out
        cli_done = time.monotonic()
        await wait_for(lambda: _at(redis, tenant, 6), 30, what="6 jobs of the tenant running", interval=0.02)
        print(f"cap 2 -> 6: 6 running {time.monotonic() - cli_done:.3f}s after the command returned "
              f"({cli_done - started:.3f}s for the command itself)")
        for job_id in ids:
            await client.job(job_id).result(timeout=60)
        assert int(await redis.get(f"probe:tenant:{tenant}:max") or 0) == 6

        # a plan that moves the tenant to another pool: its 100 queued jobs move with it and all run once
        mover = new_tenant("mover")
        await client.set_tenant(mover, overrides={"max_pending": 1000}, by="test")
        queued = [(await client.enqueue("probe_count", mover, {"message": str(i)}, defer=3)).job_id
                  for i in range(100)]
        old_queue = client.route(mover).tenant_queue
        assert await redis.zcard(old_queue) == 100
        view = await client.set_tenant(mover, plan="pro", by="billing")
        assert view.pool == "premium"
        assert await redis.zcard(old_queue) == 0
        results = [await client.job(job_id).result(timeout=60) for job_id in queued]
        assert {r["queue"] for r in results} == {keys.queue("premium", 0)}
        runs = {k.decode(): int(v) for k, v in (await redis.hgetall("probe:runs")).items()}
        assert all(runs[job_id] == 1 for job_id in queued)
        history = await client.tenant_history(mover)
        assert [(c.changed_by, c.new) for c in history] == [
            ("billing", {"plan": "pro", "overrides": {"max_pending": 1000}}),
            ("test", {"plan": None, "overrides": {"max_pending": 1000}})]


async def _at(redis: Redis, tenant: str, wanted: int) -> bool:
    return await _running(redis, tenant) >= wanted
