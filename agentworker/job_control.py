"""Job control: look at one job, cancel it, or run a failed one again (the client, the CLI and the admin
HTTP endpoints all call these functions).

**What a cancel does** depends on where the job is, decided atomically in one script
(``agentworker/lua/cancel.lua``):

* *queued or deferred* (in its tenant's queue, or in its shard's inbox): removed at once. Its record and
  retry counter go, it leaves its tenant's pending set (``max_pending`` counts it no more), and its result
  is written as a failed one whose error is ``JobCancelled``, so :meth:`JobHandle.result
  <agentworker.client.JobHandle.result>` raises ``JobFailed`` with ``error == "JobCancelled"``. A
  ``job_cancelled`` event is published. The view answered is ``cancelled``.
* *running*: a cancel request is recorded: the job id joins ARQ's own abort set (``arq:abort``, scored by
  when it was first asked, so asking twice changes nothing) and who asked goes on its attempt record. Its
  worker looks at that set every half second for the jobs it runs and cancels the job's asyncio task; the
  job then ends for good as ``JobCancelled`` (no retry, no dead letter, a ``job_cancelled`` event,
  ``agentworker_jobs_total{outcome="cancelled"}``), and the workflow or agent run it drove ends
  ``cancelled``. A workflow run also checks for the request before it starts each step, so a step that
  has not begun never runs. The view answered is ``running`` with ``cancel_requested``.
* *finished* (a result is kept): :class:`JobNotCancellable`. *Unknown*: :class:`JobNotFound`.

A job that exists but is in no queue and holds no lease (its lease lapsed and no claim has put it back
yet) gets the request too: the claim that takes it next finishes it as cancelled without running it.

This is not the cancellation of a worker that is stopping (SIGTERM past the grace period): that one puts
the job back in its queue, to run again without spending a try.

**Retry** (:func:`retry_job`) is for a job that ended ``failed`` or ``cancelled``: it is enqueued again
under the same job id with the task and arguments its result record kept, through the same admission
as any enqueue (``max_pending``, ``rate_limit``: :class:`~agentworker.submit.QuotaExceeded`, and the old
result is put back). Its tries start from one. A job whose arguments are no longer known (its result
expired after ``AGENTWORKER_KEEP_RESULT`` seconds, or it was refused before its arguments could be read)
cannot be retried: :class:`JobNotRetryable`.

**Where a queued job is**: its tenant's queue in the shard it routes to, which this module learns from
the config it is given, else from the routing table the supervisor publishes (``agentworker:routing``),
with the tenant's tenant-store entry laid over it; also the shard of its last attempt and the shard the
tenant was moved from. With neither a config nor a routing table, the tenant's queues are looked up by
name (a ``SCAN``; only then).

Job ids are checked (at most :data:`MAX_JOB_ID_CHARS` characters, ``tenant:task:key`` with each part
valid as :mod:`agentworker.jobs` makes them) before anything is read from Redis.

This module imports nothing of the job side (graphs, tasks, tools, pools): the supervisor's HTTP port
calls it.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from arq.constants import abort_jobs_ss
from arq.jobs import serialize_result
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from agentworker import jobs, keys
from agentworker.config import QuotaConfig
from agentworker.errors import AgentWorkerError
from agentworker.events import EventPublisher, stable_event_id
from agentworker.job_leases import lua_source
from agentworker.jobs import InvalidJob, JobCancelled, JobId
from agentworker.rerouting import config_of_routing_table
from agentworker.routing import InvalidTenantId, route_tenant
from agentworker.submit import JobSubmitter
from agentworker.tenants import MAX_BY_CHARS, TenantDirectory, valid_by

__all__ = [
    "CANCEL_REQUESTS",
    "MAX_JOB_ID_CHARS",
    "JobCancelled",
    "JobNotCancellable",
    "JobNotFound",
    "JobNotRetryable",
    "JobView",
    "cancel_job",
    "cancel_requests",
    "finished_status",
    "get_job",
    "parse_job_id",
    "prune_cancel_requests",
    "retry_job",
]

#: the longest job id: a tenant id (63), a task name (64), an idempotency key (200) and two colons
MAX_JOB_ID_CHARS = 63 + 1 + 64 + 1 + 200
#: the sorted set of cancel requests (ARQ's own abort set: job id -> when first asked, ms)
CANCEL_REQUESTS = abort_jobs_ss
#: how long a retried job's old result is kept aside while the job is enqueued again (then put back or
#: dropped; this only bounds a process dying in between)
_RETRY_HOLD_MS = 3_600_000
#: results are kept this long when the caller does not say (AGENTWORKER_KEEP_RESULT's default)
DEFAULT_KEEP_RESULT_S = 86_400.0

STATUSES = ("queued", "deferred", "running", "completed", "failed", "cancelled", "not_found")


#: the supervisor drops a cancel request this old whose job Redis no longer knows (:func:`prune_cancel_requests`)
STALE_REQUEST_S = 600.0

# For each of the oldest requests (from ARGV[3], at most ARGV[2], asked before ARGV[1] ms): dropped if
# neither its job's record nor its in-progress marker exists (the job finished some other way, or expired
# unclaimed). Returns {removed, looked at}.
_PRUNE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', tonumber(ARGV[3]), tonumber(ARGV[2]))
local removed = 0
for _, id in ipairs(ids) do
  if redis.call('EXISTS', ARGV[4] .. id) == 0 and redis.call('EXISTS', ARGV[5] .. id) == 0 then
    redis.call('ZREM', KEYS[1], id)
    removed = removed + 1
  end
end
return {removed, #ids}
"""


