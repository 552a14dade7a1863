"""Polling sources: a local HTTP feed, a cursor in PostgreSQL, new items only, backoff on failure."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentworker.db import Database
from agentworker.db.schedules import due_schedules
from agentworker.logs import get_logger
from agentworker.schedules.polling import PollSourceFailed, poll_once
from tests.conftest import wait_for
from tests.fake_feed import FakeFeed
from tests.schedule_helpers import schedule_worker_env
from tests.workflow_helpers import submitter_of, workflow_client

ON_ITEM = {"id": "on-item", "steps": [{"id": "take", "kind": "transform",
                                       "template": {"item": "{{ input.item.id }}"}}]}


@pytest.fixture
async def feed(loopback_peers_allowed: None) -> AsyncIterator[FakeFeed]:
    server = FakeFeed()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def poll_schedule(feed: FakeFeed, **source: Any) -> dict[str, Any]:
    return {"id": "feed", "cron": "* * * * * *", "missed_policy": "run_once", "poll": {
        "url": feed.url, "workflow_id": "on-item", "headers": {"Authorization": "Bearer feed-token-123"}, **source}}


async def test_a_failing_source_backs_off_exponentially_up_to_its_cap_and_recovers(
        redis_url: str, quota_file: Path, database: Database, feed: FakeFeed,
        schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant("poll")
    log = get_logger("test")
    feed.add("a", "b", "c")
    feed.failing = True
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, ON_ITEM)  # a schedule may only name a saved workflow
        await client.save_schedule(tenant, poll_schedule(feed, backoff_initial_seconds=2, backoff_max_seconds=5))

        async def poll_and_backoff() -> tuple[int, float]:
            with pytest.raises(PollSourceFailed, match="the source answered HTTP 500"):
                await poll_once(database, submitter_of(client), tenant, "feed", log)
            async with database.tenant(tenant) as tx:
                row = await tx.fetchrow("SELECT failures, extract(epoch FROM backoff_until - updated_at) AS wait "
                                        "FROM agentworker.schedules WHERE schedule_id = 'feed'")
                await tx.execute("UPDATE agentworker.schedules SET backoff_until = now() - interval '1 second'")
            assert row is not None
            return row["failures"], round(row["wait"])

        assert await poll_and_backoff() == (1, 2)
        assert await poll_and_backoff() == (2, 4)
        assert await poll_and_backoff() == (3, 5), "capped"
        state = await client.get_schedule(tenant, "feed")
        assert state is not None and state["last_error"] == "the source answered HTTP 500"

        # While backing off, a poll job that was already queued does not call the source.
        async with database.tenant(tenant) as tx:
            await tx.execute("UPDATE agentworker.schedules SET backoff_until = now() + interval '1 hour'")
        calls = len(feed.requests)
        assert (await poll_once(database, submitter_of(client), tenant, "feed", log)).status == "backing_off"
        assert len(feed.requests) == calls
        # ... and no poll is dispatched.
        soon = datetime.now(UTC) + timedelta(minutes=5)
        assert all(d.tenant_id != tenant for d in await due_schedules(database, soon, 1000))

        feed.failing = False
        async with database.tenant(tenant) as tx:
            await tx.execute("UPDATE agentworker.schedules SET backoff_until = NULL")
        result = await poll_once(database, submitter_of(client), tenant, "feed", log)
        assert result.status == "ok" and result.new_items == 3 and result.cursor == "2"
        assert [r["cursor"] for r in feed.requests[-2:]] == [None, "2"]
        assert {r["authorization"] for r in feed.requests} == {"Bearer feed-token-123"}
        state = await client.get_schedule(tenant, "feed")
        assert state is not None and (state["failures"], state["backoff_until"], state["poll_cursor"]) == (0, None, "2")
        again = await poll_once(database, submitter_of(client), tenant, "feed", log)
        assert again.new_items == 0 and feed.requests[-1]["cursor"] == "2", "the last page is read again, nothing new"


@pytest.mark.slow
async def test_only_new_items_start_runs_across_worker_restarts(
        redis_url: str, quota_file: Path, database_url: str, database: Database, feed: FakeFeed,
        spawn_worker: Any, schedule_tenant: Callable[..., str]) -> None:
    tenant = schedule_tenant("poll")
    feed.add("a", "b", "c")
    env = schedule_worker_env(database_url)
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, ON_ITEM)
        await client.save_schedule(tenant, poll_schedule(feed))

        async def items_run() -> list[str]:
            found = await client.list_runs(tenant, workflow_id="on-item", status="completed", limit=100)
            return sorted(run.output["take"]["item"] for run in found)

        async def runs_for(expected: list[str]) -> bool:
            return await items_run() == expected

        first = spawn_worker(quota_file, slot=0, **env)
        await first.wait_serving()
        await wait_for(lambda: runs_for(["a", "b", "c"]), 60, what="runs for a, b and c", interval=0.2)
        first.signal(signal.SIGTERM)
        assert await first.wait_exit() == 0

        feed.add("d", "e", "f")
        before_restart = len(feed.requests)
        second = spawn_worker(quota_file, slot=1, **env)
        await second.wait_serving()
        await wait_for(lambda: runs_for(["a", "b", "c", "d", "e", "f"]), 60, what="runs for d, e and f",
                       interval=0.2)
        assert feed.requests[before_restart]["cursor"] == "2", "the cursor survived the restart"
        settled = len(feed.requests) + 3
        await wait_for(lambda: len(feed.requests) >= settled, 30, what="three more polls")
        assert await items_run() == ["a", "b", "c", "d", "e", "f"], "each item started its workflow once"
        runs = await client.list_runs(tenant, workflow_id="on-item", limit=100)
        assert len(runs) == 6 and {run.trigger for run in runs} == {"poll"}
    assert "feed-token-123" not in first.log() + second.log()
