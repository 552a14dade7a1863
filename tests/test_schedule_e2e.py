"""Schedules end to end: two real supervisors (``agentworker run``, two worker processes each) on one
Redis and one PostgreSQL, started and stopped while per-second schedules fire."""

from __future__ import annotations

import signal
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker.db import Database
from tests.conftest import wait_for
from tests.schedule_helpers import schedule_worker_env, tick_schedule, ticks
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory
from tests.workflow_helpers import workflow_client

pytestmark = pytest.mark.slow


@pytest.fixture
def start_supervisor(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


def assert_each_due_time_once(recorded: list[str], step_seconds: int) -> None:
    """Every due time from the first to the last recorded one, each exactly once."""
    times = sorted(datetime.fromisoformat(value) for value in recorded)
    assert len(set(times)) == len(times), f"a due time ran twice: {sorted(recorded)}"
    expected = [times[0] + timedelta(seconds=step_seconds * n) for n in range(len(times))]
    assert times == expected, f"a due time was skipped: {sorted(recorded)}"


async def test_two_supervisors_starting_and_stopping_dispatch_each_due_time_exactly_once(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], database_url: str, database: Database,
        start_supervisor: Callable[..., SupervisorProcess], schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant()
    path = write_quotas({"pools": {"standard": {"shards": 2, "processes": 2, "concurrency": 5}}})
    env = schedule_worker_env(database_url)
    async with workflow_client(redis_url, path, database) as client:
        await client.save_schedule(tenant, tick_schedule("every-second", "* * * * * *"))
        await client.save_schedule(tenant, tick_schedule("every-2s", "*/2 * * * * *"))

        async def more_ticks(count: int) -> None:
            target = len(await ticks(redis, tenant, "every-second")) + count

            async def reached() -> bool:
                return len(await ticks(redis, tenant, "every-second")) >= target

            await wait_for(reached, 60, what=f"{count} more due times", interval=0.1)

        first = start_supervisor(path, name="a", **env)
        await first.wait_ready()
        await more_ticks(2)
        second = start_supervisor(path, name="b", **env)
        await second.wait_ready()
        await more_ticks(3)  # four dispatchers in two supervisors
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0
        await more_ticks(3)  # the survivor alone

        stopped: dict[str, Any] = {}
        for schedule in ("every-second", "every-2s"):
            stopped[schedule] = (await client.disable_schedule(tenant, schedule))["dispatched_count"]

        async def all_ran() -> bool:
            counts = {s: len(await ticks(redis, tenant, s)) for s in stopped}
            return counts == stopped

        await wait_for(all_ran, 30, what="every dispatched run to finish", interval=0.1)
    assert stopped["every-second"] >= 8
    assert_each_due_time_once(await ticks(redis, tenant, "every-second"), 1)
    assert_each_due_time_once(await ticks(redis, tenant, "every-2s"), 2)


@pytest.mark.timeout(120)
async def test_a_schedule_whose_jobs_fail_shows_it_and_a_success_clears_it(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], database_url: str, database: Database,
        start_supervisor: Callable[..., SupervisorProcess], schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant()
    await redis.set(f"probe:fail:{tenant}", 1)
    path = write_quotas({"pools": {"standard": {"shards": 1, "processes": 1, "concurrency": 5, "max_tries": 1}}})
    async with workflow_client(redis_url, path, database) as client:
        await client.save_schedule(tenant, {"id": "nightly", "cron": "* * * * * *", "task": "failing_tick",
                                            "payload": {"due_at": "{{ due_at }}"}})
        sup = start_supervisor(path, **schedule_worker_env(database_url))
        await sup.wait_ready()

        async def failed_twice() -> bool:
            schedule = await client.get_schedule(tenant, "nightly")
            return schedule is not None and schedule["failures"] >= 2

        await wait_for(failed_twice, 60, what="the schedule to show its failing jobs", interval=0.2)
        schedule = await client.get_schedule(tenant, "nightly")
        assert schedule is not None
        assert schedule["last_error"].startswith(f"job {tenant}:failing_tick:sched-nightly-")
        assert "RuntimeError: the report for" in schedule["last_error"]

        await redis.delete(f"probe:fail:{tenant}")  # fixed: its next job completes

        async def cleared() -> bool:
            schedule = await client.get_schedule(tenant, "nightly")
            return schedule is not None and schedule["failures"] == 0 and schedule["last_error"] is None

        await wait_for(cleared, 60, what="a completed job to clear the failures", interval=0.2)
