"""The supervisor's Redis side: publish the routing table, move queued jobs when it changes, read queue
depths, tenant counts and dead letters, and release the job leases of workers it has reaped.

It runs beside the reconcile loop, never inside it, so a slow or absent Redis cannot stall process
supervision. Every failure is logged once per outage and retried on the next pass; nothing here ever
ends the supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError

from agentworker import keys
from agentworker.config import QuotaConfig
from agentworker.job_control import prune_cancel_requests
from agentworker.job_leases import holder_id, lua_source, publish_limits, quota_file_version, release_holder
from agentworker.logs import get_logger
from agentworker.rerouting import config_of_routing_table, reroute, reroute_strays
from agentworker.routing import routing_table_json
from agentworker.tenants import TenantDirectory

log = get_logger("agentworker.supervisor")

OBSERVE_INTERVAL_S = 2.0
#: tenants counted per state (ready, waiting, capped) of a shard when reading its depth: the read costs one
#: command per tenant with queued work, so it is bounded; past it the depths are lower bounds
DEPTH_TENANTS_PER_STATE = 10_000
#: attempts to release a dead worker's job leases while Redis is unreachable (then they lapse by themselves)
RELEASE_ATTEMPTS = 5
#: re-assert the routing table this often even when nothing changed (someone may have deleted it); the
#: sweep for tenants queued where they no longer route runs as often
REPUBLISH_INTERVAL_S = 60.0
#: after a reload, wait this long before moving queued jobs to their new queues: the reload sent every
#: worker SIGHUP, and a worker of a new queue still on the old file would refuse a moved job
REROUTE_GRACE_S = 1.0


@dataclass(frozen=True, slots=True)
class QueueDepth:
    ready: int  # due now: what workers should be taking
    total: int  # ready + deferred (scheduled for later, or being retried with a delay)
    runnable: int = 0  # due now and not held back by its tenant's max_concurrency: what more pods could run


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
    #: (pool, limit) -> jobs refused at admission so far (agentworker:refusals)
    refusals: dict[tuple[str, str], int] = field(default_factory=dict)
    at: float | None = None


class RedisObserver:
    def __init__(self, redis: Redis, config: Callable[[], tuple[int, QuotaConfig]],
                 config_path: Path | None = None) -> None:
        """``config()`` returns the supervisor's current ``(config version, config)``; ``config_path``
        is the quota file (its modification time versions the tenant limits published from it)."""
        self.redis = redis
        self._config = config
        self.config_path = config_path
        self.snapshot = RedisSnapshot()
        self.ok: bool | None = None
        self.error: str | None = None
        self._published: tuple[int, float] | None = None  # (config version, monotonic time)
        self._releases: set[asyncio.Task[None]] = set()
        self._depth_sha: str | None = None
        # Rerouting (agentworker/rerouting.py): the routing the queued jobs in Redis follow, and for which
        # config version (None: that of the last routing table published, read at start).
        self._routed: QuotaConfig | None = None
        self._routed_version: int | None = None
        self._seen: tuple[int, float] | None = None  # (config version, monotonic time first seen)
        self._shards_known: set[tuple[str, int]] = set()  # every shard of every file seen: swept for strays
        self._sweep_cursors: dict[str, int] = {}
        self._swept_at: float | None = None
        #: the cancel requests' sweep (prune_cancel_requests): when it last ran, and where it goes on
        self._cancels_pruned_at: float | None = None
        self._cancel_offset = 0
        self._newest_file = True  # False while another supervisor's newer quota file holds the limits
        self.jobs_rerouted = 0
        #: tenant-store entries (agentworker.tenants): a stored plan or pool routes a tenant elsewhere
        self.tenants = TenantDirectory(redis)
        #: called with a config version once queued jobs follow its routing (the supervisor holds the
        #: replacement of workers until then, so a fresh worker never meets a job of the old routing)
        self.on_rerouted: Callable[[int], None] | None = None
        self._wakeup = asyncio.Event()

    def limits_version(self) -> int:
        return quota_file_version(self.config_path)

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
                log.info("released the jobs of a dead worker", worker_pid=pid, pool=pool, jobs=released)
            return

    def wake(self) -> None:
        """The supervisor applied a reload: publish its routing now (and move jobs after the grace)."""
        self._wakeup.set()

    async def run_forever(self) -> None:
        while True:
            await self.observe_once()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self._sleep_time())
            self._wakeup.clear()

    def _sleep_time(self) -> float:
        """OBSERVE_INTERVAL_S, or less when queued jobs are due to move sooner."""
        if self.ok and self._seen is not None and self._newest_file and self._routed_version != self._seen[0]:
            return max(0.01, min(OBSERVE_INTERVAL_S, self._seen[1] + REROUTE_GRACE_S - time.monotonic()))
        return OBSERVE_INTERVAL_S

    def _note_version(self) -> tuple[int, float]:
        """The current config version and when this observer first saw it."""
        version, config = self._config()
        if self._seen is None or self._seen[0] != version:
            self._seen = (version, time.monotonic())
            self._shards_known |= {(pool, shard) for pool, quota in config.pools.items()
                                   for shard in range(quota.shards)}
        return self._seen

    async def observe_once(self) -> None:
        self._note_version()
        try:
            if self._routed is None:
                await self._read_last_routing()
            await self._publish_routing()
            await self._reroute()
            await self._read_counts()
            await self._prune_cancel_requests()
        except (RedisError, OSError) as exc:
            if self.ok is not False:
                log.warning("Redis unreachable; will keep trying", error=str(exc))
            self.ok, self.error = False, str(exc)
            self._published = None  # publish again once Redis is back (it may have lost the key)
            self._depth_sha = None  # and load the script again (a restarted Redis has lost it)
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
        newest = True
        for pool in config.pools:
            newest = await publish_limits(self.redis, config, pool, self.limits_version()) and newest
        self._newest_file = newest
        if self._published is None or self._published[0] != version:
            log.info("routing table published", key=keys.ROUTING, pools=sorted(config.pools))
        self._published = (version, now)

    async def _read_last_routing(self) -> None:
        """At start: where the jobs in Redis were routed, from the routing table last published (by an
        earlier run, maybe with another file), so that what changed while no supervisor ran is moved."""
        _version, config = self._config()
        published = config_of_routing_table(await self.redis.get(keys.ROUTING))
        self._routed = published if published is not None else config
        self._shards_known |= {(pool, shard) for pool, quota in self._routed.pools.items()
                               for shard in range(quota.shards)}

    async def _reroute(self) -> None:
        """Move queued jobs to the queues the current file routes their tenants to: after a reload (once
        the workers have had REROUTE_GRACE_S to take the new file), at start, and, for whatever is still
        queued where its tenant no longer routes (a job that was running during a move and went back to
        its old queue, a producer still on the old file), in a bounded sweep every REPUBLISH_INTERVAL_S."""
        version, config = self._config()
        seen_at = self._note_version()[1]
        now = time.monotonic()
        if not self._newest_file:  # a newer file is being rolled out by another supervisor: its moves win
            return
        assert self._routed is not None
        if self._routed_version != version:
            if self._routed_version is not None and now - seen_at < REROUTE_GRACE_S:
                return
            moved = await reroute(self.redis, self._routed, config, directory=self.tenants)
            self._routed, self._routed_version = config, version
            self.jobs_rerouted += moved
            if moved:
                log.info("queued jobs moved to their new queues", jobs=moved, config_version=version)
            if self.on_rerouted is not None:
                self.on_rerouted(version)
        if self._swept_at is None or now - self._swept_at >= REPUBLISH_INTERVAL_S:
            self._swept_at = now
            moved = await reroute_strays(self.redis, config, shards=self._shards_known,
                                         cursors=self._sweep_cursors, directory=self.tenants)
            self.jobs_rerouted += moved
            if moved:
                log.info("queued jobs found where their tenants no longer route; moved", jobs=moved)

    async def _prune_cancel_requests(self, batch: int = 500) -> None:
        """Every REPUBLISH_INTERVAL_S, one batch of the cancel requests whose job Redis no longer knows is
        dropped, so ``arq:abort`` holds only requests that still mean something."""
        now = time.monotonic()
        if self._cancels_pruned_at is not None and now - self._cancels_pruned_at < REPUBLISH_INTERVAL_S:
            return
        self._cancels_pruned_at = now
        removed, seen = await prune_cancel_requests(self.redis, offset=self._cancel_offset, limit=batch)
        self._cancel_offset = 0 if seen < batch else self._cancel_offset + seen - removed
        if removed:
            log.info("stale cancel requests dropped", removed=removed)

    async def _read_counts(self) -> None:
        try:
            await self._read_counts_once()
        except NoScriptError:
            # Redis restarted and lost its scripts: load the depth script again and read once more.
            self._depth_sha = None
            await self._read_counts_once()

    async def _read_counts_once(self) -> None:
        if self._depth_sha is None:
            self._depth_sha = await self.redis.script_load(lua_source("depth"))
        _version, config = self._config()
        now_ms = int(time.time() * 1000)
        queues = [(pool, shard) for pool, quota in sorted(config.pools.items()) for shard in range(quota.shards)]
        tenants = sorted(config.tenants)
        pools = sorted(config.pools)
        async with self.redis.pipeline(transaction=False) as pipe:
            for pool, shard in queues:
                pipe.evalsha(self._depth_sha, 4, keys.ready_tenants(pool, shard), keys.waiting_tenants(pool, shard),
                             keys.capped_tenants(pool, shard), keys.queue(pool, shard), keys.shard_id(pool, shard),
                             str(DEPTH_TENANTS_PER_STATE))
            for tenant in tenants:
                pipe.zcount(keys.tenant_leases(tenant), now_ms, "+inf")
                pipe.zcount(keys.pending(tenant), now_ms, "+inf")
            for pool in pools:
                pipe.hlen(keys.dead_letters(pool))
            pipe.hgetall(keys.admission_refusals())
            replies = await pipe.execute()
        it = iter(replies)
        snapshot = RedisSnapshot(at=time.time())
        for queue in queues:
            due, total, runnable = (int(v) for v in next(it))
            snapshot.queues[queue] = QueueDepth(ready=due, total=total, runnable=runnable)
        for tenant in tenants:
            snapshot.tenants[tenant] = TenantCounts(in_flight=int(next(it)), pending=int(next(it)))
        for pool in pools:
            snapshot.dead_letters[pool] = int(next(it))
        for field_name, count in (next(it) or {}).items():
            pool, _, limit = (field_name.decode(errors="replace") if isinstance(field_name, bytes)
                              else str(field_name)).partition(" ")
            if pool in config.pools and limit in ("max_pending", "rate_limit"):
                snapshot.refusals[(pool, limit)] = int(count)
        self.snapshot = snapshot
