"""The envelope every job runs in, between ARQ and the task function.

It checks the job belongs where it came from (its id, its payload's tenant and the queue it was read
from must agree with the routing rule), binds the tenant and job to the logs, applies the job timeout
(the pool's, tightened by the tenant's and the task's), publishes the lifecycle events and records the
metrics. Whatever the task does, a bad job ends as a failed job with a reason; the worker goes on.

Every final failure, whatever its path, publishes ``job_failed`` with a ``reason`` and calls the task's
``on_final_failure`` hook (which ends the workflow or agent run the job was doing):

=================  ==========================================================================  =============
reason             what happened                                                               reported by
=================  ==========================================================================  =============
error              the task raised, and it is not retried (not in ``retry_on``, or no tries    the envelope
                   left)
timeout            the job ran past its timeout                                                the envelope
rejected           the job may not run here (misrouted, unknown task, bad payload)             the envelope
poisoned           its worker died each time it ran it, more than ``max_crash_retries``        the worker
tries_exhausted    it asked for another try after its last one                                 the worker
unreadable         its queue entry could not be read; it is in the pool's dead letters         the worker
=================  ==========================================================================  =============

A job cancelled on request (:mod:`agentworker.job_control`) is not a failure: it publishes
``job_cancelled`` (with ``by``, and a stable id per request) instead of ``job_failed``, counts as outcome
``cancelled``, and calls the same hook with reason ``cancelled`` (which ends the workflow run as
``cancelled``, an agent run with ``agent_cancelled``). It is cancelled while it runs (its worker cancels
the task: ``CancelledError`` with the request known), when a task finds the request itself
(:meth:`JobContext.raise_if_cancelled <agentworker.tasks.context.JobContext.raise_if_cancelled>` raises
:class:`~agentworker.jobs.JobCancelled`), or before it starts (the claim saw the request: the worker
reports it with reason ``cancelled``). A worker that is *stopping* also cancels the tasks of jobs still
running after the grace period: that is outcome ``interrupted``, and the job runs again.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from arq.worker import Retry
from redis.exceptions import RedisError

from agentworker import keys, metrics
from agentworker.config import QuotaConfig, StoredTenant
from agentworker.errors import AgentWorkerError
from agentworker.job_control import cancelled_event_id
from agentworker.jobs import JobCancelled, JobDeferred, JobId, error_record
from agentworker.logs import get_logger
from agentworker.routing import InvalidTenantId, route_tenant, validate_tenant_id
from agentworker.tasks.context import CancelRequest, JobContext, JobRuntime
from agentworker.tasks.registry import PayloadError, Task, TaskRegistry
from agentworker.tasks.schedule_outcomes import record_outcome

log = get_logger("agentworker.job")

ArqJobFunction = Callable[..., Awaitable[Any]]

_PREVIEW_CHARS = 2000


class JobRejected(AgentWorkerError):
    """The job was refused before its task ran (misrouted, malformed, unknown task)."""


class JobTimedOut(AgentWorkerError):
    """The job ran past its timeout and was cancelled."""


class JobPoisoned(AgentWorkerError):
    """The job's worker died every time it ran it, more than the pool's ``max_crash_retries``."""


class JobTriesExhausted(AgentWorkerError):
    """The job asked to be retried after its last try (``max_tries``)."""


class JobUnreadable(AgentWorkerError):
    """The queue entry could not be read as a job; it was moved to the pool's dead letters."""


#: seconds a task's on_final_failure hook may take
_HOOK_TIMEOUT_S = 10.0


@dataclass(frozen=True, slots=True)
class FinalFailure:
    """A job that failed for good outside its task (see the table above): what the worker knows of it."""

    job_id: str
    task: str | None
    payload: dict[str, Any] | None
    reason: str
    error: Exception
    job_try: int
    queue: str
    shard: int
    enqueue_time_ms: int = 0
    #: reason ``cancelled``: the request the claim saw (who asked, when)
    cancel: CancelRequest | None = None


