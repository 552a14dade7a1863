"""The dispatcher against real PostgreSQL and Redis, driven by a clock of the test's own, enqueuing through
the job submitter (as in a worker) on the client's Redis and config: the client's
schedule API, downtime under both missed-run policies, dispatchers whose clocks disagree, a dispatcher
dying between the enqueue and the commit, and a tenant over its quota."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker.client import ScheduleNotFound
from agentworker.db import Database
from agentworker.schedules import InvalidSchedule
from agentworker.schedules.dispatcher import Dispatcher, job_key
from agentworker.submit import JobSubmitter, Submitted
from tests.schedule_helpers import future_minute, set_next_due, tick_schedule
from tests.workflow_helpers import submitter_of, workflow_client


async def jobs_of(redis: Redis, tenant: str) -> list[str]:
    """The keys (``sched-...``) of the tenant's jobs waiting in Redis, sorted."""
    found = [key.decode().rsplit(":", 1)[1] for key in await redis.keys(f"arq:job:{tenant}:*")]
    return sorted(found)


def keys_for(schedule_id: str, *dues: datetime) -> list[str]:
    return sorted(job_key(schedule_id, due) for due in dues)


async def test_the_client_saves_lists_enables_disables_and_deletes_schedules(
        redis_url: str, quota_file: Path, database: Database, schedule_tenant: Callable[..., str]) -> None:
    tenant, other = schedule_tenant(), schedule_tenant()
    async with workflow_client(redis_url, quota_file, database) as client:
        saved = await client.save_schedule(tenant, tick_schedule("every-5s", "*/5 * * * * *"))
        assert saved["kind"] == "task" and saved["enabled"] and saved["dispatched_count"] == 0
        due = datetime.fromisoformat(saved["next_due_at"])
        assert due.second % 5 == 0 and due > datetime.now(due.tzinfo) - timedelta(seconds=1)
        await client.save_workflow(tenant, {"id": "w", "steps": [{"id": "a", "kind": "transform",
                                                                    "template": {"x": 1}}]})
        await client.save_schedule(tenant, {"id": "feed", "cron": "*/10 * * * *", "poll": {
            "url": "https://feed.example/items", "workflow_id": "w", "headers": {"Authorization": "Bearer s3cret"}}})
        listed = await client.list_schedules(tenant)
        assert [s["id"] for s in listed] == ["every-5s", "feed"]
        assert listed[1]["spec"]["poll"]["headers"] == {"Authorization": "***"} and "s3cret" not in repr(listed)
        assert await client.list_schedules(other) == [] and await client.get_schedule(other, "feed") is None

        again = await client.save_schedule(tenant, tick_schedule("every-5s", "*/5 * * * * *"))
        assert again["next_due_at"] == saved["next_due_at"], "re-saving unchanged keeps the pending due time"
        disabled = await client.disable_schedule(tenant, "every-5s")
        assert not disabled["enabled"] and disabled["next_due_at"] is None
        enabled = await client.enable_schedule(tenant, "every-5s")
        assert enabled["enabled"] and enabled["next_due_at"] is not None

        with pytest.raises(InvalidSchedule, match=r"^invalid schedule 'x': invalid cron expression '\* \* 99 \* \*'"):
            await client.save_schedule(tenant, tick_schedule("x", "* * 99 * *"))
        with pytest.raises(InvalidSchedule, match=r"^invalid schedule 'x': unknown time zone 'Europe/Nowhere'"):
            await client.save_schedule(tenant, tick_schedule("x", "* * * * *", timezone="Europe/Nowhere"))
        assert await client.get_schedule(tenant, "x") is None
        with pytest.raises(ScheduleNotFound, match="has no schedule 'nope'"):
            await client.enable_schedule(tenant, "nope")
        assert await client.delete_schedule(tenant, "feed") and not await client.delete_schedule(tenant, "feed")
        assert [s["id"] for s in await client.list_schedules(tenant)] == ["every-5s"]


