"""The supervisor's Redis side: publish the routing table, read queue depths, tenant counts and dead
letters, and release the job leases of workers it has reaped.

It runs beside the reconcile loop, never inside it, so a slow or absent Redis cannot stall process
supervision. Every failure is logged once per outage and retried on the next pass; nothing here ever
ends the supervisor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import keys
from agentworker.config import QuotaConfig
from agentworker.job_leases import holder_id, release_holder
from agentworker.logs import get_logger
from agentworker.routing import routing_table_json

log = get_logger("agentworker.supervisor")

OBSERVE_INTERVAL_S = 2.0
#: attempts to release a dead worker's job leases while Redis is unreachable (then they lapse by themselves)
RELEASE_ATTEMPTS = 5
#: re-assert the routing table this often even when nothing changed (someone may have deleted it)
REPUBLISH_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class QueueDepth:
    ready: int  # due now: what workers should be taking
    total: int  # ready + deferred (scheduled for later, or being retried with a delay)


@dataclass(frozen=True, slots=True)
class TenantCounts:
    in_flight: int  # live concurrency leases: jobs running now (tenants with max_concurrency)
    pending: int  # enqueued and not yet started


@dataclass(kw_only=True)
class RedisSnapshot:
    """What the last successful pass read; ``at`` is None until the first one."""

    queues: dict[tuple[str, int], QueueDepth] = field(default_factory=dict)
    tenants: dict[str, TenantCounts] = field(default_factory=dict)
    dead_letters: dict[str, int] = field(default_factory=dict)  # per pool: entries of agentworker:dead:{pool}
    at: float | None = None


class RedisObserver:
    def __init__(self, redis: Redis, config: Callable[[], tuple[int, QuotaConfig]]) -> None:
        """``config()`` returns the supervisor's current ``(config version, config)``."""
        self.redis = redis
        self._config = config
        self.snapshot = RedisSnapshot()
        self.ok: bool | None = None
        self.error: str | None = None
        self._published: tuple[int, float] | None = None  # (config version, monotonic time)
        self._releases: set[asyncio.Task[None]] = set()
        self.jobs_released = 0

    def release_dead_worker(self, pool: str, pid: int) -> None:
        """Release, now and in the background, the job leases of a worker process the supervisor reaped.

        Called from the reconcile loop (which never waits on Redis); its jobs run again on the live
        workers within milliseconds instead of after the lease TTL."""
        task = asyncio.create_task(self._release(pool, pid), name=f"release-{pid}")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, pool: str, pid: int) -> None:
        holder = holder_id(pid)
        for attempt in range(RELEASE_ATTEMPTS):
            try:
                released = await release_holder(self.redis, holder, pool)
            except (RedisError, OSError) as exc:
                if attempt == RELEASE_ATTEMPTS - 1:
                    log.warning("cannot release a dead worker's jobs; their leases will lapse", worker_pid=pid,
                                pool=pool, error=str(exc))
                    return
                await asyncio.sleep(0.2 * 2**attempt)
                continue
            if released:
                self.jobs_released += released
                log.info("released the jobs of a dead worker", worker_pid=pid, pool=pool, jobs=released)
            return

    async def run_forever(self) -> None:
        while True:
            await self.observe_once()
            await asyncio.sleep(OBSERVE_INTERVAL_S)

    async def observe_once(self) -> None:
        try:
            await self._publish_routing()
            await self._read_counts()
        except (RedisError, OSError) as exc:
            if self.ok is not False:
                log.warning("Redis unreachable; will keep trying", error=str(exc))
            self.ok, self.error = False, str(exc)
            self._published = None  # publish again once Redis is back (it may have lost the key)
            return
        if self.ok is False:
            log.info("Redis reachable again")
        self.ok, self.error = True, None

    async def _publish_routing(self) -> None:
        version, config = self._config()
        now = time.monotonic()
        if self._published is not None:
            published_version, at = self._published
            if published_version == version and now - at < REPUBLISH_INTERVAL_S:
                return
        await self.redis.set(keys.ROUTING, routing_table_json(config))
        if self._published is None or self._published[0] != version:
            log.info("routing table published", key=keys.ROUTING, pools=sorted(config.pools))
        self._published = (version, now)

    async def _read_counts(self) -> None:
        _version, config = self._config()
        now_ms = int(time.time() * 1000)
        queues = [(pool, shard) for pool, quota in sorted(config.pools.items()) for shard in range(quota.shards)]
        tenants = sorted(config.tenants)
        pools = sorted(config.pools)
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool, shard in queues:
                pipe.zcount(keys.queue(pool, shard), "-inf", now_ms)
                pipe.zcard(keys.queue(pool, shard))
            for tenant in tenants:
                pipe.zcount(keys.tenant_leases(tenant), now_ms, "+inf")
                pipe.zcount(keys.pending(tenant), now_ms, "+inf")
            for pool in pools:
                pipe.hlen(keys.dead_letters(pool))
            replies = await pipe.execute()
        it = iter(replies)
        snapshot = RedisSnapshot(at=time.time())
        for queue in queues:
            snapshot.queues[queue] = QueueDepth(ready=int(next(it)), total=int(next(it)))
        for tenant in tenants:
            snapshot.tenants[tenant] = TenantCounts(in_flight=int(next(it)), pending=int(next(it)))
        for pool in pools:
            snapshot.dead_letters[pool] = int(next(it))
        self.snapshot = snapshot