def _result_preview(result: Any) -> Any:
    text = json.dumps(result, default=str)
    return result if len(text) <= _PREVIEW_CHARS else text[:_PREVIEW_CHARS] + "…"


def _event_tenant(job_id: str, payload_tenant: object) -> str | None:
    """The tenant whose channel may hear about a bad job: the job id's, else the payload's, if valid."""
    for candidate in (job_id.split(":", 1)[0], payload_tenant):
        try:
            return validate_tenant_id(candidate)
        except InvalidTenantId:
            continue
    return None


async def _publish(runtime: JobRuntime, tenant_id: str, event: str, data: dict[str, Any]) -> None:
    try:
        await runtime.events.publish(tenant_id, event, data)
    except (RedisError, OSError) as exc:
        # An event lost to a Redis blip must not change the job's outcome.
        log.warning("event not published", event_name=event, error=str(exc))
    if event == "job_failed" and isinstance(data.get("job_id"), str):
        # Every final failure publishes job_failed: the one place a schedule learns its job failed.
        await record_outcome(runtime, tenant_id, data["job_id"], data)


#: a worker still runs a job found where a quota file it ran with less than this long ago routed the job's
#: tenant (see :func:`misrouting_reason`)
FORMER_ROUTING_GRACE_S = 3600.0
#: per JobRuntime (by id, with a weak reference to tell a reused id): the configs it ran with, oldest first,
#: each with when this module first saw it in use
_configs_seen: dict[int, tuple[weakref.ref[JobRuntime], list[tuple[float, QuotaConfig]]]] = {}


def _former_configs(runtime: JobRuntime) -> list[QuotaConfig]:
    """Note the config ``runtime`` runs with now; return those it replaced less than
    :data:`FORMER_ROUTING_GRACE_S` ago. Called for every job (a dict lookup), so the first job after a
    reload dates it."""
    key = id(runtime)
    ref, seen = _configs_seen.get(key, (None, []))
    if ref is None or ref() is not runtime:
        seen = []
        _configs_seen[key] = (weakref.ref(runtime, lambda _ref: _configs_seen.pop(key, None)), seen)
    now = time.monotonic()
    if not seen or seen[-1][1] is not runtime.config:
        seen.append((now, runtime.config))
    while len(seen) > 1 and now - seen[1][0] > FORMER_ROUTING_GRACE_S:  # seen[0] was replaced by seen[1]
        del seen[0]
    return [config for _since, config in seen[:-1]]


def _publish_nowait(runtime: JobRuntime, tenant_id: str, event: str, data: dict[str, Any]) -> None:
    _record, written = runtime.events.publish_nowait(tenant_id, event, data)

    def lost(future: asyncio.Future[bool]) -> None:
        if not future.cancelled() and future.exception() is not None:
            log.warning("event not published", event_name=event, error=str(future.exception()))

    written.add_done_callback(lost)