class JobNotFound(AgentWorkerError, LookupError):
    """Nothing is known of that job id (never enqueued, or its result has expired)."""


class JobNotCancellable(AgentWorkerError, ValueError):
    """The job has already finished (completed, failed or cancelled): there is nothing to cancel."""


class JobNotRetryable(AgentWorkerError, ValueError):
    """The job did not end failed or cancelled, or its arguments are no longer known."""


@dataclass(frozen=True)
class JobView:
    """One job as operators see it. Times are unix seconds (None: not yet, or not known)."""

    job_id: str
    tenant_id: str
    task: str
    queue: str
    #: one of :data:`STATUSES`
    status: str
    tries: int
    enqueued_at: float | None
    started_at: float | None
    finished_at: float | None
    #: the result of a completed job, else None
    result: Any
    #: ``{"error": name, "message": ...}`` of a failed or cancelled job, else None
    error: dict[str, Any] | None
    cancel_requested: bool

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def parse_job_id(job_id: object) -> JobId:
    """The job id's parts; :class:`~agentworker.jobs.InvalidJob` (one sentence) for anything that is not a
    job id this service makes. Nothing is read from Redis."""
    if not isinstance(job_id, str):
        raise InvalidJob(f"a job id is a string, not {type(job_id).__name__}")
    if len(job_id) > MAX_JOB_ID_CHARS:
        raise InvalidJob(f"job id is {len(job_id)} characters, over the {MAX_JOB_ID_CHARS}-character limit")
    if not job_id.isascii() or not job_id.isprintable() or " " in job_id:
        raise InvalidJob(f"job id {job_id!r} is not printable ASCII without spaces")
    parsed = JobId.parse(job_id)
    try:
        jobs.make_job_id(parsed.tenant_id, parsed.task, parsed.key)
    except InvalidTenantId as exc:
        raise InvalidJob(f"job id {job_id!r} does not start with a valid tenant id: {exc}") from None
    return parsed


def check_by(by: object) -> str:
    """Who asks: at most :data:`MAX_BY_CHARS` printable ASCII characters (:class:`InvalidJob` else)."""
    if not valid_by(by, blank_ok=True):
        raise InvalidJob(f"who asks (by) must be at most {MAX_BY_CHARS} printable ASCII characters")
    return by


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _seconds(ms: Any) -> float | None:
    try:
        value = float(ms)
    except (TypeError, ValueError):
        return None
    return value / 1000 if value > 0 else None


# -- reading ---------------------------------------------------------------------------------------------


