"""Events a workflow promises: recorded with the change they report, published after the commit, once.

A workflow's events (``workflow_run_*``, ``workflow_step_*``, ``workflow_waiting_for_approval``) and the
events a side-effecting tool promises (``notify``'s ``workflow_notification``, through
:meth:`~agentworker.tools.registry.ToolContext.emit_once`) are *promised*, not just published:

1. :meth:`EventOutbox.promise` writes the event (its final JSON, with a stable id from
   :func:`~agentworker.events.stable_event_id` and its ``ts``) to ``agentworker.event_outbox`` in the
   transaction that records what it reports: the step row, the run's status, the ledger's effect. The
   event exists if and only if that change committed.
2. After the commit it is queued on the process's :class:`~agentworker.events.EventPublisher` (in order
   with the process's other events) through ``publish_once.lua``: the tenant's stream gets one entry per
   event id, however often it is published.
3. :data:`CONFIRM_AFTER_S` seconds after Redis took it, its row is deleted if Redis still has its id
   (in batches, in the background); if Redis lost it meanwhile (a restart without its last second of
   AOF, a failover to a lagging replica), it is published again.

If Redis is down, the process keeps retrying its events in order, with backoff, until Redis takes
them (up to :data:`MAX_RETAINED` in memory; beyond that, and when the process dies before publishing or
deleting, the rows wait in PostgreSQL). The *relay* (:func:`relay_forever`, in every worker process, one
at a time under a Redis lock) publishes the rows older than :data:`RELAY_AFTER_S` seconds: delivery is at
least once, and the stream and the channel see each event once (a repeat of an id already in the stream
is dropped by the script). An event published late this way keeps its id and ``ts``; it can arrive after
events that happened later.

What Redis can still lose: a promised event whose row was deleted (confirmed) and that Redis then
loses — only if Redis loses writes older than :data:`CONFIRM_AFTER_S` seconds, which AOF ``everysec``
does not (README, "Redis persistence") — and the events the relay published within a second of a
Redis host crash (it deletes rows right after publishing them).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from agentworker import keys
from agentworker.db import event_outbox as rows
from agentworker.db.database import Database, DatabaseError, TenantTransaction
from agentworker.events import EventPublisher
from agentworker.logs import get_logger
from agentworker.redis_lock import RedisLock, every_interval

log = get_logger("agentworker.event_outbox")

#: events kept in memory for retrying while Redis is down; older ones are left to the relay
MAX_RETAINED = 10_000
#: published events whose rows are deleted together, at most
DELETE_BATCH = 500
#: seconds between the deletions of published rows (they batch up meanwhile)
DELETE_EVERY_S = 0.2
#: a published event's row is deleted this long after, once Redis still has its id (AOF everysec: 1 s)
CONFIRM_AFTER_S = 3.0
#: a row this old is the relay's to publish (its process died, or is still waiting for Redis)
RELAY_AFTER_S = 10.0
#: seconds between one process's attempts to relay (times a random factor in [0.5, 1]); the lock is held as long
RELAY_INTERVAL_S = 5.0
#: rows the relay reads per query
RELAY_PAGE = 200
_RETRY_FIRST_S, _RETRY_MAX_S = 0.1, 5.0

_Pending = tuple[str, str, str]  # (tenant, event id, body)


class EventOutbox:
    """One per worker process: promises events in transactions and publishes them after the commit."""

    def __init__(self, publisher: EventPublisher, database: Callable[[], Awaitable[Database]]) -> None:
        self.publisher = publisher
        self._database = database
        self._retry: collections.deque[_Pending] = collections.deque()
        self._retrier: asyncio.Task[None] | None = None
        self._published: list[tuple[float, _Pending]] = []  # (loop time published, event): rows to delete
        self._deleter: asyncio.Task[None] | None = None
        self._dropped = 0

    async def promise(self, tx: TenantTransaction, event: str, data: dict[str, Any], event_id: str) -> None:
        """Record ``event`` in ``tx`` and publish it once ``tx`` commits. ``event_id`` must name this
        event wherever it is made again (a retried step, a re-run after a crash): the stream keeps one."""
        _record, body = self.publisher.prepare(tx.tenant_id, event, data, event_id)
        await rows.record(tx, event_id, body)
        tenant_id = tx.tenant_id
        tx.after_commit(lambda: self._publish(tenant_id, event_id, body))

    def _publish(self, tenant_id: str, event_id: str, body: str) -> None:
        if self._retry:  # keep the order: behind the events still waiting for Redis
            self._retain((tenant_id, event_id, body))
            return
        written = self.publisher.publish_once_nowait(tenant_id, event_id, body)
        written.add_done_callback(lambda done: self._after_publish(done, (tenant_id, event_id, body)))

    def _after_publish(self, written: asyncio.Future[bool], event: _Pending) -> None:
        if written.cancelled() or written.exception() is not None:
            self._retain(event)
        else:
            self._forget_later(event)

    def _retain(self, event: _Pending) -> None:
        if len(self._retry) >= MAX_RETAINED:
            self._retry.popleft()  # still in PostgreSQL: the relay publishes it
            self._dropped += 1
            if self._dropped == 1:
                log.warning("events waiting for Redis beyond what is kept in memory; the outbox relay will "
                            "publish the rest from PostgreSQL", kept=MAX_RETAINED)
        self._retry.append(event)
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._retry_until_published(),
                                                                   name="event-outbox-retry")

    async def _retry_until_published(self) -> None:
        delay = _RETRY_FIRST_S
        failing = False
        while self._retry:
            await asyncio.sleep(delay)
            batch = [self._retry[i] for i in range(min(len(self._retry), EventPublisher.MAX_BATCH))]
            writes = [self.publisher.publish_once_nowait(t, i, b) for t, i, b in batch]
            outcomes = await asyncio.gather(*writes, return_exceptions=True)
            sent = [event for event, outcome in zip(batch, outcomes, strict=True)
                    if not isinstance(outcome, BaseException)]
            for event in sent:
                with contextlib.suppress(ValueError):  # dropped meanwhile (over MAX_RETAINED)
                    self._retry.remove(event)
                self._forget_later(event)
            if len(sent) < len(batch):
                error = next(o for o in outcomes if isinstance(o, BaseException))
                if not failing:
                    log.warning("events not published yet; retrying until Redis takes them",
                                waiting=len(self._retry), error=str(error) or repr(error))
                failing = True
                delay = min(delay * 2, _RETRY_MAX_S)
            else:
                delay = _RETRY_FIRST_S
        if failing:
            log.info("waiting events published")
        self._dropped = 0

    def _forget_later(self, event: _Pending) -> None:
        self._published.append((asyncio.get_running_loop().time(), event))
        if self._deleter is None or self._deleter.done():
            self._deleter = asyncio.get_running_loop().create_task(self._delete_published(),
                                                                   name="event-outbox-delete")

    async def _delete_published(self) -> None:
        """Delete the rows of published events once Redis has surely persisted them.

        A row is kept :data:`CONFIRM_AFTER_S` seconds after its publication (AOF ``everysec`` writes to
        disk every second), then deleted if its id is still in Redis's published ids; if it is not (Redis
        restarted without its last second, or failed over to a replica that lagged), it is published
        again and checked later. With PostgreSQL down the rows stay; the relay publishes them again (the
        stream drops the repeat) and deletes them."""
        loop = asyncio.get_running_loop()
        while self._published:
            wait = self._published[0][0] + CONFIRM_AFTER_S - loop.time()
            await asyncio.sleep(max(wait, DELETE_EVERY_S))
            now = loop.time()
            ready = [event for at, event in self._published[:DELETE_BATCH] if now - at >= CONFIRM_AFTER_S]
            del self._published[:len(ready)]
            try:
                kept, lost = await self._still_in_redis(ready)
                if lost:
                    log.warning("published events missing from Redis (it lost its last writes); publishing "
                                "them again", count=len(lost))
                    for event in lost:
                        self._publish(*event)
                await forget(await self._database(), [(tenant, event_id) for tenant, event_id, _body in kept])
            except (DatabaseError, RedisError, OSError) as exc:
                log.info("published events not deleted from the outbox yet; the relay will", count=len(ready),
                         error=str(exc) or repr(exc))
                return

    async def _still_in_redis(self, events: list[_Pending]) -> tuple[list[_Pending], list[_Pending]]:
        """Split ``events`` into those whose id Redis has in its published ids, and those it lost."""
        by_tenant: dict[str, list[_Pending]] = collections.defaultdict(list)
        for event in events:
            by_tenant[event[0]].append(event)
        kept: list[_Pending] = []
        lost: list[_Pending] = []
        async with self.publisher.redis.pipeline(transaction=False) as pipe:
            for tenant_id, group in by_tenant.items():
                pipe.zmscore(keys.published_event_ids(tenant_id), [event_id for _t, event_id, _b in group])
            replies = await pipe.execute()
        for group, scores in zip(by_tenant.values(), replies, strict=True):
            for event, score in zip(group, scores, strict=True):
                (lost if score is None else kept).append(event)
        return kept, lost

    async def aclose(self) -> None:
        """At shutdown: give the waiting events and deletions one last short chance (never raises)."""
        for task in (self._retrier, self._deleter):
            if task is not None and not task.done():
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await asyncio.wait_for(asyncio.shield(task), timeout=0.5)
                task.cancel()
        # What is left stays in the outbox: the relay publishes it again (the stream drops a repeat).

    @property
    def waiting(self) -> int:
        """Events this process holds for publishing (Redis was down)."""
        return len(self._retry)


async def forget(database: Database, published: list[tuple[str, str]]) -> None:
    by_tenant: dict[str, list[str]] = collections.defaultdict(list)
    for tenant_id, event_id in published:
        by_tenant[tenant_id].append(event_id)
    for tenant_id, event_ids in by_tenant.items():
        async with database.tenant(tenant_id) as tx:
            await rows.forget(tx, event_ids)


async def relay_stale(database: Database, publisher: EventPublisher, *, older_than_s: float = RELAY_AFTER_S,
                      limit: int = RELAY_PAGE) -> int:
    """Publish every tenant's outbox rows older than ``older_than_s`` seconds and delete them; return how
    many were put in a stream (repeats of ids already there are deleted without being counted). Redis
    and PostgreSQL errors propagate (what was not deleted is relayed next time)."""
    relayed = 0
    while True:
        page = await rows.stale(database, older_than_s=older_than_s, limit=limit)
        by_tenant: dict[str, list[str]] = collections.defaultdict(list)
        for stale in page:
            by_tenant[stale.tenant_id].append(stale.event_id)
        for tenant_id, event_ids in by_tenant.items():
            async with database.tenant(tenant_id) as tx:
                found = await rows.bodies(tx, event_ids)
            writes = [publisher.publish_once_nowait(tenant_id, event_id, body) for event_id, body in found]
            outcomes = await asyncio.gather(*writes)  # a Redis error: stop, nothing deleted
            relayed += sum(1 for outcome in outcomes if outcome)
            async with database.tenant(tenant_id) as tx:
                await rows.forget(tx, [event_id for event_id, _body in found])
        if len(page) < limit:
            return relayed


async def relay_forever(redis: Any, database: Callable[[], Awaitable[Database]], publisher: EventPublisher, *,
                        interval: float = RELAY_INTERVAL_S, older_than_s: float = RELAY_AFTER_S) -> None:
    """Relay stale outbox rows until cancelled: every ``interval`` seconds (times a random factor in
    [0.5, 1]) take the relay lock for ``interval`` and, if this process got it, :func:`relay_stale`.
    Never raises: an outage or a database not migrated yet is logged once and tried again."""

    async def attempt() -> int | None:
        if not await RedisLock(redis, keys.event_relay_lock(), interval).acquire():
            return None
        return await relay_stale(await database(), publisher, older_than_s=older_than_s)

    await every_interval(attempt, interval=interval, name="event relay", log=log,
                         done=lambda relayed: log.info("outbox events relayed", relayed=relayed))