def misrouting_reason(runtime: JobRuntime, job_id: str, task: str, tenant_id: object, queue: str,
                      stored: StoredTenant | None = None) -> str | None:
    """Why this job may not run here, or None if it may.

    A job must come from the queue its tenant routes to: under the worker's quota file, or under one the
    worker replaced (a reload) less than :data:`FORMER_ROUTING_GRACE_S` ago. When a reload moves a tenant
    (another pool, a pool's ``shards`` changed), the worker takes the new file on SIGHUP and the supervisor
    moves the tenant's queued jobs a moment later (:mod:`agentworker.rerouting`); a job still in the old
    queue meanwhile, or put back there afterwards (a retry, a crash of a run that began before the move),
    or enqueued there by a producer still on the old file, was queued under a routing that was right
    when it was made: it runs where it is rather than being refused. What is still queued there at the
    supervisor's next sweep is moved. A queue no file of the worker's ever routed the tenant to is a
    producer's mistake: refused. The one race left: a worker of the new queue that has not yet taken the
    new file refuses a moved job; the supervisor moves jobs only after giving the workers the reload's
    SIGHUP a moment to act (docs/supervisor.md, "Moving tenants and resharding").
    """
    try:
        validate_tenant_id(tenant_id)
    except InvalidTenantId as exc:
        return str(exc)
    assert isinstance(tenant_id, str)
    try:
        parsed = JobId.parse(job_id)
    except ValueError as exc:
        return str(exc)
    if parsed.tenant_id != tenant_id:
        return f"job id names tenant {parsed.tenant_id!r} but the payload's tenant_id is {tenant_id!r}"
    if parsed.task != task:
        return f"job id names task {parsed.task!r} but the job runs {task!r}"
    route = route_tenant(runtime.config, tenant_id, stored)
    former = _former_configs(runtime)
    if route.queue == queue or any(route_tenant(config, tenant_id, stored).queue == queue for config in former):
        return None
    if stored is not None and stored.previous_queue and queue == f"{keys.PREFIX}:queue:{stored.previous_queue}":
        return None  # the queue a tenant-store change just moved the tenant from (agentworker.tenants)
    return f"tenant {tenant_id!r} routes to {route.queue}, not to {queue} where this job was found"


async def reject(runtime: JobRuntime, arq_ctx: dict[str, Any], reason: str, task: str | None,
                 payload_tenant: object, *, hook: tuple[Task, dict[str, Any]] | None = None) -> None:
    """Fail a job that may not run: log it, count it, tell its tenant, raise :class:`JobRejected`."""
    job_id = arq_ctx["job_id"]
    tenant = _event_tenant(job_id, payload_tenant)
    log.warning("job rejected", job_id=job_id, tenant_id=tenant, task=task, reason=reason,
                queue=arq_ctx.get("queue"))
    metrics.JOBS_TOTAL.labels(runtime.pool, metrics.task_label(runtime.task_names, task), "rejected").inc()
    metrics.TENANT_JOBS_TOTAL.labels(runtime.pool, metrics.tenant_label(runtime.config, tenant),
                                     "rejected").inc()
    if tenant is not None:
        base = {"job_id": job_id, "task": task, "try": arq_ctx.get("job_try")}
        await _publish(runtime, tenant, "job_rejected", {**base, "reason": reason})
        await _publish(runtime, tenant, "job_failed",
                       {**base, "reason": "rejected", "error": "JobRejected", "message": reason})
    error = JobRejected(reason)
    if hook is not None and tenant is not None and hook[1].get("tenant_id") == tenant:
        # A rejected job may still have begun a run on an earlier try (e.g. before a reshard): end it.
        ctx = _context(runtime, tenant_id=tenant, job_id=job_id, task=hook[0].name,
                       job_try=arq_ctx.get("job_try") or 1, queue=arq_ctx.get("queue", ""),
                       shard=arq_ctx.get("shard", 0), enqueue_time_ms=0, timeout=_HOOK_TIMEOUT_S)
        await _run_final_failure_hook(hook[0], ctx, hook[1], "rejected", error)
    raise error


def _context(runtime: JobRuntime, *, tenant_id: str, job_id: str, task: str, job_try: int, queue: str,
             shard: int, enqueue_time_ms: int, timeout: float, cancel: CancelRequest | None = None) -> JobContext:
    bound = log.bind(tenant_id=tenant_id, job_id=job_id, task=task)
    return JobContext(tenant_id=tenant_id, job_id=job_id, task=task, job_try=job_try, queue=queue, shard=shard,
                      enqueue_time_ms=enqueue_time_ms, timeout=timeout, runtime=runtime, log=bound,
                      cancel=cancel if cancel is not None else CancelRequest())


async def _run_final_failure_hook(task: Task, ctx: JobContext, payload: dict[str, Any], reason: str,
                                  error: BaseException) -> None:
    if task.on_final_failure is None:
        return
    try:
        async with asyncio.timeout(_HOOK_TIMEOUT_S):
            await task.on_final_failure(ctx, payload, reason, error)
    except Exception as exc:  # a hook must not change the job's outcome; the run sweeper is the backstop
        ctx.log.error("final-failure hook failed", reason=reason, error=repr(exc))