async def get_job(redis: Redis, job_id: str, *, config: QuotaConfig | None = None) -> JobView:
    """The job's view; status ``not_found`` when nothing is known of it. ``config``: the quota file that
    routes its tenant (default: the supervisor's published routing table), to tell queued from deferred."""
    parsed = parse_job_id(job_id)
    async with redis.pipeline(transaction=True) as pipe:  # one snapshot: a job finishing meanwhile is seen once
        pipe.get(jobs.result_key(job_id))
        pipe.get(jobs.job_key(job_id))
        pipe.exists(jobs.in_progress_key(job_id))
        pipe.zscore(CANCEL_REQUESTS, job_id)
        pipe.hgetall(keys.job_attempt(job_id))
        pipe.get(jobs.retry_key(job_id))
        result_raw, record_raw, running, cancel_at, attempt_raw, tries_raw = await pipe.execute()
    attempt = {_text(k): _text(v) for k, v in (attempt_raw or {}).items()}
    base = {"job_id": job_id, "tenant_id": parsed.tenant_id, "task": parsed.task}
    if result_raw is not None:
        return _finished_view(base, result_raw)
    if record_raw is None:
        return JobView(**base, queue="", status="not_found", tries=0, enqueued_at=None, started_at=None,
                       finished_at=None, result=None, error=None, cancel_requested=False)
    record = _json_object(record_raw)
    tries = int(tries_raw) if tries_raw is not None and _text(tries_raw).isdigit() else 0
    enqueued_at = _seconds(record.get("et"))
    if running:
        return JobView(**base, queue=_queue_of(attempt.get("q")), status="running", tries=tries,
                       enqueued_at=enqueued_at, started_at=_seconds(attempt.get("since")), finished_at=None,
                       result=None, error=None, cancel_requested=cancel_at is not None)
    place, score = await _queued_place(redis, parsed, attempt.get("q"), config)
    deferred = score is not None and score > time.time() * 1000
    return JobView(**base, queue=_queue_of(place), status="deferred" if deferred else "queued", tries=tries,
                   enqueued_at=enqueued_at, started_at=None, finished_at=None, result=None, error=None,
                   cancel_requested=cancel_at is not None)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = jobs.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _status_of(record: dict[str, Any]) -> str:
    """``completed``, ``failed`` or ``cancelled``: how the job of a result record ended."""
    if record.get("s"):
        return "completed"
    outcome = record.get("r")
    return "cancelled" if isinstance(outcome, dict) and outcome.get("error") == JobCancelled.__name__ else "failed"


def finished_status(raw: bytes) -> str:
    """How the job of a stored result (``arq:result:{id}``) ended: ``completed``, ``failed`` or ``cancelled``
    (an unreadable record reads as failed)."""
    return _status_of(_json_object(raw))


def _finished_view(base: dict[str, Any], raw: bytes) -> JobView:
    record = _json_object(raw)
    status = _status_of(record)
    success = status == "completed"
    outcome = record.get("r")
    error = None
    if not success:
        error = outcome if isinstance(outcome, dict) and "error" in outcome else \
            {"error": None, "message": str(outcome)}
    tries = record.get("t")
    return JobView(**base, queue=str(record.get("q") or ""), status=status,
                   tries=tries if isinstance(tries, int) and not isinstance(tries, bool) else 1,
                   enqueued_at=_seconds(record.get("et")), started_at=_seconds(record.get("st")),
                   finished_at=_seconds(record.get("ft")), result=outcome if success else None, error=error,
                   cancel_requested=False)


def _queue_of(shard: str | None) -> str:
    return f"{keys.PREFIX}:queue:{shard}" if shard else ""


