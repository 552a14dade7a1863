"""How a worker finds, claims, runs and finishes ARQ jobs: ARQ's record formats, our own job loop.

ARQ 0.28 (pinned) is kept for what other programs read: the job, result, retry and in-progress records
(``arq.constants``), their serialization (``arq.jobs.serialize_result``), its ``Function`` and ``Retry``.
Its ``Worker`` loop is replaced, because the promises here cannot be kept inside it:

* ``Worker.run_job`` counts a try on every pickup, so a job whose worker was SIGKILLed spends a try, and
  after ``max_tries`` crashes ARQ fails it ("max retries exceeded") before any of our code runs — no
  ``job_failed`` event, a workflow run left ``running``. Here the claim script knows a crash from a
  failure (:mod:`agentworker.job_leases`): a crash gives its try back and counts against
  ``max_crash_retries`` instead.
* ARQ's in-progress key lives ``job_timeout + 10 s`` and is never renewed; here it is a short lease the
  holder renews, which the supervisor releases when it reaps a dead worker.
* ARQ reads a job's record with ``GET`` in a transaction and raises on a record of the wrong Redis type,
  or on a non-UTF-8 id, on every pickup (a wedged job, or a crashed pool). Here anything unreadable is
  moved to the pool's dead letters once, and the loop goes on.
* Finishing must only happen while the lease is ours, and cost one round trip.

:class:`ShardWorker` serves one shard queue; the processes's shards share one
:class:`~agentworker.pools.gate.ConcurrencyGate` (the process-wide cap, round-robin between shards), one
:class:`~agentworker.pools.leases.Leases` and one Redis client. ARQ-named parts it relies on are listed in
:data:`ARQ_NAMES_RELIED_ON` and checked by ``tests/test_arq_internals.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from arq.connections import ArqRedis
from arq.constants import abort_jobs_ss
from arq.jobs import serialize_result
from arq.utils import timestamp_ms
from arq.worker import Function, Retry
from redis.exceptions import RedisError

from agentworker import jobs, keys, metrics
from agentworker.config import PoolQuota
from agentworker.job_leases import (
    ATTEMPT_TTL_MS,
    CLAIM_LUA,
    DEAD_LETTER_LUA,
    FINISH_LUA,
    RETRY_TTL_S,
    dead_letter_record,
)
from agentworker.logs import get_logger
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import Leases
from agentworker.tasks.envelope import FinalFailure, JobPoisoned, JobTriesExhausted, JobUnreadable

log = get_logger("agentworker.worker")

#: what of ARQ this module uses (besides the key prefixes in agentworker.jobs)
ARQ_NAMES_RELIED_ON: Sequence[str] = (
    "arq.constants.abort_jobs_ss", "arq.jobs.serialize_result", "arq.utils.timestamp_ms", "arq.worker.Function",
    "arq.worker.Retry", "arq.worker.func",
)

#: tenant id -> its max_concurrency, or None for no cap
TenantCap = Callable[[str], int | None]
#: called with the tenant id when one of its jobs is left queued because the tenant is at its cap
JobDeferred = Callable[[str], None]
#: called with the job id once a claimed job has finished, however it finished
JobDone = Callable[[str], None]


#: reports a :class:`FinalFailure` (events, metrics, the task's run); must not raise
FailureReporter = Callable[[FinalFailure], Awaitable[None]]
#: counts one dead letter: (reason, job id as text)
DeadLettered = Callable[[str, str], None]


def tenant_of_job_id(job_id: str) -> str | None:
    tenant, sep, _rest = job_id.partition(":")
    return tenant if sep and tenant else None


def _readable(raw: bytes) -> str:
    return raw.decode("utf-8", errors="backslashreplace")


class ShardWorker:
    """Claims and runs the jobs of one shard queue, sharing the process's gate, leases and Redis."""

    def __init__(
        self,
        *,
        functions: Sequence[Function],
        queue_name: str,
        pool_name: str,
        shard: int,
        redis: ArqRedis,
        gate: ConcurrencyGate,
        leases: Leases,
        pool_quota: Callable[[], PoolQuota],
        tenant_cap: TenantCap,
        on_deferred: JobDeferred,
        on_done: JobDone,
        on_final_failure: FailureReporter,
        on_dead_letter: DeadLettered,
        keep_result: float,
        poll_delay: float,
        job_serializer: Callable[[Any], bytes],
        job_deserializer: Callable[[bytes], dict[str, Any]],
        ctx: dict[str, Any],
    ) -> None:
        self.functions: dict[str, Function] = {f.name: f for f in functions}
        self.queue_name = queue_name
        self.pool_name = pool_name
        self.shard = shard
        self.pool = redis
        self.gate = gate
        self.leases = leases
        self._pool_quota = pool_quota
        self._tenant_cap = tenant_cap
        self._on_deferred = on_deferred
        self._on_done = on_done
        self._on_final_failure = on_final_failure
        self._on_dead_letter = on_dead_letter
        self.keep_result_s = keep_result
        self.poll_delay_s = poll_delay
        self.serialize = job_serializer
        self.deserialize = job_deserializer
        self.ctx: dict[str, Any] = {**ctx, "queue": queue_name, "shard": shard, "redis": redis}
        self.queue_read_limit = max(100, gate.limit * 5)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.allow_pick_jobs = True
        self._claim = redis.register_script(CLAIM_LUA)
        self._finish = redis.register_script(FINISH_LUA)
        self._dead_letter = redis.register_script(DEAD_LETTER_LUA)
        self._wakeup = asyncio.Event()
        self._stopped = False
        self._read_offset = 0
        self._lost: set[str] = set()
        self.redis_healthy = True

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

    def lease_lost(self, job_id: str) -> bool:
        """Another holder took this job over (our lease lapsed): stop running it here. True if it was ours."""
        task = self.tasks.get(job_id)
        if task is None or task.done():
            return False
        self._lost.add(job_id)
        task.cancel()
        return True

    # -- the loop --------------------------------------------------------------------------------------

    async def main(self) -> None:
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

    async def _poll_once(self) -> bool:
        self._reap()
        if not self.allow_pick_jobs or self.gate.closed:
            return False
        limit = self.queue_read_limit
        entries = await self.pool.zrangebyscore(
            self.queue_name, min=float("-inf"), max=timestamp_ms(), start=self._read_offset, num=limit,
            withscores=True)
        skipped = await self.start_jobs(entries)
        full = len(entries) >= limit
        # Skipped ids (running, or a tenant at its cap) stay at the head of the queue; read past them next
        # time so the jobs behind them are seen.
        self._read_offset = skipped if full and skipped else 0
        return full and skipped < len(entries)

    async def start_jobs(self, entries: Sequence[tuple[bytes, float]]) -> int:
        """Claim and start what can run of ``entries`` (id, score); return how many were skipped."""
        skipped = 0
        at_cap: set[str] = set()
        for raw, score in entries:
            if not self.allow_pick_jobs:
                break
            try:
                job_id = raw.decode()
            except UnicodeDecodeError:
                await self._move_to_dead_letters(raw, None, "non_utf8_id", "the job id is not UTF-8", score)
                continue
            tenant = tenant_of_job_id(job_id)
            # Jobs stay in the queue while they run: skip our own without queueing for a slot.
            if tenant in at_cap or job_id in self.tasks:
                skipped += 1
                continue
            if not await self.gate.acquire(self.shard):
                break
            started = False
            try:
                reply = await self._claim_one(job_id, tenant)
                if reply is None:
                    skipped += 1
                    continue
                if reply == b"cap" and tenant is not None:
                    at_cap.add(tenant)
                    skipped += 1
                    self._on_deferred(tenant)
                    continue
                verdict = reply[0]
                if verdict == b"dead":
                    reason = reply[1].decode()
                    log.warning("unreadable job moved to the dead letters", job_id=job_id, reason=reason,
                                queue=self.queue_name)
                    await self._dead_lettered(job_id, reason, "its job record is missing or not a string")
                    continue
                self.tasks[job_id] = task = asyncio.create_task(self.run_job(
                    job_id, score=int(float(reply[1])), record=reply[2], job_try=int(reply[3]),
                    crashes=int(reply[4]), crashed=bool(int(reply[5])), poisoned=verdict == b"poisoned"))
                task.add_done_callback(functools.partial(self._job_finished, job_id=job_id))
                started = True
            finally:
                if not started:
                    self.gate.release()
        return skipped

    async def _claim_one(self, job_id: str, tenant: str | None) -> Any:
        quota = self._pool_quota()
        claim_keys = [jobs.in_progress_key(job_id), self.queue_name, jobs.job_key(job_id), jobs.retry_key(job_id),
                      keys.job_attempt(job_id), self.leases.held_key, keys.dead_letters(self.pool_name)]
        cap = 0
        if tenant is not None:
            claim_keys += [keys.pending(tenant), keys.tenant_leases(tenant)]
            cap = self._tenant_cap(tenant) or 0
        reply = await self._claim(keys=claim_keys, args=[
            job_id, timestamp_ms(), self.leases.job_ttl_ms, self.leases.holder, quota.max_crash_retries, cap,
            self.leases.ttl_ms, self.leases.member(job_id), ATTEMPT_TTL_MS, RETRY_TTL_S])
        if isinstance(reply, list) and reply[0] in (b"run", b"poisoned"):
            self.leases.track(job_id, tenant if cap and tenant is not None else None)
        return reply

    # -- one job ---------------------------------------------------------------------------------------

    async def run_job(self, job_id: str, *, score: int, record: bytes, job_try: int, crashes: int = 0,
                      crashed: bool = False, poisoned: bool = False) -> None:
        """Run one claimed job and finish it; never raises but for a Redis failure while finishing."""
        try:
            job = self.deserialize(record)
        except jobs.UnreadableJob as exc:
            log.warning("unreadable job moved to the dead letters", job_id=job_id, reason=exc.reason,
                        detail=exc.detail, queue=self.queue_name)
            await self._move_to_dead_letters(job_id.encode(), job_id, exc.reason, exc.detail, score)
            return
        name: str = job["f"]
        kwargs: dict[str, Any] = job["k"]
        enqueue_ms: int = job["et"]
        if job["t"] and job["t"] > job_try:
            job_try = job["t"]  # a producer may start a job at a later try (as ARQ allows)
            try:
                await self.pool.set(jobs.retry_key(job_id), job_try, ex=RETRY_TTL_S)
            except asyncio.CancelledError:
                await asyncio.shield(self._finish_job(job_id, "requeue", None, None, None))
                return
        function = self.functions[name]
        quota = self._pool_quota()
        max_tries = quota.max_tries if function.max_tries is None else function.max_tries
        if poisoned:
            error: Exception = JobPoisoned(
                f"job {job_id} was running each of the {crashes} times its worker died "
                f"(max_crash_retries {quota.max_crash_retries})")
            log.error("job poisoned: its worker died every time it ran it", job_id=job_id, task=name,
                      crashes=crashes, max_crash_retries=quota.max_crash_retries)
            await self._fail_for_good(job_id, name, kwargs, enqueue_ms, job_try, score, "poisoned", error)
            return
        if job_try > max_tries:
            error = JobTriesExhausted(f"job {job_id} asked for try {job_try} of at most {max_tries}")
            log.warning("job tries exhausted", job_id=job_id, task=name, job_try=job_try, max_tries=max_tries)
            await self._fail_for_good(job_id, name, kwargs, enqueue_ms, job_try, score, "tries_exhausted", error)
            return
        if crashed:
            metrics.JOB_CRASH_RERUNS.labels(self.pool_name).inc()
            log.info("job runs again after its worker died", job_id=job_id, task=name, crashes=crashes,
                     job_try=job_try)
        ctx = {**self.ctx, "job_id": job_id, "job_try": job_try, "score": score, "crashes": crashes,
               "enqueue_time": datetime.fromtimestamp(enqueue_ms / 1000, tz=UTC)}
        start_ms = timestamp_ms()
        mode, incr_score, success, result = "done", None, False, None
        try:
            result = await asyncio.wait_for(function.coroutine(ctx, **kwargs), function.timeout_s)
            success = True
        except Retry as exc:
            mode = "retry"
            if exc.defer_score:
                incr_score = exc.defer_score + (timestamp_ms() - score)
        except asyncio.CancelledError:
            # A drain (or a lease another holder took over): the job runs again; this try is not counted.
            mode = "requeue"
            if job_id in self._lost:
                log.warning("job lease lost to another worker; stopped running it here", job_id=job_id)
        except Exception as exc:  # the task's own failure (the envelope has reported it)
            result = exc
        finished_ms = timestamp_ms()
        result_data = None
        if mode == "done":
            result_data = serialize_result(name, (), kwargs, job_try, enqueue_ms, success, result, start_ms,
                                           finished_ms, f"{job_id}:{name}", self.queue_name, job_id,
                                           serializer=self.serialize)
        await asyncio.shield(self._finish_job(job_id, mode, result_data, function, incr_score))

    async def _fail_for_good(self, job_id: str, name: str, kwargs: dict[str, Any], enqueue_ms: int,
                             job_try: int, score: int, reason: str, error: Exception) -> None:
        now = timestamp_ms()
        result_data = serialize_result(name, (), kwargs, job_try, enqueue_ms, False, error, now, now,
                                       f"{job_id}:{name}", self.queue_name, job_id, serializer=self.serialize)
        await self._report(self._failure(job_id, name, kwargs, reason, error, job_try, enqueue_ms))
        await asyncio.shield(self._finish_job(job_id, "done", result_data, self.functions.get(name), None))

    async def _finish_job(self, job_id: str, mode: str, result_data: bytes | None, function: Function | None,
                          incr_score: int | None) -> None:
        keep_s = self.keep_result_s
        forever = False
        if function is not None:
            keep_s = keep_s if function.keep_result_s is None else function.keep_result_s
            forever = bool(function.keep_result_forever)
        if not forever and keep_s <= 0:
            result_data = None
        tenant = self.leases.tenant_lease_of(job_id)
        finish_keys = [jobs.in_progress_key(job_id), jobs.result_key(job_id), jobs.retry_key(job_id),
                       jobs.job_key(job_id), abort_jobs_ss, self.queue_name, keys.job_attempt(job_id),
                       self.leases.held_key]
        if tenant is not None:
            finish_keys.append(keys.tenant_leases(tenant))
        try:
            ours = await self._finish(keys=finish_keys, args=[
                job_id, self.leases.holder, mode, result_data or b"", "" if forever else int(keep_s * 1000),
                "" if incr_score is None else incr_score, self.leases.member(job_id)])
        finally:
            self.leases.forget(job_id)
        if not ours:
            log.warning("job finished here after another worker took it over; its outcome wins", job_id=job_id)

    async def _move_to_dead_letters(self, raw: bytes, job_id: str | None, reason: str, detail: str,
                                    score: float) -> None:
        tenant = tenant_of_job_id(job_id) if job_id is not None else None
        dl_keys: list[str | bytes] = [self.queue_name, keys.dead_letters(self.pool_name),
                                      jobs.in_progress_key("").encode() + raw, keys.job_attempt("").encode() + raw,
                                      self.leases.held_key]
        if tenant is not None:
            dl_keys += [keys.pending(tenant), keys.tenant_leases(tenant)]
        moved = await self._dead_letter(keys=dl_keys, args=[
            raw, dead_letter_record(reason=reason, detail=detail, queue=self.queue_name, score=score),
            self.leases.holder, self.leases.member(job_id or "")])
        if job_id is not None:
            self.leases.forget(job_id)
        if not moved:
            return
        if job_id is None:
            log.warning("unreadable job moved to the dead letters", job_id=_readable(raw), reason=reason,
                        queue=self.queue_name)
            self._on_dead_letter(reason, _readable(raw))
            return
        await self._dead_lettered(job_id, reason, detail)

    async def _dead_lettered(self, job_id: str, reason: str, detail: str) -> None:
        """After a (UTF-8) job id went to the dead letters: count it, report it, leave a result to read."""
        self._on_dead_letter(reason, job_id)
        error = JobUnreadable(f"job {job_id} was moved to the dead letters ({reason}): {detail}")
        await self._report(self._failure(job_id, None, None, "unreadable", error, 1))
        now = timestamp_ms()
        data = serialize_result("unknown", (), {}, 1, 0, False, error, now, now, job_id, self.queue_name, job_id,
                                serializer=self.serialize)
        with contextlib.suppress(RedisError, OSError):
            await self.pool.set(jobs.result_key(job_id), data or b"", px=int(self.keep_result_s * 1000) or None)

    def _failure(self, job_id: str, task: str | None, payload: dict[str, Any] | None, reason: str,
                 error: Exception, job_try: int, enqueue_ms: int = 0) -> FinalFailure:
        return FinalFailure(job_id=job_id, task=task, payload=payload, reason=reason, error=error, job_try=job_try,
                            queue=self.queue_name, shard=self.shard, enqueue_time_ms=enqueue_ms)

    async def _report(self, failure: FinalFailure) -> None:
        try:
            await self._on_final_failure(failure)
        except Exception as exc:  # a reporter must not stop the loop
            log.error("reporting a failed job failed", job_id=failure.job_id, error=repr(exc))

    # -- internals -------------------------------------------------------------------------------------

    def _job_finished(self, task: asyncio.Task[Any], *, job_id: str) -> None:
        self._lost.discard(job_id)
        self.gate.release()
        self._on_done(job_id)

    def _reap(self) -> None:
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                if not task.cancelled() and task.exception() is not None:
                    # run_job handles job errors itself; this is a Redis failure while finishing a job. Its
                    # lease lapses and the job runs again (as a crash: no try spent).
                    log.error("finishing job failed", job_id=job_id, error=repr(task.exception()))

    async def wait_idle(self) -> None:
        while self.tasks:
            pending = [t for t in self.tasks.values() if not t.done()]
            if pending:
                await asyncio.wait(pending)
            self._reap()

    def cancel_running(self) -> int:
        """Cancel running jobs; each is finished as re-queued (runs again at once, no try spent)."""
        count = 0
        for task in self.tasks.values():
            if not task.done():
                task.cancel()
                count += 1
        return count