async def report_final_failure(runtime: JobRuntime, registry: TaskRegistry, failure: FinalFailure) -> None:
    """Report a job that failed for good outside its task: log, count, ``job_failed``, the task's hook."""
    tenant = _event_tenant(failure.job_id, (failure.payload or {}).get("tenant_id"))
    error = error_record(failure.error)
    log.warning("job failed for good", job_id=failure.job_id, tenant_id=tenant, task=failure.task,
                reason=failure.reason, message=error["message"])
    metrics.JOBS_TOTAL.labels(runtime.pool, metrics.task_label(registry.names(), failure.task), failure.reason).inc()
    metrics.TENANT_JOBS_TOTAL.labels(runtime.pool, metrics.tenant_label(runtime.config, tenant),
                                     failure.reason).inc()
    if tenant is None:
        return
    base = {"job_id": failure.job_id, "task": failure.task, "try": failure.job_try}
    task = registry.get(failure.task) if failure.task else None
    hooked = task is not None and failure.payload is not None and failure.payload.get("tenant_id") == tenant
    if failure.reason == "cancelled":
        ctx = _context(runtime, tenant_id=tenant, job_id=failure.job_id, task=failure.task or "unknown",
                       job_try=failure.job_try, queue=failure.queue, shard=failure.shard,
                       enqueue_time_ms=failure.enqueue_time_ms, timeout=_HOOK_TIMEOUT_S, cancel=failure.cancel)
        await tell_cancelled(ctx, task if hooked else None, failure.payload or {}, base)
        return
    await _publish(runtime, tenant, "job_failed", {**base, "reason": failure.reason, **error})
    if task is None or failure.payload is None or not hooked:
        return
    ctx = _context(runtime, tenant_id=tenant, job_id=failure.job_id, task=task.name, job_try=failure.job_try,
                   queue=failure.queue, shard=failure.shard, enqueue_time_ms=failure.enqueue_time_ms,
                   timeout=_HOOK_TIMEOUT_S)
    await _run_final_failure_hook(task, ctx, failure.payload, failure.reason, failure.error)


async def tell_cancelled(ctx: JobContext, task: Task | None, payload: dict[str, Any], base: dict[str, Any]) -> None:
    """Tell that the job was cancelled on request: a log line, ``job_cancelled`` (its id stable per
    request, so a second telling is the same event), its schedule's outcome, and the task's hook with
    reason ``cancelled``. Never raises for a lost event."""
    cancel = ctx.cancel
    if cancel.told:
        return
    cancel.told = True
    error = JobCancelled(cancel.message(ctx.job_id))
    ctx.log.info("job cancelled on request", by=cancel.by)
    data = {**base, "reason": "requested", "by": cancel.by, **error_record(error)}
    requested_ms = cancel.requested_at_ms if cancel.requested_at_ms is not None else int(time.time() * 1000)
    event_id = cancelled_event_id(ctx.tenant_id, ctx.job_id, requested_ms)
    events = ctx.runtime.events
    try:
        _record, body = events.prepare(ctx.tenant_id, "job_cancelled", data, event_id)
        await events.publish_once_nowait(ctx.tenant_id, event_id, body)
    except (RedisError, OSError) as exc:
        log.warning("event not published", event_name="job_cancelled", error=str(exc))
    await record_outcome(ctx.runtime, ctx.tenant_id, ctx.job_id, {**data, "reason": "cancelled"})
    if task is not None:
        await _run_final_failure_hook(task, ctx, payload, "cancelled", error)


def make_reject_function() -> ArqJobFunction:
    """The ARQ function that malformed jobs are decoded into (see ``jobs.WorkerJobDecoder``)."""

    async def _reject(arq_ctx: dict[str, Any], reason: str, task: str | None = None,
                      payload_tenant_id: str | None = None) -> None:
        await reject(arq_ctx["runtime"], arq_ctx, reason, task, payload_tenant_id)

    return _reject


