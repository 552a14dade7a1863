"""Every use of ARQ's private internals, in one module (ARQ is pinned to 0.28.x).

ARQ's ``Worker`` serves one queue with its own ``max_jobs``. A worker process here serves every shard
queue of a pool under one process-wide cap, defers jobs of tenants at their ``max_concurrency`` without
spending a try, and survives Redis outages. :class:`ShardWorker` keeps ARQ's job execution
(``run_job``, ``finish_job``: retries, results, timeouts, re-queue on cancel) and replaces how jobs are
found and claimed:

* ``main``: a poll loop that survives Redis errors (backing off) and wakes early on :meth:`wake`;
* ``_poll_iteration``: reads due job ids only when the process has room, and reads past jobs it had to
  skip so a capped tenant at the head of a queue cannot hide the jobs behind it;
* ``start_jobs``: takes a slot of the shared :class:`~agentworker.pools.gate.ConcurrencyGate`, then
  claims the job and its tenant's lease in one Lua round trip (ARQ's claim alone is a WATCH/MULTI of
  four); a tenant at its cap leaves the job queued without spending a try;
* ``finish_job``: ARQ's own MULTI/EXEC of five commands, as one script (same writes, same atomicity, a
  fifth of the client-side work: a busy worker spends its CPU in redis-py, not in Redis).

Attributes of ``arq.worker.Worker`` relied on, checked by ``tests/test_arq_internals.py``:
``pool``, ``queue_name``, ``tasks``, ``job_counter``, ``allow_pick_jobs``, ``in_progress_timeout_s``,
``queue_read_limit``, ``poll_delay_s``, ``ctx``, ``run_job(job_id, score)``, and ``main``,
``_poll_iteration``, ``start_jobs``, ``finish_job`` (its parameters and its writes) as override points;
ARQ's key prefixes (``arq.constants``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Callable, Sequence
from typing import Any

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss, in_progress_key_prefix, job_key_prefix, result_key_prefix, retry_key_prefix
from arq.jobs import Deserializer, Serializer
from arq.utils import timestamp_ms
from arq.worker import Function, Worker
from redis.exceptions import RedisError

from agentworker import keys
from agentworker.jobs import in_progress_key
from agentworker.logs import get_logger
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import TenantLeases

log = get_logger("agentworker.worker")

# Claim a due job in one round trip: refuse it if it is already running (its in-progress key exists),
# gone, or re-deferred; refuse it with 'cap' if its tenant already holds max_concurrency live leases;
# else mark it in progress for ARQ's in-progress TTL, take a tenant lease, and drop it from the tenant's
# pending set. Returns the job's score, 'cap', or nil. The lease check and the claim are one script so two
# processes cannot both take the tenant's last slot, and no lease is taken for a job someone else runs.
_CLAIM_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local score = redis.call('ZSCORE', KEYS[2], ARGV[1])
if not score or tonumber(score) > tonumber(ARGV[2]) then return false end
local limit = tonumber(ARGV[4])
if limit > 0 then
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local ttl = tonumber(ARGV[5])
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  if redis.call('ZCARD', KEYS[4]) >= limit then return 'cap' end
  redis.call('ZADD', KEYS[4], now + ttl, ARGV[6])
  redis.call('PEXPIRE', KEYS[4], ttl * 2)
end
redis.call('SET', KEYS[1], '1', 'PX', ARGV[3])
if KEYS[3] then redis.call('ZREM', KEYS[3], ARGV[1]) end
return score
"""

# ARQ's finish_job (arq 0.28, a MULTI/EXEC) in one script, same writes in the same order. KEYS: in-progress,
# result, retry, job, abort set, queue. ARGV: job id; ms to keep the in-progress key ('' = delete it);
# '1' if the job is finished; the result ('' = none); its expiry in ms ('' = none); a score increment
# for a job to run again ('' = none).
_FINISH_LUA = """
local delete = {}
if ARGV[2] == '' then table.insert(delete, KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if ARGV[3] == '1' then
  if ARGV[4] ~= '' then
    if ARGV[5] == '' then redis.call('SET', KEYS[2], ARGV[4])
    else redis.call('SET', KEYS[2], ARGV[4], 'PX', ARGV[5]) end
  end
  table.insert(delete, KEYS[3])
  table.insert(delete, KEYS[4])
  redis.call('ZREM', KEYS[5], ARGV[1])
  redis.call('ZREM', KEYS[6], ARGV[1])
elseif ARGV[6] ~= '' then
  redis.call('ZINCRBY', KEYS[6], ARGV[6], ARGV[1])
end
if #delete > 0 then redis.call('DEL', unpack(delete)) end
return 1
"""

