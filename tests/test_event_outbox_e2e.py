"""A step's promised events with real workers: exactly once in the tenant's stream when Redis goes away
while the step runs, and when the worker is killed before its commit or after its publish.

The three faults the old best-effort publish got wrong: an event published while Redis was down was
lost (the step returned ``notified`` all the same), and a worker killed between its publish and its
ledger commit published the event again on the retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from agentworker.client import AgentWorkerClient
from agentworker.db import Database
from agentworker.db import event_outbox as rows
from agentworker.events import Event
from tests.conftest import RedisServer, new_tenant, wait_for
from tests.workflow_helpers import WORKER_MODULES, workflow_client, workflow_worker_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

MODULES = f"{WORKER_MODULES},tests.outbox_probes"
QUOTAS: dict[str, Any] = {"pools": {"standard": {"shards": 1, "processes": 1, "concurrency": 4, "job_timeout": 90,
                                                 "max_tries": 5}}}


async def stream_events(client: AgentWorkerClient, tenant_id: str) -> list[Event]:
    """Every event in the tenant's stream (read until it has been quiet for a second)."""
    seen: list[Event] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(1.0) as quiet:
            async for event in client.events(tenant_id, since="0", block_ms=200):
                seen.append(event)
                quiet.reschedule(asyncio.get_running_loop().time() + 1.0)
    return seen


async def pending_events(database: Database, tenant_id: str) -> list[str]:
    async with database.tenant(tenant_id) as tx:
        return [body for _event_id, body in await rows.pending(tx)]


def assert_once(events: list[Event], run_id: str) -> None:
    """One ``workflow_notification`` for the run, and no workflow event id twice in the stream."""
    notes = [e for e in events if e.event == "workflow_notification" and e.data.get("run_id") == run_id]
    assert len(notes) == 1, [(e.event, e.event_id) for e in events]
    ids = [e.event_id for e in events if e.event.startswith("workflow_")]
    assert len(ids) == len(set(ids)), f"an event id is in the stream twice: {ids}"


async def test_redis_stopped_while_a_notify_step_runs_the_event_is_in_the_stream_once_after_it_returns(
        tmp_path: Path, write_quotas: Callable[..., Path], spawn_worker: Any, database_url: str,
        database: Database) -> None:
    server = RedisServer()
    server.start()
    admin = sync_redis.Redis.from_url(server.url)
    admin.config_set("save", "3600 1")  # the stop writes the dataset and the start reads it back (jobs survive)
    admin.close()
    path = write_quotas(QUOTAS)
    worker = spawn_worker(path, **workflow_worker_env(database_url, AGENTWORKER_TASK_MODULES=MODULES,
                                                      AGENTWORKER_REDIS_URL=server.url))
    reached, release = tmp_path / "reached", tmp_path / "release"
    tenant = new_tenant("outage")
    try:
        await worker.wait_serving()
        async with workflow_client(server.url, path, database) as client:
            await client.save_workflow(tenant, {"id": "tell", "steps": [
                {"id": "wait", "kind": "tool", "tool": "wait_for_file",
                 "args": {"reached": str(reached), "release": str(release)}},
                {"id": "tell", "kind": "tool", "tool": "notify", "depends_on": ["wait"], "args": {"text": "hi"}}]})
            handle = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "tell"})
            await wait_for(reached.exists, 30, what="the run to reach its first step")

            await asyncio.to_thread(server.stop)
            release.touch()
            # The step ran and recorded its event; Redis is down, so the event waits in PostgreSQL.
            await wait_for(lambda: _any_notification(database, tenant), 30, what="the notification in the outbox")
            await asyncio.sleep(1.0)
            await asyncio.to_thread(server.start)

            result = await handle.result(timeout=90)
            assert result["status"] == "completed", result
            await wait_for(lambda: _outbox_empty(database, tenant), 30, what="the outbox to empty")
            assert_once(await stream_events(client, tenant), result["run_id"])
        assert "events not published yet; retrying until Redis takes them" in worker.log()
    finally:
        worker.stop()
        server.cleanup()


async def test_a_worker_killed_inside_the_effect_before_its_commit_leaves_one_event(
        tmp_path: Path, redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any, database_url: str,
        database: Database) -> None:
    path = write_quotas(QUOTAS)
    env = workflow_worker_env(database_url, AGENTWORKER_TASK_MODULES=MODULES, AGENTWORKER_JOB_LEASE_TTL="4")
    workers = [spawn_worker(path, slot=slot, **env) for slot in range(2)]
    marker = tmp_path / "killed"
    tenant = new_tenant("killcommit")
    for worker in workers:
        await worker.wait_serving()
    async with workflow_client(redis_url, path, database) as client:
        await client.save_workflow(tenant, {"id": "die", "steps": [
            {"id": "tell", "kind": "tool", "tool": "notify_then_die", "args": {"marker": str(marker)}}]})
        handle = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "die"})
        result = await handle.result(timeout=90)
        assert result["status"] == "completed", result
        assert marker.exists() and [w.proc.poll() for w in workers].count(-signal.SIGKILL) == 1
        await wait_for(lambda: _outbox_empty(database, tenant), 30, what="the outbox to empty")
        assert_once(await stream_events(client, tenant), result["run_id"])


async def test_a_worker_killed_after_its_publish_before_its_outbox_row_is_deleted_leaves_one_event(
        tmp_path: Path, redis_url: str, write_quotas: Callable[..., Path], spawn_worker: Any, database_url: str,
        database: Database) -> None:
    path = write_quotas(QUOTAS)
    marker = tmp_path / "killed"
    env = workflow_worker_env(database_url, AGENTWORKER_TASK_MODULES=MODULES, AGENTWORKER_JOB_LEASE_TTL="4",
                              OUTBOX_PROBE_DIE_AFTER_PUBLISH=str(marker))
    workers = [spawn_worker(path, slot=slot, **env) for slot in range(2)]
    tenant = new_tenant("killpublish")
    for worker in workers:
        await worker.wait_serving()
    async with workflow_client(redis_url, path, database) as client:
        await client.save_workflow(tenant, {"id": "tell", "steps": [
            {"id": "tell", "kind": "tool", "tool": "notify", "args": {"text": "hi"}},
            {"id": "after", "kind": "transform", "depends_on": ["tell"], "template": {"done": True}}]})
        handle = await client.enqueue("execute_workflow", tenant_id=tenant, payload={"workflow_id": "tell"})
        result = await handle.result(timeout=90)
        assert result["status"] == "completed", result
        assert marker.exists() and [w.proc.poll() for w in workers].count(-signal.SIGKILL) == 1
        # The dead worker's row is relayed by the survivor (rows older than RELAY_AFTER_S): the stream
        # already has that id, so the repeat is dropped and the row deleted.
        await wait_for(lambda: _outbox_empty(database, tenant), 60, what="the relay to clear the outbox")
        assert_once(await stream_events(client, tenant), result["run_id"])


async def _any_notification(database: Database, tenant_id: str) -> bool:
    return any('"workflow_notification"' in body for body in await pending_events(database, tenant_id))


async def _outbox_empty(database: Database, tenant_id: str) -> bool:
    return not await pending_events(database, tenant_id)