def make_job_function(task: Task) -> ArqJobFunction:
    """The ARQ coroutine for ``task``: the task wrapped in the envelope."""

    async def run(arq_ctx: dict[str, Any], **payload: Any) -> Any:
        return await run_in_envelope(task, arq_ctx, payload)

    run.__name__ = task.name
    return run


async def run_in_envelope(task: Task, arq_ctx: dict[str, Any], payload: dict[str, Any]) -> Any:
    """Run one job of ``task``: refuse it if it may not run here, else run it under its timeout, tell how
    it ended (a log line, an event, the task's final-failure hook) and count it."""
    ctx = await _admit(task, arq_ctx, payload)
    run = _Run(task, ctx, payload)
    queue_wait_s = max(0.0, time.time() - arq_ctx["score"] / 1000)
    meters = _Meters(ctx, queue_wait_s)
    outcome = "failure"  # should anything below fail before the outcome is known
    with structlog.contextvars.bound_contextvars(tenant_id=ctx.tenant_id, job_id=ctx.job_id, task=task.name):
        run.announce(queue_wait_s)
        try:
            result = await run.call()
        except BaseException as error:
            ending = run.ending_of(error)
            outcome = ending.outcome
            if ending is _Ending.RETRY_ON_ERROR:
                raise await run.retry_later(error) from error
            await run.tell(ending, error)
            raise
        else:
            outcome = "success"
            await run.tell_completed(result, duration_s=time.monotonic() - meters.started)
            await record_outcome(ctx.runtime, ctx.tenant_id, ctx.job_id, None)
            return result
        finally:
            meters.stop(outcome)


async def _stored_entry(runtime: JobRuntime, tenant_id: object, *, fresh: bool = False) -> StoredTenant | None:
    """The tenant's tenant-store entry (None for none, or for an id that is not a valid tenant id). Redis
    unreachable: the entry cached last, however old (the job came from Redis a moment ago; what it
    reports goes there too)."""
    if not isinstance(tenant_id, str):
        return None
    try:
        validate_tenant_id(tenant_id)
    except InvalidTenantId:
        return None
    try:
        return await runtime.tenants.get(tenant_id, fresh=fresh)
    except (RedisError, OSError):
        return runtime.tenants.cached(tenant_id, stale=True)


async def _admit(task: Task, arq_ctx: dict[str, Any], payload: dict[str, Any]) -> JobContext:
    """The job's context, once the job is known to belong here and its payload to fit the task; else
    :func:`reject` it (which raises :class:`JobRejected`)."""
    runtime: JobRuntime = arq_ctx["runtime"]
    job_id: str = arq_ctx["job_id"]
    queue: str = arq_ctx["queue"]
    tenant_id = payload.get("tenant_id")
    stored = await _stored_entry(runtime, tenant_id)
    reason = misrouting_reason(runtime, job_id, task.name, tenant_id, queue, stored)
    if reason is not None:  # a tenant-store change may have moved the tenant here a moment ago
        fresh = await _stored_entry(runtime, tenant_id, fresh=True)
        if fresh is not None:
            stored = fresh
            reason = misrouting_reason(runtime, job_id, task.name, tenant_id, queue, stored)
    if reason is not None:
        await reject(runtime, arq_ctx, reason, task.name, tenant_id, hook=(task, payload))
    assert isinstance(tenant_id, str)
    timeout = runtime.config.job_timeout_for(tenant_id, stored)
    if task.timeout is not None:
        timeout = min(timeout, task.timeout)
    ctx = _context(runtime, tenant_id=tenant_id, job_id=job_id, task=task.name,
                   job_try=arq_ctx.get("job_try") or 1, queue=queue, shard=arq_ctx["shard"],
                   enqueue_time_ms=int(arq_ctx["enqueue_time"].timestamp() * 1000), timeout=timeout,
                   cancel=arq_ctx.get("cancel"))
    try:
        task.check_payload(ctx, payload)
    except PayloadError as exc:
        await reject(runtime, arq_ctx, str(exc), task.name, tenant_id, hook=(task, payload))
    return ctx