async def test_downtime_skip_runs_none_of_the_missed_due_times_and_run_once_runs_exactly_one(
        redis: Redis, redis_url: str, quota_file: Path, database: Database,
        schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant()
    start = future_minute()
    async with workflow_client(redis_url, quota_file, database) as client:
        for policy in ("skip", "run_once"):
            await client.save_schedule(tenant, tick_schedule(policy.replace("_", "-"), "0 * * * * *",
                                                             missed_policy=policy, misfire_grace_seconds=30))
            await set_next_due(database, tenant, policy.replace("_", "-"), start)
        dispatcher = Dispatcher(database, submitter_of(client))
        minute = timedelta(minutes=1)

        first = await dispatcher.dispatch_once(now=start + timedelta(seconds=1))
        assert first.dispatched >= 2
        # Every dispatcher down from just after 10:00 to 10:05:40: 10:01 ... 10:05 are missed.
        back = await dispatcher.dispatch_once(now=start + 5 * minute + timedelta(seconds=40))
        assert back.missed >= 9
        after = await dispatcher.dispatch_once(now=start + 6 * minute + timedelta(seconds=1))
        assert after.dispatched >= 2

        assert [k for k in await jobs_of(redis, tenant) if k.startswith("sched-skip-")] == \
            keys_for("skip", start, start + 6 * minute), "none of the missed due times ran"
        assert [k for k in await jobs_of(redis, tenant) if k.startswith("sched-run-once-")] == \
            keys_for("run-once", start, start + 5 * minute, start + 6 * minute), "exactly one ran for all of them"
        skip, once = await client.get_schedule(tenant, "skip"), await client.get_schedule(tenant, "run-once")
        assert skip is not None and once is not None
        assert (skip["dispatched_count"], skip["missed_count"]) == (2, 5)
        assert (once["dispatched_count"], once["missed_count"]) == (3, 4)
        assert once["next_due_at"] == (start + 7 * minute).isoformat()


async def test_dispatchers_with_clocks_a_second_apart_dispatch_each_due_time_once(
        redis: Redis, redis_url: str, quota_file: Path, database: Database,
        schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant()
    start = future_minute()
    clients = [workflow_client(redis_url, quota_file, database) for _ in range(3)]
    try:
        await clients[0].save_schedule(tenant, tick_schedule("tick", "* * * * * *"))
        await clients[0].save_schedule(tenant, tick_schedule("even", "*/2 * * * * *"))
        for schedule in ("tick", "even"):
            await set_next_due(database, tenant, schedule, start)
        skews = (-1.0, 0.0, 1.0)
        dispatchers = [(Dispatcher(database, submitter_of(client)), skew)
                       for client, skew in zip(clients, skews, strict=True)]
        created, duplicates = [], 0
        for tenth in range(36):  # 3.5 s of passes, all three dispatchers at once each time
            at = start + timedelta(seconds=tenth / 10)
            reports = await asyncio.gather(*(d.dispatch_once(now=at + timedelta(seconds=skew))
                                             for d, skew in dispatchers))
            for report in reports:
                created += report.job_ids
                duplicates += report.duplicates
    finally:
        for client in clients:
            await client.close()
    # The fastest clock reached start + 4.5 s: due times start+0 ... start+4.
    seconds = [start + timedelta(seconds=n) for n in range(5)]
    assert sorted(k.rsplit(":", 1)[1] for k in created) == sorted(
        keys_for("tick", *seconds) + keys_for("even", *seconds[::2]))
    assert duplicates == 0, "no dispatcher even re-enqueued another's due time"
    assert await jobs_of(redis, tenant) == sorted(keys_for("tick", *seconds) + keys_for("even", *seconds[::2]))


class _DiesAfterEnqueue(JobSubmitter):
    async def submit(self, *args: Any, **kwargs: Any) -> Submitted:
        await super().submit(*args, **kwargs)
        raise ConnectionResetError("the dispatcher died before its commit")


async def test_a_dispatcher_dying_between_enqueue_and_commit_leaves_a_no_op_for_the_next(
        redis: Redis, redis_url: str, quota_file: Path, database: Database,
        schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant()
    start = future_minute()
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_schedule(tenant, tick_schedule("tick", "0 * * * * *"))
        await set_next_due(database, tenant, "tick", start)
        dying = Dispatcher(database, _DiesAfterEnqueue(client.redis, client.config))
        with pytest.raises(ConnectionResetError):
            await dying.dispatch_once(now=start)
        stuck = await client.get_schedule(tenant, "tick")
        assert stuck is not None and stuck["next_due_at"] == start.isoformat(), "rolled back: not moved on"
        report = await Dispatcher(database, submitter_of(client)).dispatch_once(now=start + timedelta(seconds=1))
        assert (report.dispatched, report.duplicates) == (0, 1)
        moved = await client.get_schedule(tenant, "tick")
        assert moved is not None and moved["next_due_at"] == (start + timedelta(minutes=1)).isoformat()
        assert await jobs_of(redis, tenant) == keys_for("tick", start)


async def test_a_tenant_over_max_pending_is_held_back_then_dispatched(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], database: Database,
        schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant()
    path = write_quotas({"pools": {"standard": {"shards": 2}}, "tenants": {tenant: {"max_pending": 1}}})
    start = future_minute()
    async with workflow_client(redis_url, path, database) as client:
        await client.save_schedule(tenant, tick_schedule("tick", "0 * * * * *"))
        await set_next_due(database, tenant, "tick", start)
        await client.enqueue("echo", tenant, {"message": "fills the quota"})
        dispatcher = Dispatcher(database, submitter_of(client))
        held = await dispatcher.dispatch_once(now=start)
        assert (held.held, held.dispatched) == (1, 0)
        row = await client.get_schedule(tenant, "tick")
        assert row is not None and "max_pending" in row["last_error"]
        assert row["backoff_until"] == (start + timedelta(seconds=5)).isoformat()
        assert (await dispatcher.dispatch_once(now=start + timedelta(seconds=2))).due == 0, "held until then"
        await redis.delete(f"agentworker:pending:{tenant}")  # the pending job was taken
        later = await dispatcher.dispatch_once(now=start + timedelta(seconds=6))
        assert later.dispatched == 1
        assert await jobs_of(redis, tenant) != [] and job_key("tick", start) in await jobs_of(redis, tenant)
