"""The dispatcher: enqueue each due run of every tenant's schedules, exactly once per due time.

It runs in every worker process (:mod:`agentworker.pools.worker` runs :func:`dispatch_forever` on the
process's database pool and Redis client), each pass about once a second with jitter, so any number of
processes on any number of hosts, starting and stopping, share the work with no leader to elect. Each
pass:

1. asks PostgreSQL which schedules are due (``agentworker.due_schedules``: ids and due times of every
   tenant, nothing else) by the **database's clock**, the one clock every dispatcher shares, so hosts'
   clocks a second or more apart cannot make two dispatchers disagree about what is due;
2. for each, in that tenant's transaction, locks the row if it is still due at the time it was listed
   with (``FOR UPDATE SKIP LOCKED``: another dispatcher working on it, or done with it, makes this one
   move on) and applies :func:`~agentworker.schedules.plan.plan_step`;
3. enqueues the run **first**, with the deterministic job id ``{tenant}:{task}:sched-{schedule}-{epoch}``
   through the job submitter (:mod:`agentworker.submit`: the tenant's shard, ``max_pending`` and
   ``rate_limit``), **then** moves ``next_due_at`` on with a compare-and-set ``UPDATE`` and commits.

A dispatcher that dies between the enqueue and the commit leaves the row as it was; the next one
enqueues the same job id again, which is a no-op while that job or its result exists
(``AGENTWORKER_KEEP_RESULT``, a day by default) — and a workflow run is keyed by its job id for good. A
tenant over its quota is held back: nothing is moved on, the row waits until the retry time and the due
time is dispatched then (or, once it is older than the grace, follows the missed-run policy).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from redis.exceptions import RedisError

from agentworker import metrics
from agentworker.db import Database, DatabaseError, DatabaseNotMigrated
from agentworker.db import schedules as rows
from agentworker.jobs import InvalidJob
from agentworker.logs import get_logger
from agentworker.routing import InvalidTenantId
from agentworker.schedules.plan import plan_step
from agentworker.schedules.spec import ScheduleSpec, fill_due_at
from agentworker.submit import JobSubmitter, QuotaExceeded, Submitted

log = get_logger("agentworker.schedules")

#: seconds between passes of one process (times a random factor in [0.5, 1]: processes do not align)
DISPATCH_INTERVAL_S = 1.0
#: schedules handled per pass (a full batch starts the next pass at once)
BATCH_SIZE = 100
#: due times one schedule may dispatch in one pass (a dispatcher that fell behind catches up in steps)
MAX_STEPS_PER_SCHEDULE = 10
#: how long a schedule whose run cannot be enqueued at all (bad payload) waits before the next try
BROKEN_HOLD_S = 300.0
#: how long a tenant over max_pending is held back (rate limits say how long themselves)
QUOTA_HOLD_S = 5.0
_RETRY_MAX_S = 30.0
_NOT_MIGRATED_RETRY_S = 60.0

#: a submitter on the current quota config (built per pass: the quota file may have been reloaded)
SubmitterFactory = Callable[[], JobSubmitter]


@dataclass
class PassReport:
    """What one pass did (for tests and logs)."""

    due: int = 0
    dispatched: int = 0
    duplicates: int = 0
    missed: int = 0
    held: int = 0
    contended: int = 0
    #: the job ids enqueued or found (duplicates) by this pass
    job_ids: list[str] = field(default_factory=list)


def job_key(schedule_id: str, due: datetime) -> str:
    """The idempotency key of a schedule's run for one due time (due times are whole seconds)."""
    return f"sched-{schedule_id}-{int(due.timestamp())}"


def target_of(spec: ScheduleSpec, due: datetime) -> tuple[str, dict[str, Any]]:
    """The task and payload a schedule runs for the due time ``due``."""
    due_at = due.isoformat()
    if spec.poll is not None:
        return "poll_source", {"schedule_id": spec.id, "due_at": due_at}
    if spec.workflow_id is not None:
        return "execute_workflow", {"workflow_id": spec.workflow_id, "trigger": "schedule",
                                    "input_data": fill_due_at(spec.input or {}, due_at)}
    assert spec.task is not None
    return spec.task, fill_due_at(spec.payload or {}, due_at)