async def _candidate_shards(redis: Redis, tenant_id: str, last_attempt: str | None,
                            config: QuotaConfig | None) -> list[str]:
    """The shards (``{pool}:{shard}``) where the tenant's job may be queued, most likely first."""
    shards: list[str] = []

    def add(shard: str | None) -> None:
        if shard and shard not in shards:
            shards.append(shard)

    routing = config if config is not None else config_of_routing_table(await redis.get(keys.ROUTING))
    if routing is not None:
        stored = await TenantDirectory(redis).get(tenant_id, fresh=True)
        try:
            route = route_tenant(routing, tenant_id, stored)
        except (KeyError, ValueError, AgentWorkerError):  # a stored pool the table does not know
            route = route_tenant(routing, tenant_id)
        add(f"{route.pool}:{route.shard}")
        if stored is not None:
            add(stored.previous_queue)
    add(last_attempt)
    if routing is None:  # nothing says where the tenant routes: its queues by name (rare; bounded by SCAN)
        prefix = f"{keys.PREFIX}:tq:"
        async for key in redis.scan_iter(match=f"{prefix}*:*:{tenant_id}", count=1000):
            add(_text(key)[len(prefix):-(len(tenant_id) + 1)])
    return shards


async def _queued_place(redis: Redis, parsed: JobId, last_attempt: str | None,
                        config: QuotaConfig | None) -> tuple[str | None, float | None]:
    shards = await _candidate_shards(redis, parsed.tenant_id, last_attempt, config)
    job_id = str(parsed)
    async with redis.pipeline(transaction=False) as pipe:
        for shard in shards:
            pool, _, number = shard.rpartition(":")
            pipe.zscore(f"{keys.PREFIX}:tq:{shard}:{parsed.tenant_id}", job_id)
            pipe.zscore(keys.queue(pool, int(number)) if number.isdigit() else f"{keys.PREFIX}:queue:{shard}",
                        job_id)
        scores = await pipe.execute()
    for i, shard in enumerate(shards):
        for score in scores[2 * i:2 * i + 2]:
            if score is not None:
                return shard, float(score)
    return (shards[0] if shards else None), None


# -- cancel ----------------------------------------------------------------------------------------------


async def cancel_job(redis: Redis, job_id: str, *, by: str = "", config: QuotaConfig | None = None,
                     events: EventPublisher | None = None, keep_result_s: float | None = None) -> JobView:
    """Cancel the job (see the module's docstring); return its view after the request: ``cancelled``
    (it was queued or deferred: removed at once) or ``running`` with ``cancel_requested`` (its worker
    cancels it within about a second). ``by``: who asks (logged on the attempt, in the event).

    Raises :class:`JobNotFound`, :class:`JobNotCancellable` (it has finished), or
    :class:`~agentworker.jobs.InvalidJob` for a bad id (before any Redis access)."""
    parsed = parse_job_id(job_id)
    by = check_by(by)
    async with redis.pipeline(transaction=False) as pipe:
        pipe.get(jobs.job_key(job_id))
        pipe.hget(keys.job_attempt(job_id), "q")
        pipe.get(jobs.retry_key(job_id))
        record_raw, last_attempt, tries_raw = await pipe.execute()
    if record_raw is None:
        raise await _not_cancellable(redis, job_id)
    shards = await _candidate_shards(redis, parsed.tenant_id, _text(last_attempt) if last_attempt else None,
                                     config)
    record = _json_object(record_raw)
    now_ms = int(time.time() * 1000)
    message = f"job {job_id} was cancelled" + (f" by {by}" if by else "") + " before it started"
    task = str(record["f"]) if isinstance(record.get("f"), str) else parsed.task
    kwargs: dict[str, Any] = record["k"] if isinstance(record.get("k"), dict) else {}
    tries = int(tries_raw) if tries_raw is not None and _text(tries_raw).isdigit() else 0
    et = int(record["et"]) if isinstance(record.get("et"), int) else 0
    keep_s = DEFAULT_KEEP_RESULT_S if keep_result_s is None else keep_result_s
    result = serialize_result(task, (), kwargs, max(tries, 1), et, False, JobCancelled(message), now_ms, now_ms,
                              f"{job_id}:{task}", _queue_of(shards[0] if shards else None), job_id,
                              serializer=jobs.dumps) or b""
    cancel = redis.register_script(lua_source("cancel"))
    reply = await cancel(
        keys=[jobs.job_key(job_id), jobs.result_key(job_id), jobs.in_progress_key(job_id), CANCEL_REQUESTS,
              keys.pending(parsed.tenant_id), jobs.retry_key(job_id), keys.job_attempt(job_id)],
        args=[job_id, result, int(max(keep_s, 1.0) * 1000), by, *shards])
    verdict = _text(reply[0])
    if verdict in ("finished", "not_found"):
        raise await _not_cancellable(redis, job_id)
    if verdict == "cancelled":
        data = {"job_id": job_id, "task": task, "try": tries or None, "reason": "queued", "by": by,
                "error": JobCancelled.__name__, "message": message}
        with contextlib.suppress(RedisError, OSError):  # the job is cancelled; a lost event must not say otherwise
            await _publish_cancelled(events or EventPublisher(redis), parsed.tenant_id, data, now_ms)
    return await get_job(redis, job_id, config=config)


