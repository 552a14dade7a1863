"""What the operator console reads and does beyond ``/status``: a job with its events, a tenant's runs,
approvals, schedules and recent failures, the dead letters, and an approval decision.

Everything here is bounded, because the caller is an HTTP client: a job's events and a tenant's recent
failures come from the newest :data:`EVENT_SCAN` entries of the tenant's capped stream (XREVRANGE, never a
full read), lists take a ``limit`` of at most :data:`MAX_LIMIT`, and schedules are cut at
:data:`MAX_SCHEDULES`. Tenant ids are validated before any key or row is touched.

The supervisor never imports the job side (``tasks/``): a decision is the ``resume_run`` task enqueued by
name through the same :class:`~agentworker.submit.JobSubmitter` every producer uses, so admission
(``max_pending``, ``rate_limit``) applies to the console as to the backend. Before enqueueing, the run is
looked up so the caller hears "not waiting" at once (409) rather than from a failed job later; the job's
idempotency key names the run and the step decided, so a double click enqueues one job.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.config import QuotaConfig
from agentworker.db import Database
from agentworker.db import approvals as approval_rows
from agentworker.db import runs as run_rows
from agentworker.db import schedules as schedule_rows
from agentworker.db.approvals import ApprovalRecord
from agentworker.dead_letters import list_dead_letters
from agentworker.events import decode_entry
from agentworker.health.common import MAX_LIST_LIMIT, ConsoleRefusal
from agentworker.routing import validate_tenant_id
from agentworker.schedules.spec import schedule_view
from agentworker.submit import JobSubmitter
from agentworker.tenants import MAX_BY_CHARS, TenantDirectory

#: the largest ``limit`` a list endpoint takes
MAX_LIMIT = MAX_LIST_LIMIT
#: newest entries of a tenant's event stream scanned for a job's events or its recent failures
EVENT_SCAN = 500
#: a job's events shown at most (the newest, in stream order)
MAX_JOB_EVENTS = 200
#: schedules of one tenant shown at most (by id)
MAX_SCHEDULES = 500
#: lengths of a decision's free-text fields
MAX_COMMENT_CHARS, MAX_STEP_ID_CHARS = 2000, 200
DECISIONS = ("approve", "reject")
#: events that end a job for good (job_failed) or that an operator looks for next to them
FAILURE_EVENTS = ("job_failed", "job_rejected")


class NotFound(ConsoleRefusal, LookupError):
    """The tenant has no such run."""

    status = 404


class Conflict(ConsoleRefusal, ValueError):
    """The run is not in a state the action applies to."""

    status = 409


class BadRequest(ConsoleRefusal, ValueError):
    """An argument the caller gave is unusable; the message names it."""

    status = 400


@dataclass(frozen=True, slots=True)
class Decision:
    """An approval decision from the console, its fields checked (:func:`parse_decision`)."""

    decision: str  # approve | reject
    by: str
    comment: str | None
    step_id: str | None


def parse_decision(body: Any) -> Decision:
    """A decision from a request body ``{"decision", "by", "comment"?, "step_id"?}``; a :class:`BadRequest`
    listing every problem otherwise. ``by`` is required: the decision is recorded with who made it."""
    if not isinstance(body, dict):
        raise BadRequest(f"body: must be a JSON object, not {type(body).__name__}")
    problems = [f"{key}: unknown key (known: by, comment, decision, step_id)" for key in body
                if key not in ("decision", "by", "comment", "step_id")]
    if body.get("decision") not in DECISIONS:
        problems.append(f"decision: must be 'approve' or 'reject' (got {str(body.get('decision'))[:50]!r})")
    by = body.get("by")
    if not isinstance(by, str) or not by.strip() or len(by) > MAX_BY_CHARS or not by.isprintable():
        problems.append(f"by: required, who decides: printable text of 1 to {MAX_BY_CHARS} characters")
    for key, most in (("comment", MAX_COMMENT_CHARS), ("step_id", MAX_STEP_ID_CHARS)):
        value = body.get(key)
        if value is not None and (not isinstance(value, str) or not 0 < len(value) <= most):
            problems.append(f"{key}: must be a string of 1 to {most} characters")
    if problems:
        raise BadRequest("; ".join(problems))
    return Decision(body["decision"], str(by), body.get("comment"), body.get("step_id"))


def check_limit(limit: int, most: int = MAX_LIMIT) -> int:
    if not 1 <= limit <= most:
        raise BadRequest(f"limit: must be an integer from 1 to {most} (got {limit})")
    return limit


def _approval(record: ApprovalRecord) -> dict[str, Any]:
    return {"step_id": record.step_id, "status": record.status, "request": record.request,
            "decision": record.decision, "requested_at": record.requested_at.isoformat(),
            "decided_at": record.decided_at.isoformat() if record.decided_at else None}


def _event(entry_id: bytes | str, fields: dict[Any, Any]) -> dict[str, Any] | None:
    """A stream entry as ``{"id", "event", "tenant_id", "ts", "data"}``; None for one that is not an event's
    JSON (:func:`agentworker.events.decode_entry`)."""
    event = decode_entry(entry_id, fields)
    if event is None:
        return None
    return {"id": event.id, "event": str(event.event), "tenant_id": str(event.tenant_id), "ts": event.ts or None,
            "data": event.data}


class OperatorViews:
    """The console's reads and its approval action, on the supervisor's Redis client and database."""

    def __init__(self, redis: Redis, database: Callable[[], Awaitable[Database]],
                 config: Callable[[], QuotaConfig], tenants: TenantDirectory, *, max_payload_bytes: int) -> None:
        self.redis = redis
        self._database = database
        self._config = config
        self._tenants = tenants
        self._max_payload_bytes = max_payload_bytes

    async def recent_events(self, tenant_id: str, *, scan: int = EVENT_SCAN) -> list[dict[str, Any]]:
        """The newest ``scan`` events of the tenant's stream, newest first."""
        validate_tenant_id(tenant_id)
        entries = await self.redis.xrevrange(keys.event_stream(tenant_id), count=scan)
        found = []
        for entry_id, fields in entries:
            event = _event(entry_id, fields)
            if event is not None:
                found.append(event)
        return found

    async def job_events(self, tenant_id: str, job_id: str) -> list[dict[str, Any]]:
        """The job's events among the tenant's newest :data:`EVENT_SCAN`, oldest first: those whose data
        names it (``job_id``, or any value equal to it, such as a run's ``job_id``)."""
        mine = [event for event in await self.recent_events(tenant_id)
                if job_id in (str(v) for v in event["data"].values() if isinstance(v, str))]
        return list(reversed(mine[:MAX_JOB_EVENTS]))

    async def failures(self, tenant_id: str, *, limit: int) -> list[dict[str, Any]]:
        """The tenant's newest ``job_failed`` / ``job_rejected`` events (of its newest :data:`EVENT_SCAN`)."""
        check_limit(limit)
        return [event for event in await self.recent_events(tenant_id)
                if event["event"] in FAILURE_EVENTS][:limit]

    async def runs(self, tenant_id: str, *, status: str | None, limit: int) -> list[dict[str, Any]]:
        """The tenant's workflow runs, newest first, without steps."""
        validate_tenant_id(tenant_id)
        check_limit(limit)
        if status is not None and status not in run_rows.RunStatus.__members__.values():
            raise BadRequest(f"status: unknown run status {status[:50]!r} (use one of "
                             f"{', '.join(run_rows.RunStatus)})")
        database = await self._database()
        async with database.tenant(tenant_id) as tx:
            found = await run_rows.list_runs(tx, status=status, limit=limit)
        return [run.to_dict() for run in found]

    async def run(self, tenant_id: str, run_id: str) -> dict[str, Any]:
        """One run with its step trail (every attempt of every step, in order) and its approvals:
        ``approvals`` all of them, ``waiting`` the step ids still undecided. :class:`NotFound` if none."""
        validate_tenant_id(tenant_id)
        run_rows.parse_run_id(run_id)  # InvalidRunId before any query
        database = await self._database()
        async with database.tenant(tenant_id) as tx:
            run = await run_rows.get_run(tx, run_id, with_steps=True)
            found = await approval_rows.list_approvals(tx, run_id) if run is not None else []
        if run is None:
            raise NotFound(f"tenant {tenant_id} has no run {run_id}")
        view = run.to_dict()
        view["approvals"] = [_approval(record) for record in found]
        view["waiting"] = [record.step_id for record in found if record.status == "pending"]
        return view

    async def schedules(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's schedules by id (at most :data:`MAX_SCHEDULES`; ``more``: there are others), each
        with its last run (``last_due_at``, ``last_job_id``), ``failures`` in a row and ``last_error``."""
        validate_tenant_id(tenant_id)
        database = await self._database()
        async with database.tenant(tenant_id) as tx:
            found = await schedule_rows.list_schedules(tx, limit=MAX_SCHEDULES + 1)
        return {"schedules": [schedule_view(row) for row in found[:MAX_SCHEDULES]],
                "more": len(found) > MAX_SCHEDULES}

    async def dead_letters(self, pool: str | None, *, limit: int) -> dict[str, Any]:
        """Each pool's dead letters (or one pool's): ``{pool: {"letters", "total", "more"}}``."""
        check_limit(limit)
        config = self._config()
        if pool is not None and pool not in config.pools:
            raise BadRequest(f"pool: {pool[:100]!r} is not a pool of the quota file (pools: "
                             f"{', '.join(sorted(config.pools))})")
        answer: dict[str, Any] = {}
        for name in [pool] if pool is not None else sorted(config.pools):
            found = await list_dead_letters(self.redis, name, limit)
            answer[name] = {"letters": [letter.as_dict() for letter in found.letters], "total": found.total,
                            "more": found.more}
        return answer

    async def decide(self, tenant_id: str, run_id: str, decision: Decision) -> dict[str, Any]:
        """Enqueue ``resume_run`` with the decision for the step the run waits for (``decision.step_id``
        when it waits for several); ``{"job_id", "created", "step_id"}``. :class:`NotFound`,
        :class:`Conflict` when the run waits for no such undecided step; QuotaExceeded from admission."""
        validate_tenant_id(tenant_id)
        run_rows.parse_run_id(run_id)
        database = await self._database()
        async with database.tenant(tenant_id) as tx:
            run = await run_rows.get_run(tx, run_id)
            pending = await approval_rows.pending_approvals(tx, run_id) if run is not None else []
        if run is None:
            raise NotFound(f"tenant {tenant_id} has no run {run_id}")
        waiting = [record.step_id for record in pending]
        if decision.step_id is not None:
            if decision.step_id not in waiting:
                raise Conflict(f"run {run_id} ({run.status}) has no undecided approval step "
                               f"{decision.step_id[:100]!r}")
            step_id = decision.step_id
        elif len(waiting) == 1:
            step_id = waiting[0]
        elif waiting:
            raise Conflict(f"run {run_id} waits for several approvals ({', '.join(waiting)}): name one with step_id")
        else:
            raise Conflict(f"run {run_id} is {run.status}, not waiting for an approval")
        submitter = JobSubmitter(self.redis, self._config(), max_payload_bytes=self._max_payload_bytes,
                                 tenants=self._tenants)
        payload = {"run_id": str(run.run_id), "step_id": step_id,
                   "decision": {"decision": decision.decision, "by": decision.by, "comment": decision.comment}}
        key: str | None = f"decide-{run.run_id}-{step_id}"
        try:
            jobs.make_job_id(tenant_id, "resume_run", key)
        except jobs.InvalidJob:  # a step id no idempotency key can hold: a random key, first decision still wins
            key = None
        submitted = await submitter.submit("resume_run", tenant_id, payload, idempotency_key=key)
        return {"job_id": submitted.job_id, "created": submitted.created, "step_id": step_id}