class Dispatcher:
    """One process's dispatcher. ``clock`` (tests only) replaces the database's clock."""

    def __init__(self, database: Database, submitter: JobSubmitter, *,
                 clock: Callable[[], datetime] | None = None, batch_size: int = BATCH_SIZE) -> None:
        self.database = database
        self.submitter = submitter
        self.clock = clock
        self.batch_size = batch_size

    async def dispatch_once(self, now: datetime | None = None) -> PassReport:
        """One pass over the due schedules, as of ``now`` (default: the clock)."""
        if now is None and self.clock is not None:
            now = self.clock()
        due = await rows.due_schedules(self.database, now, self.batch_size)
        report = PassReport(due=len(due))
        if not due:
            return report
        if now is None:
            now = await rows.database_now(self.database)
        for item in due:
            try:
                await self._dispatch(item, now, report)
            except (DatabaseError, RedisError, OSError):
                raise
            except Exception as exc:
                # One broken schedule must not stop the others: hold it back and go on.
                log.exception("schedule dispatch failed", tenant_id=item.tenant_id, schedule_id=item.schedule_id,
                              error=repr(exc))
                async with self.database.tenant(item.tenant_id) as tx:
                    await rows.hold(tx, item.schedule_id, until=now + timedelta(seconds=BROKEN_HOLD_S),
                                    error=f"dispatch failed: {type(exc).__name__}: {exc}"[:500])
                report.held += 1
        return report

    async def _dispatch(self, item: rows.DueSchedule, now: datetime, report: PassReport) -> None:
        async with self.database.tenant(item.tenant_id) as tx:
            row = await rows.lock_due(tx, item.schedule_id, item.next_due_at)
            if row is None:
                report.contended += 1
                return
            spec = ScheduleSpec.model_validate(row.spec)
            cron = spec.cron_schedule()
            due = item.next_due_at
            for _ in range(MAX_STEPS_PER_SCHEDULE):
                step = plan_step(cron, due, now, grace_seconds=spec.misfire_grace_seconds,
                                 missed_policy=spec.missed_policy)
                job_id = None
                if step.run_due is not None:
                    handle = await self._enqueue(tx, item.tenant_id, spec, step.run_due, now, report)
                    if handle is None:
                        return
                    job_id = handle.job_id
                if step.missed:
                    metrics.SCHEDULE_DISPATCHES_TOTAL.labels(spec.kind, "missed").inc(step.missed)
                    report.missed += step.missed
                    log.info("missed due times passed over", tenant_id=item.tenant_id, schedule_id=spec.id,
                             missed=step.missed, policy=spec.missed_policy, next_due_at=step.next_due.isoformat())
                moved = await rows.advance(tx, spec.id, expected_due=due, next_due=step.next_due,
                                           dispatched_due=step.run_due, job_id=job_id, missed=step.missed)
                assert moved, "the row is locked by this transaction"
                due = step.next_due
                if due > now:
                    return

    async def _enqueue(self, tx: Any, tenant_id: str, spec: ScheduleSpec, due: datetime, now: datetime,
                       report: PassReport) -> Submitted | None:
        task, payload = target_of(spec, due)
        try:
            handle = await self.submitter.submit(task, tenant_id, payload, idempotency_key=job_key(spec.id, due))
        except QuotaExceeded as exc:
            hold = exc.retry_after if exc.retry_after is not None else QUOTA_HOLD_S
            await rows.hold(tx, spec.id, until=now + timedelta(seconds=max(hold, 0.5)), error=str(exc))
            metrics.SCHEDULE_DISPATCHES_TOTAL.labels(spec.kind, "over_quota").inc()
            report.held += 1
            log.warning("schedule held back: tenant over its quota", tenant_id=tenant_id, schedule_id=spec.id,
                        limit=exc.limit, retry_in_s=hold)
            return None
        except (InvalidJob, InvalidTenantId) as exc:
            await rows.hold(tx, spec.id, until=now + timedelta(seconds=BROKEN_HOLD_S), error=str(exc))
            metrics.SCHEDULE_DISPATCHES_TOTAL.labels(spec.kind, "error").inc()
            report.held += 1
            log.error("schedule cannot be dispatched", tenant_id=tenant_id, schedule_id=spec.id, error=str(exc))
            return None
        outcome = "dispatched" if handle.created else "duplicate"
        metrics.SCHEDULE_DISPATCHES_TOTAL.labels(spec.kind, outcome).inc()
        if handle.created:
            report.dispatched += 1
        else:
            report.duplicates += 1
        report.job_ids.append(handle.job_id)
        log.info("schedule dispatched", tenant_id=tenant_id, schedule_id=spec.id, due_at=due.isoformat(),
                 job_id=handle.job_id, created=handle.created)
        return handle


async def dispatch_forever(get_database: Callable[[], Awaitable[Database]], make_submitter: SubmitterFactory, *,
                           interval: float = DISPATCH_INTERVAL_S) -> None:
    """Dispatch until cancelled. Never raises: PostgreSQL or Redis down, or a schema not yet migrated,
    are logged once and retried with backoff, so a worker's jobs never depend on scheduling.

    ``get_database``: the process's pool (shared with its jobs); ``make_submitter``: called once per pass."""
    retry = 1.0
    failing: str | None = None
    while True:
        pause = interval * random.uniform(0.5, 1.0)
        try:
            database = await get_database()
            report = await Dispatcher(database, make_submitter()).dispatch_once()
            if failing is not None:
                log.info("schedule dispatching resumed")
            failing, retry = None, 1.0
            if report.due >= BATCH_SIZE:
                pause = 0.0
        except DatabaseNotMigrated as exc:
            pause = _NOT_MIGRATED_RETRY_S
            failing = _log_once(failing, "schedules are off until `agentworker migrate` runs", str(exc))
        except (DatabaseError, RedisError, OSError) as exc:
            pause, retry = retry, min(retry * 2, _RETRY_MAX_S)
            failing = _log_once(failing, "schedule dispatching paused; will retry", str(exc))
        except Exception as exc:  # a bug must not take the worker's jobs down with it
            pause, retry = retry, min(retry * 2, _RETRY_MAX_S)
            log.exception("schedule dispatch pass failed", error=repr(exc))
        await asyncio.sleep(pause)


def _log_once(failing: str | None, message: str, error: str) -> str:
    if failing != message:
        log.warning(message, error=error)
    return message