#: tenant id -> its max_concurrency, or None for no cap
TenantCap = Callable[[str], int | None]
#: called with the tenant id when one of its jobs is left queued because the tenant is at its cap
JobDeferred = Callable[[str], None]
#: called with the job id once a claimed job has finished, however it finished
JobDone = Callable[[str], None]

ARQ_WORKER_ATTRIBUTES: Sequence[str] = (
    "pool", "queue_name", "tasks", "job_counter", "allow_pick_jobs", "in_progress_timeout_s",
    "queue_read_limit", "poll_delay_s", "ctx", "run_job", "main", "_poll_iteration", "start_jobs",
    "finish_job",
)


def _ms(seconds: float) -> int:
    return round(seconds * 1000)  # as arq.utils.to_ms


def tenant_of_job_id(job_id: str) -> str | None:
    tenant, sep, _rest = job_id.partition(":")
    return tenant if sep and tenant else None


class ShardWorker(Worker):
    """An ARQ Worker for one shard queue, sharing the process's gate, Redis client and runtime."""

    def __init__(
        self,
        *,
        functions: Sequence[Function],
        queue_name: str,
        shard: int,
        redis: ArqRedis,
        gate: ConcurrencyGate,
        leases: TenantLeases,
        tenant_cap: TenantCap,
        on_deferred: JobDeferred,
        on_done: JobDone,
        max_jobs: int,
        job_timeout: float,
        max_tries: int,
        keep_result: float,
        poll_delay: float,
        job_serializer: Serializer,
        job_deserializer: Deserializer,
        ctx: dict[str, Any],
    ) -> None:
        super().__init__(
            functions,
            queue_name=queue_name,
            redis_pool=redis,
            handle_signals=False,
            max_jobs=max_jobs,
            job_timeout=job_timeout,
            max_tries=max_tries,
            keep_result=keep_result,
            poll_delay=poll_delay,
            queue_read_limit=max(100, max_jobs * 5),
            job_serializer=job_serializer,
            job_deserializer=job_deserializer,
            ctx={**ctx, "queue": queue_name, "shard": shard},
            log_results=False,
        )
        self.shard = shard
        self.gate = gate
        self.leases = leases
        self._tenant_cap = tenant_cap
        self._on_deferred = on_deferred
        self._on_done = on_done
        self._claim = redis.register_script(_CLAIM_LUA)
        self._finish = redis.register_script(_FINISH_LUA)
        self._wakeup = asyncio.Event()
        self._stopped = False
        self._read_offset = 0
        self.redis_healthy = True
        self.orphaned: list[str] = []

    # -- control ---------------------------------------------------------------------------------------

    def wake(self) -> None:
        """Poll now instead of waiting for the poll interval (a job has just been enqueued)."""
        self._wakeup.set()

    def stop_picking(self) -> None:
        """Take no new job; jobs already running go on."""
        self.allow_pick_jobs = False
        self._stopped = True
        self._wakeup.set()

    @property
    def running(self) -> int:
        return sum(not t.done() for t in self.tasks.values())

    # -- ARQ override points ---------------------------------------------------------------------------

    async def main(self) -> None:
        self.ctx["redis"] = self.pool
        backoff = 0.0
        while not self._stopped:
            batch_full = False
            try:
                batch_full = await self._poll_once()
            except (RedisError, OSError) as exc:
                backoff = min(5.0, max(0.1, backoff * 2))
                if self.redis_healthy:
                    log.warning("queue poll failed; retrying", queue=self.queue_name, error=str(exc))
                self.redis_healthy = False
                await asyncio.sleep(backoff * (0.5 + random.random()))
                continue
            if not self.redis_healthy:
                log.info("queue poll recovered", queue=self.queue_name)
            self.redis_healthy = True
            backoff = 0.0
            if batch_full:
                continue  # more jobs are due than one read returns: read again at once
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.poll_delay_s)
            self._wakeup.clear()

    async def _poll_iteration(self) -> None:
        await self._poll_once()

    async def _poll_once(self) -> bool:
        self._reap()
        if not self.allow_pick_jobs or self.gate.closed:
            return False
        limit = self.queue_read_limit
        job_ids = await self.pool.zrangebyscore(
            self.queue_name, min=float("-inf"), max=timestamp_ms(), start=self._read_offset, num=limit
        )
        skipped = await self.start_jobs(job_ids)
        full = len(job_ids) >= limit
        # Skipped ids (running elsewhere, or a tenant at its cap) stay at the head of the queue; read past
        # them next time so the jobs behind them are seen.
        self._read_offset = skipped if full and skipped else 0
        return full and skipped < len(job_ids)

    async def start_jobs(self, job_ids: list[bytes]) -> int:  # type: ignore[override]
        """Claim and start what can run of ``job_ids``; return how many were skipped."""
        skipped = 0
        at_cap: set[str] = set()
        for raw in job_ids:
            if not self.allow_pick_jobs:
                break
            job_id = raw.decode()
            tenant = tenant_of_job_id(job_id)
            # Jobs stay in the queue while they run: skip our own without queueing for a slot.
            if tenant in at_cap or job_id in self.tasks:
                skipped += 1
                continue
            if not await self.gate.acquire(self.shard):
                break
            started = False
            try:
                claim_keys = [in_progress_key(job_id), self.queue_name]
                cap = 0
                if tenant is not None:
                    claim_keys += [keys.pending(tenant), keys.tenant_leases(tenant)]
                    cap = self._tenant_cap(tenant) or 0
                reply = await self._claim(keys=claim_keys, args=[
                    job_id, timestamp_ms(), int(self.in_progress_timeout_s * 1000), cap, self.leases.ttl_ms,
                    self.leases.member(job_id)])
                if reply is None:
                    skipped += 1
                    continue
                if reply == b"cap" and tenant is not None:
                    at_cap.add(tenant)
                    skipped += 1
                    self._on_deferred(tenant)
                    continue
                if cap and tenant is not None:
                    self.leases.track(tenant, job_id)
                self.job_counter += 1
                task = asyncio.create_task(self.run_job(job_id, int(float(reply))))
                task.add_done_callback(functools.partial(self._job_finished, job_id=job_id))
                self.tasks[job_id] = task
                started = True
            finally:
                if not started:
                    self.gate.release()
        return skipped

    async def finish_job(
        self,
        job_id: str,
        finish: bool,
        result_data: bytes | None,
        result_timeout_s: float | None,
        keep_result_forever: bool,
        incr_score: int | None,
        keep_in_progress: float | None,
    ) -> None:
        """ARQ's ``finish_job`` as one script (see ``_FINISH_LUA``)."""
        keep_ms = "" if keep_in_progress is None else _ms(keep_in_progress)
        expiry = None if keep_result_forever else result_timeout_s
        await self._finish(
            keys=[in_progress_key_prefix + job_id, result_key_prefix + job_id, retry_key_prefix + job_id,
                  job_key_prefix + job_id, abort_jobs_ss, self.queue_name],
            args=[job_id, keep_ms, "1" if finish else "0", result_data or b"",
                  "" if expiry is None else _ms(expiry), incr_score or ""])

    # -- internals -------------------------------------------------------------------------------------

    def _job_finished(self, task: asyncio.Task[Any], *, job_id: str) -> None:
        if task.cancelled():
            # Cancelled before ARQ's run_job could catch it (while it read the job): ARQ left the
            # in-progress key, which would block the job until it expires. requeue_orphans() clears it.
            self.orphaned.append(job_id)
        self.job_counter -= 1
        self.gate.release()
        self._on_done(job_id)

    def _reap(self) -> None:
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                if not task.cancelled() and task.exception() is not None:
                    # run_job catches job errors itself; this is a Redis failure while finishing a job.
                    log.error("finishing job failed", job_id=job_id, error=repr(task.exception()))

    async def wait_idle(self) -> None:
        while self.tasks:
            pending = [t for t in self.tasks.values() if not t.done()]
            if pending:
                await asyncio.wait(pending)
            self._reap()

    async def requeue_orphans(self) -> None:
        if self.orphaned:
            await self.pool.delete(*[in_progress_key(job_id) for job_id in self.orphaned])
            self.orphaned.clear()

    def cancel_running(self) -> int:
        """Cancel running jobs; ARQ re-queues each at once (no in-progress key left behind)."""
        count = 0
        for task in self.tasks.values():
            if not task.done():
                task.cancel()
                count += 1
        return count
