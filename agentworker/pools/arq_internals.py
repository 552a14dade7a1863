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
* ARQ reads a queue as one FIFO and claims job by job (a WATCH/MULTI each). Here a shard holds one
  queue per tenant and one claim script takes, fairly between tenants, as many jobs as the process has
  free slots (see ``agentworker/lua/claim.lua``); finishes of one loop turn share a round trip
  (:mod:`agentworker.pools.batching`).

:class:`ShardWorker` serves one shard; the process's shards share one
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
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentworker import jobs, keys, metrics
from agentworker.config import PoolQuota
from agentworker.job_leases import ATTEMPT_TTL_MS, CAPPED_RECHECK_MS, RETRY_TTL_S, dead_letter_record, lua_source
from agentworker.jobs import JobCancelled
from agentworker.jobs import JobDeferred as WaitForResource
from agentworker.logs import get_logger
from agentworker.pools.batching import ScriptBatcher
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import Leases
from agentworker.tasks.context import CancelRequest
from agentworker.tasks.envelope import FinalFailure, JobPoisoned, JobRejected, JobTriesExhausted, JobUnreadable

log = get_logger("agentworker.worker")

#: what of ARQ this module uses (besides the key prefixes in agentworker.jobs)
ARQ_NAMES_RELIED_ON: Sequence[str] = (
    "arq.constants.abort_jobs_ss", "arq.jobs.serialize_result", "arq.utils.timestamp_ms", "arq.worker.Function",
    "arq.worker.Retry", "arq.worker.func",
)

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