async def _not_cancellable(redis: Redis, job_id: str) -> AgentWorkerError:
    view = await get_job(redis, job_id)
    if view.status == "not_found":
        return JobNotFound(f"job {job_id} is not known (never enqueued, or its result has expired)")
    return JobNotCancellable(f"job {job_id} has already finished ({view.status}); there is nothing to cancel")


def cancelled_event_id(tenant_id: str, job_id: str, requested_ms: int | float) -> str:
    """The stable id of a job's ``job_cancelled`` event: one per cancel request (by when it was asked)."""
    return stable_event_id(tenant_id, "job", job_id, "job_cancelled", int(requested_ms))


async def _publish_cancelled(events: EventPublisher, tenant_id: str, data: dict[str, Any], requested_ms: int) -> None:
    event_id = cancelled_event_id(tenant_id, data["job_id"], requested_ms)
    _record, body = events.prepare(tenant_id, "job_cancelled", data, event_id)
    await events.publish_once_nowait(tenant_id, event_id, body)


# -- retry -----------------------------------------------------------------------------------------------


async def retry_job(redis: Redis, config: QuotaConfig, job_id: str, *, by: str = "",
                    events: EventPublisher | None = None, max_payload_bytes: int = jobs.DEFAULT_MAX_PAYLOAD_BYTES,
                    ) -> JobView:
    """Enqueue a failed or cancelled job again under the same job id, with the task and arguments its
    result kept; return its new view (``queued``, or already ``running``). Admission applies: over its
    tenant's limits it raises :class:`~agentworker.submit.QuotaExceeded` and the old result stays.

    Raises :class:`JobNotFound`, :class:`JobNotRetryable`, or :class:`~agentworker.jobs.InvalidJob`."""
    parsed = parse_job_id(job_id)
    by = check_by(by)
    view = await get_job(redis, job_id, config=config)
    if view.status == "not_found":
        raise JobNotFound(f"job {job_id} is not known (never enqueued, or its result has expired)")
    if view.status not in ("failed", "cancelled"):
        raise JobNotRetryable(f"job {job_id} is {view.status}; only a failed or cancelled job can be retried")
    hold = f"{keys.PREFIX}:retrying:{job_id}"
    try:
        async with redis.pipeline(transaction=True) as pipe:
            pipe.get(jobs.result_key(job_id))
            pipe.pttl(jobs.result_key(job_id))
            pipe.rename(jobs.result_key(job_id), hold)
            pipe.pexpire(hold, _RETRY_HOLD_MS)
            raw, ttl_ms, _renamed, _expiry = await pipe.execute()
    except ResponseError:  # no such key: the result expired (or another retry took it) a moment ago
        raise JobNotRetryable(f"job {job_id} has no result any more; it cannot be retried") from None
    record = _json_object(raw)
    task, payload = record.get("f"), record.get("k")
    if task != parsed.task or not isinstance(payload, dict) or payload.get("tenant_id") != parsed.tenant_id:
        await _put_back(redis, hold, job_id, ttl_ms)
        raise JobNotRetryable(f"job {job_id} cannot be retried: its arguments are no longer known (it was "
                              f"refused before they could be read)")
    try:
        await redis.zrem(CANCEL_REQUESTS, job_id)
        submitter = JobSubmitter(redis, config, max_payload_bytes=max_payload_bytes)
        await submitter.submit(parsed.task, parsed.tenant_id, payload, idempotency_key=parsed.key)
    except BaseException:
        await _put_back(redis, hold, job_id, ttl_ms)
        raise
    await redis.delete(hold)
    publisher = events or EventPublisher(redis)
    with contextlib.suppress(RedisError, OSError):  # the retry is done; a lost event must not say otherwise
        await publisher.publish(parsed.tenant_id, "job_retried", {"job_id": job_id, "task": parsed.task, "by": by,
                                                                    "previous": view.status})
    return await get_job(redis, job_id, config=config)