class _Ending(enum.Enum):
    """How a run that raised ended (:meth:`_Run.ending_of`): the outcome it is counted as, and what it is."""

    TIMED_OUT = "timeout", "it ran past its deadline (told as it happened)"
    RETRY_ASKED = "retry", "the task raised ARQ's Retry"
    RETRY_ON_ERROR = "retry", "the task raised one of its retry_on, with tries left: ARQ gets a Retry"
    INTERRUPTED = "interrupted", "the worker cancelled it (stopping): the job runs again"
    CANCEL_REQUESTED = "cancelled", "cancelled on request (job_control): ends for good, no retry"
    DEFERRED = "deferred", "it must wait for a resource (its tenant's LLM budget): queued again, no try spent"
    FAILED = "failure", "the task raised any other error: the job failed for good"
    UNTOLD = "failure", "not an error (KeyboardInterrupt...), or a JobTimedOut of the task's own: only counted"

    @property
    def outcome(self) -> str:
        """The ``outcome`` label of the job counters."""
        return self.value[0]


class _Run:
    """One run of an admitted job: the task called under its deadline, and what is told of how it ended."""

    def __init__(self, task: Task, ctx: JobContext, payload: dict[str, Any]) -> None:
        self.task = task
        self.ctx = ctx
        self.payload = payload
        #: what every lifecycle event of the run carries
        self.base: dict[str, Any] = {"job_id": ctx.job_id, "task": task.name, "try": ctx.job_try}
        self.timed_out = False

    def announce(self, queue_wait_s: float) -> None:
        self.ctx.log.info("job started", try_number=self.ctx.job_try, queue_wait_s=round(queue_wait_s, 4),
                          timeout_s=self.ctx.timeout)
        # Not awaited: the task starts without waiting for the round trip; later events stay after it.
        _publish_nowait(self.ctx.runtime, self.ctx.tenant_id, "job_started", self.base)

    async def call(self) -> Any:
        """The task's result, checked to be JSON. At the deadline the job fails as timed out: that is told
        here, as it happens, and :class:`JobTimedOut` raised; whatever interrupts the telling (the worker
        cancelling the job meanwhile) ends the run instead, like anything else the task raises."""
        deadline = asyncio.timeout(self.ctx.timeout)
        try:
            async with deadline:
                result = await self.task.func(self.ctx, **self.payload)
        except TimeoutError:
            # A TimeoutError the task raised itself (not our deadline) is a failure like any other.
            if not deadline.expired():
                raise
            self.timed_out = True
            raise await self._tell_timed_out() from None
        try:
            json.dumps(result)
        except (TypeError, ValueError) as exc:
            raise TypeError(f"task {self.task.name!r} returned a value that is not JSON: {exc}") from None
        return result

    def ending_of(self, error: BaseException) -> _Ending:
        """How the run ended, by what :meth:`call` raised."""
        if isinstance(error, JobTimedOut) or not isinstance(error, Exception | asyncio.CancelledError):
            return _Ending.TIMED_OUT if self.timed_out else _Ending.UNTOLD
        if isinstance(error, Retry):
            return _Ending.RETRY_ASKED
        if isinstance(error, JobCancelled) or (isinstance(error, asyncio.CancelledError) and self.ctx.cancel.requested):
            return _Ending.CANCEL_REQUESTED
        if isinstance(error, asyncio.CancelledError):
            return _Ending.INTERRUPTED
        if isinstance(error, JobDeferred):
            return _Ending.DEFERRED
        runtime = self.ctx.runtime
        max_tries = runtime.config.pools[runtime.pool].max_tries
        if isinstance(error, self.task.retry_on) and self.ctx.job_try < max_tries:
            return _Ending.RETRY_ON_ERROR
        return _Ending.FAILED

    async def tell(self, ending: _Ending, error: BaseException) -> None:
        """Log and publish how the run ended (but RETRY_ON_ERROR: :meth:`retry_later`); a job that failed
        for good also gets its task's final-failure hook."""
        if ending is _Ending.RETRY_ASKED:
            assert isinstance(error, Retry)
            defer = (error.defer_score or 0) / 1000
            self.ctx.log.info("job will be retried", defer_s=defer)
            await self._publish("job_retrying", {"defer": defer})
        elif ending is _Ending.INTERRUPTED:
            self.ctx.log.info("job interrupted (its worker is stopping); it will run again")
        elif ending is _Ending.CANCEL_REQUESTED:
            await tell_cancelled(self.ctx, self.task, self.payload, self.base)
        elif ending is _Ending.DEFERRED:
            assert isinstance(error, JobDeferred)
            self.ctx.log.info("job deferred; it runs again later without spending a try", reason=error.reason,
                              defer_s=round(error.retry_after_s, 3), detail=str(error))
            await self._publish("job_deferred", {"defer": round(error.retry_after_s, 3), "reason": error.reason,
                                                 "message": str(error)})
        elif ending is _Ending.FAILED:
            self.ctx.log.exception("job failed", exc_info=error)
            await self._publish("job_failed", {"reason": "error", **error_record(error)})
            await _run_final_failure_hook(self.task, self.ctx, self.payload, "error", error)

    async def retry_later(self, error: BaseException) -> Retry:
        """Tell that the run failed with an error its task retries; return the Retry that asks ARQ for it."""
        defer = min(300.0, 2.0 ** self.ctx.job_try)
        self.ctx.log.warning("job failed, will be retried", error=repr(error), defer_s=defer)
        await self._publish("job_retrying", {"defer": defer, **error_record(error)})
        return Retry(defer=defer)

    async def tell_completed(self, result: Any, *, duration_s: float) -> None:
        self.ctx.log.info("job completed", duration_s=round(duration_s, 4))
        await self._publish("job_completed", {"result": _result_preview(result)})

    async def _tell_timed_out(self) -> JobTimedOut:
        timeout = self.ctx.timeout
        self.ctx.log.warning("job timed out", timeout_s=timeout)
        await self._publish("job_timed_out", {"timeout": timeout})
        timed_out = JobTimedOut(f"{self.task.name} timed out after {timeout:g}s")
        await self._publish("job_failed", {"reason": "timeout", **error_record(timed_out)})
        await _run_final_failure_hook(self.task, self.ctx, self.payload, "timeout", timed_out)
        return timed_out

    async def _publish(self, event: str, data: dict[str, Any]) -> None:
        await _publish(self.ctx.runtime, self.ctx.tenant_id, event, {**self.base, **data})


class _Meters:
    """A run's metrics: its queue wait and the in-progress gauges as it starts, its count and duration
    as it ends."""

    def __init__(self, ctx: JobContext, queue_wait_s: float) -> None:
        self.pool = ctx.runtime.pool
        self.task = ctx.task
        self.tenant = metrics.tenant_label(ctx.runtime.config, ctx.tenant_id)
        metrics.JOB_QUEUE_WAIT.labels(self.pool).observe(queue_wait_s)
        self.in_progress = metrics.JOBS_IN_PROGRESS.labels(self.pool)
        self.tenant_in_progress = metrics.TENANT_JOBS_IN_PROGRESS.labels(self.pool, self.tenant)
        self.in_progress.inc()
        self.tenant_in_progress.inc()
        self.started = time.monotonic()

    def stop(self, outcome: str) -> None:
        self.in_progress.dec()
        self.tenant_in_progress.dec()
        metrics.JOBS_TOTAL.labels(self.pool, self.task, outcome).inc()
        metrics.TENANT_JOBS_TOTAL.labels(self.pool, self.tenant, outcome).inc()
        metrics.JOB_DURATION.labels(self.pool, self.task).observe(time.monotonic() - self.started)