def _is_utf8(raw: bytes) -> bool:
    try:
        raw.decode()
    except UnicodeDecodeError:
        return False
    return True


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
        self._on_deferred = on_deferred
        self._on_done = on_done
        self._on_final_failure = on_final_failure
        self._on_dead_letter = on_dead_letter
        self.keep_result_s = keep_result
        self.poll_delay_s = poll_delay
        self.serialize = job_serializer
        self.deserialize = job_deserializer
        self.ctx: dict[str, Any] = {**ctx, "queue": queue_name, "shard": shard, "redis": redis}
        self.q = keys.shard_id(pool_name, shard)
        self._shard_keys = [keys.ready_tenants(pool_name, shard), keys.waiting_tenants(pool_name, shard),
                            keys.capped_tenants(pool_name, shard), keys.running_jobs(pool_name, shard),
                            keys.virtual_clock(pool_name, shard)]
        self.running_key = keys.running_jobs(pool_name, shard)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.allow_pick_jobs = True
        self._claim = redis.register_script(lua_source("claim"))
        self._finish = ScriptBatcher(redis, redis.register_script(lua_source("finish")))
        self._dead_letter = redis.register_script(lua_source("dead_letter"))
        self._wakeup = asyncio.Event()
        self._stopped = False
        self._lost: set[str] = set()
        #: the cancel request of each job running here (filled in by :meth:`request_cancel`)
        self._cancels: dict[str, CancelRequest] = {}
        #: how many jobs the last claim asked for and got: a full batch means more may be waiting
        self.last_claim: tuple[int, int] = (0, 0)
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

    def request_cancel(self, job_id: str, requested_at_ms: int, by: str) -> bool:
        """The job's cancel was requested (:mod:`agentworker.job_control`): cancel its task, and let it
        end for good as cancelled (not re-queued). True if it runs here."""
        task = self.tasks.get(job_id)
        cancel = self._cancels.get(job_id)
        if task is None or task.done() or cancel is None:
            return False
        if not cancel.requested:
            cancel.requested_at_ms = requested_at_ms
            cancel.by = by
            log.info("cancelling job on request", job_id=job_id, by=by)
            task.cancel()
        return True

    def running_job_ids(self) -> list[str]:
        return [job_id for job_id, task in self.tasks.items() if not task.done()]

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
        """Claim as many jobs as the process has free slots for, in one round trip; True if the batch
        was full (more jobs may be due: poll again at once)."""
        self._reap()
        if not self.allow_pick_jobs or self.gate.closed:
            return False
        if not await self.gate.acquire(self.shard):
            return False
        slots = 1 + self.gate.take_free(self.gate.limit)
        started = 0
        try:
            entries = await self._claim_batch(slots)
            for entry in entries:
                started += await self._start(entry, started < slots)
        finally:
            for _ in range(slots - started):
                self.gate.release()
        self.last_claim = (slots, started)
        return started >= slots

    async def _claim_batch(self, slots: int) -> list[Any]:
        quota = self._pool_quota()
        reply = await self._claim(
            keys=[*self._shard_keys, self.leases.held_key, keys.dead_letters(self.pool_name), self.queue_name,
                  keys.tenant_limits(self.pool_name)],
            args=[self.q, slots, self.leases.job_ttl_ms, self.leases.holder, quota.max_crash_retries,
                  self.leases.ttl_ms, ATTEMPT_TTL_MS, RETRY_TTL_S, CAPPED_RECHECK_MS])
        entries = list(reply or [])
        for entry in entries:
            if entry[0] in (b"run", b"poisoned"):
                job_id = entry[1].decode(errors="backslashreplace")
                tenant = tenant_of_job_id(job_id)
                self.leases.track(job_id, self.running_key, tenant if int(entry[7]) and tenant else None)
        return entries

    async def _start(self, entry: list[Any], have_slot: bool) -> int:
        """Act on one entry of a claim's reply; return 1 if it took a slot (a job now running)."""
        verdict, raw = entry[0], entry[1]
        if verdict == b"capped":
            self._on_deferred(raw.decode())
            return 0
        if verdict in (b"dead", b"refused"):
            job_id = raw.decode(errors="backslashreplace")
            reason = entry[2].decode(errors="replace")
            if verdict == b"dead":
                log.warning("unreadable job moved to the dead letters", job_id=job_id, reason=reason,
                            queue=self.queue_name)
                if _is_utf8(raw):
                    await self._dead_lettered(job_id, reason, "its job record is missing or not a string")
                else:
                    self._on_dead_letter(reason, job_id)
            else:
                await self._refuse(job_id, reason)
            return 0
        try:
            job_id = raw.decode()
        except UnicodeDecodeError:
            # A non-UTF-8 id someone wrote into a tenant queue: claimed, and now dead-lettered.
            await self._move_to_dead_letters(raw, None, "non_utf8_id", "the job id is not UTF-8", float(entry[2]))
            return 0
        if not have_slot:  # cannot happen (the claim takes at most `slots`): hand it back rather than overrun
            await self._finish_job(job_id, "requeue", None, None, None, int(float(entry[2])))
            return 0
        cancel_at = entry[8] if len(entry) > 8 and entry[8] not in (b"", "", None) else None
        self.tasks[job_id] = task = asyncio.create_task(self.run_job(
            job_id, score=int(float(entry[2])), record=entry[3], job_try=int(entry[4]), crashes=int(entry[5]),
            crashed=bool(int(entry[6])), poisoned=verdict == b"poisoned",
            cancel_requested_ms=None if cancel_at is None else int(float(cancel_at))))
        task.add_done_callback(functools.partial(self._job_finished, job_id=job_id))
        return 1

    async def _refuse(self, job_id: str, reason: str) -> None:
        """A plain ARQ producer's job over its tenant's max_pending: failed as rejected, with a result."""
        error = JobRejected(f"job {job_id} was refused at adoption: {reason}")
        log.warning("adopted job refused", job_id=job_id, reason=reason, queue=self.queue_name)
        await self._report(self._failure(job_id, None, None, "rejected", error, 1))
        now = timestamp_ms()
        data = serialize_result("unknown", (), {}, 1, 0, False, error, now, now, job_id, self.queue_name, job_id,
                                serializer=self.serialize)
        with contextlib.suppress(RedisError, OSError):
            async with self.pool.pipeline(transaction=True) as pipe:
                pipe.set(jobs.result_key(job_id), data or b"", px=int(self.keep_result_s * 1000) or None)
                pipe.delete(jobs.job_key(job_id))
                await pipe.execute()

    # -- one job ---------------------------------------------------------------------------------------

    async def run_job(self, job_id: str, *, score: int, record: bytes, job_try: int, crashes: int = 0,
                      crashed: bool = False, poisoned: bool = False, cancel_requested_ms: int | None = None) -> None:
        """Run one claimed job and finish it; never raises but for a Redis failure while finishing.

        ``cancel_requested_ms``: the claim found the job's cancel requested: it is finished as cancelled
        without running. A request that arrives while it runs cancels its task (:meth:`request_cancel`)."""
        cancel = self._cancels[job_id] = CancelRequest()
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
                await asyncio.shield(self._finish_job(job_id, "requeue", None, None, None, score))
                return
        function = self.functions[name]
        quota = self._pool_quota()
        max_tries = quota.max_tries if function.max_tries is None else function.max_tries
        if cancel_requested_ms is not None:
            cancel.requested_at_ms = cancel_requested_ms
            with contextlib.suppress(RedisError, OSError):
                by = await self.pool.hget(keys.job_attempt(job_id), "cancel_by")  # type: ignore[misc]
                cancel.by = by.decode(errors="replace") if isinstance(by, bytes) else ""
            log.info("job cancelled on request before it started", job_id=job_id, task=name, by=cancel.by)
            await self._fail_for_good(job_id, name, kwargs, enqueue_ms, job_try, score, "cancelled",
                                      JobCancelled(cancel.message(job_id) + " before it started"), cancel=cancel)
            return
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
               "enqueue_time": datetime.fromtimestamp(enqueue_ms / 1000, tz=UTC), "cancel": cancel}
        start_ms = timestamp_ms()
        mode, requeue_at, success, result = "done", score, False, None
        try:
            result = await asyncio.wait_for(function.coroutine(ctx, **kwargs), function.timeout_s)
            success = True
        except Retry as exc:
            mode = "retry"
            if exc.defer_score:
                requeue_at = timestamp_ms() + exc.defer_score
        except WaitForResource as exc:
            # Waiting for a resource (the tenant's LLM budget): queued again, due later, no try spent.
            mode = "requeue"
            requeue_at = timestamp_ms() + int(exc.retry_after_s * 1000)
            self._on_deferred(job_id.split(":", 1)[0])
        except asyncio.CancelledError:
            if job_id in self._lost:
                # A lease another holder took over: its outcome wins; nothing is written here.
                mode = "requeue"
                log.warning("job lease lost to another worker; stopped running it here", job_id=job_id)
            elif cancel.requested:
                # Cancelled on request: it ends for good (the envelope told it, unless it was cancelled
                # before the envelope could).
                result = JobCancelled(cancel.message(job_id))
                if not cancel.told:
                    await self._report(self._failure(job_id, name, kwargs, "cancelled", result, job_try, enqueue_ms,
                                                     cancel=cancel))
            else:
                # A drain: the job runs again; this try is not counted.
                mode = "requeue"
        except Exception as exc:  # the task's own failure (the envelope has reported it)
            result = exc
        finished_ms = timestamp_ms()
        result_data = None
        if mode == "done":
            result_data = serialize_result(name, (), kwargs, job_try, enqueue_ms, success, result, start_ms,
                                           finished_ms, f"{job_id}:{name}", self.queue_name, job_id,
                                           serializer=self.serialize)
        await asyncio.shield(self._finish_job(job_id, mode, result_data, function, requeue_at))

    async def _fail_for_good(self, job_id: str, name: str, kwargs: dict[str, Any], enqueue_ms: int,
                             job_try: int, score: int, reason: str, error: Exception,
                             cancel: CancelRequest | None = None) -> None:
        now = timestamp_ms()
        result_data = serialize_result(name, (), kwargs, job_try, enqueue_ms, False, error, now, now,
                                       f"{job_id}:{name}", self.queue_name, job_id, serializer=self.serialize)
        await self._report(self._failure(job_id, name, kwargs, reason, error, job_try, enqueue_ms, cancel=cancel))
        await asyncio.shield(self._finish_job(job_id, "done", result_data, self.functions.get(name), score))

    async def _finish_job(self, job_id: str, mode: str, result_data: bytes | None, function: Function | None,
                          requeue_at: int | None, score: int | None = None) -> None:
        """``requeue_at``: the due time for 'retry' and 'requeue' (its old place, or later for a Retry)."""
        if score is not None:
            requeue_at = score
        keep_s = self.keep_result_s
        forever = False
        if function is not None:
            keep_s = keep_s if function.keep_result_s is None else function.keep_result_s
            forever = bool(function.keep_result_forever)
        if not forever and keep_s <= 0:
            result_data = None
        tenant = self.leases.tenant_lease_of(job_id)
        finish_keys = [jobs.in_progress_key(job_id), jobs.result_key(job_id), jobs.retry_key(job_id),
                       jobs.job_key(job_id), abort_jobs_ss, self.running_key, keys.job_attempt(job_id),
                       self.leases.held_key]
        if tenant is not None:
            finish_keys.append(keys.tenant_leases(tenant))
        args = [job_id, self.leases.holder, mode, result_data or b"", "" if forever else int(keep_s * 1000),
                "" if requeue_at is None else requeue_at, self.leases.member(job_id), self.q]
        try:
            ours = await self._finish_while_leased(job_id, finish_keys, args)
        finally:
            self.leases.forget(job_id)
        if not ours:
            log.warning("job finished here after another worker took it over; its outcome wins", job_id=job_id)

    async def _finish_while_leased(self, job_id: str, finish_keys: list[Any], args: list[Any]) -> bool:
        """Run the finish script, trying again while Redis is unreachable for as long as the job's lease
        could still be ours (one lease TTL): a Redis blip then delays the job's result by the blip, not
        by a lease lapse and a re-run. Past that, the error propagates; the lease lapses and the job runs
        again (as a crash: no try spent). A finish whose reply was lost and that is sent again finds the
        lease gone and writes nothing (it reads as "taken over"; the first one's outcome stands)."""
        give_up_at = asyncio.get_running_loop().time() + self.leases.job_ttl_ms / 1000
        delay = 0.1
        while True:
            try:
                return bool(await self._finish(keys=finish_keys, args=args))
            except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
                if asyncio.get_running_loop().time() + delay > give_up_at:
                    raise
                log.info("finishing job waits for Redis", job_id=job_id, error=str(exc) or repr(exc))
                await asyncio.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _move_to_dead_letters(self, raw: bytes, job_id: str | None, reason: str, detail: str,
                                    score: float) -> None:
        tenant = tenant_of_job_id(job_id) if job_id is not None else None
        dl_keys: list[str | bytes] = [keys.dead_letters(self.pool_name), jobs.in_progress_key("").encode() + raw,
                                      keys.job_attempt("").encode() + raw, self.leases.held_key, self.running_key]
        if tenant is not None:
            dl_keys += [keys.pending(tenant), keys.tenant_leases(tenant)]
        moved = await self._dead_letter(keys=dl_keys, args=[
            raw, dead_letter_record(reason=reason, detail=detail, queue=self.queue_name, score=score),
            self.leases.holder, self.leases.member(job_id or "")])
        self.leases.forget(job_id if job_id is not None else raw.decode(errors="backslashreplace"))
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
                 error: Exception, job_try: int, enqueue_ms: int = 0, *,
                 cancel: CancelRequest | None = None) -> FinalFailure:
        return FinalFailure(job_id=job_id, task=task, payload=payload, reason=reason, error=error, job_try=job_try,
                            queue=self.queue_name, shard=self.shard, enqueue_time_ms=enqueue_ms, cancel=cancel)

    async def _report(self, failure: FinalFailure) -> None:
        try:
            await self._on_final_failure(failure)
        except Exception as exc:  # a reporter must not stop the loop
            log.error("reporting a failed job failed", job_id=failure.job_id, error=repr(exc))

    # -- internals -------------------------------------------------------------------------------------

    def _job_finished(self, task: asyncio.Task[Any], *, job_id: str) -> None:
        self._lost.discard(job_id)
        self._cancels.pop(job_id, None)
        self.gate.release()
        self._on_done(job_id)
        slots, started = self.last_claim
        if started >= slots:  # the last claim was full: more may be due, and a slot is free now
            self._wakeup.set()

    def _reap(self) -> None:
        for job_id, task in list(self.tasks.items()):
            if task.done():
                del self.tasks[job_id]
                if not task.cancelled() and task.exception() is not None:
                    # run_job handles job errors itself; this is a Redis failure while finishing a job. Its
                    # lease lapses and the job runs again (as a crash: no try spent).
                    log.warning("finishing job failed; its lease lapses and it runs again", job_id=job_id,
                                error=repr(task.exception()))

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