async def _put_back(redis: Redis, hold: str, job_id: str, ttl_ms: int) -> None:
    """The old result back where it was, with the time it had left (unless a new one was written
    meanwhile: then the old one is dropped)."""
    try:
        put_back = await redis.renamenx(hold, jobs.result_key(job_id))
    except ResponseError:  # the hold is gone
        return
    if not put_back:
        await redis.delete(hold)
    elif ttl_ms is not None and int(ttl_ms) > 0:
        await redis.pexpire(jobs.result_key(job_id), int(ttl_ms))
    else:
        await redis.persist(jobs.result_key(job_id))


def describe(view: JobView) -> str:
    """The view as a few human lines (the CLI's ``agentworker job``)."""
    def when(seconds: float | None) -> str:
        return "-" if seconds is None else time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(seconds)) + \
            f".{int(seconds * 1000) % 1000:03d}Z"

    lines = [f"job {view.job_id}: {view.status}" + (" (cancel requested)" if view.cancel_requested else ""),
             f"  tenant {view.tenant_id}, task {view.task}, queue {view.queue or '-'}, tries {view.tries}",
             f"  enqueued {when(view.enqueued_at)}, started {when(view.started_at)}, "
             f"finished {when(view.finished_at)}"]
    if view.error is not None:
        lines.append(f"  error {view.error.get('error')}: {view.error.get('message')}")
    if view.status == "completed":
        lines.append(f"  result {json.dumps(view.result, default=str)[:2000]}")
    return "\n".join(lines)


async def cancel_requests(redis: Redis, job_ids: list[str]) -> dict[str, tuple[int, str]]:
    """Of ``job_ids``, those whose cancel was requested: id -> (when it was first asked, ms since the epoch;
    who asked, ``""`` if not said). One ``ZMSCORE`` per 1,000 ids, and one read of who asked only for those
    requested. The worker's watch over the jobs it runs and a task's check between two steps both ask this."""
    found: dict[str, tuple[int, str]] = {}
    for start in range(0, len(job_ids), 1000):
        chunk = job_ids[start:start + 1000]
        scores = await redis.zmscore(CANCEL_REQUESTS, chunk)
        requested = [(job_id, int(score)) for job_id, score in zip(chunk, scores, strict=True) if score is not None]
        if not requested:
            continue
        async with redis.pipeline(transaction=False) as pipe:
            for job_id, _ in requested:
                pipe.hget(keys.job_attempt(job_id), "cancel_by")
            whos = await pipe.execute()
        for (job_id, at_ms), who in zip(requested, whos, strict=True):
            found[job_id] = (at_ms, who.decode(errors="replace") if isinstance(who, bytes) else "")
    return found


async def prune_cancel_requests(redis: Redis, *, offset: int = 0, limit: int = 500,
                                older_than_s: float = STALE_REQUEST_S) -> tuple[int, int]:
    """Drop the cancel requests older than ``older_than_s`` whose job Redis no longer knows (a job that
    expired unclaimed, or a request a producer made for a finished one), looking at ``limit`` of them from
    ``offset`` in age order; return (removed, looked at). The supervisor calls it every minute, moving
    ``offset`` past the requests it kept (jobs still waiting, e.g. deferred) and back to 0 at the end, so
    the set stays as small as the requests that still mean something. (A new job of the same id also
    drops the old request: ``enqueue.lua``.)"""
    cutoff_ms = int((time.time() - older_than_s) * 1000)
    removed, seen = await redis.eval(_PRUNE, 1, CANCEL_REQUESTS, str(cutoff_ms), str(limit),  # type: ignore[misc]
                                     str(offset), jobs.job_key(""), jobs.in_progress_key(""))
    return int(removed), int(seen)
