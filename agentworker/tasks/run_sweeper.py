"""The run sweeper: fail the workflow runs left ``running`` with no job behind them.

A run is driven by the job recorded in its ``job_id`` (``agentworker.workflow_runs.job_id``, migration
0004). That job's ARQ record (``arq:job:{job_id}``) lives from enqueue until the job finishes for good;
retries and re-runs after a worker crash keep it. So a run still ``running`` whose job record is gone
will never be advanced: its job's final-failure hook did not get to end it (PostgreSQL was down, the
process died in between, or the job was dropped without ever reaching a worker). The sweeper marks such
a run ``failed`` with ``{"error": "RunOrphaned", "message", "reason": "orphaned"}``, closes its running
steps and publishes ``workflow_run_failed`` on the tenant's events, so no run stays ``running`` forever.

Runs updated in the last :data:`ORPHAN_AFTER_S` seconds are not looked at: a job that is creating or
picking up a run right now is never raced. The ``UPDATE`` that fails a run repeats every condition it
was chosen by (still ``running``, same job, still idle), so a run that moved on since it was listed is
left alone and two sweepers can never both fail (and announce) one run.

Every worker process runs :func:`sweep_forever`; a Redis lock (:func:`agentworker.keys.run_sweeper_lock`)
taken for one sweep interval means one process sweeps per interval across all workers and replicas. The
lock is for load only: correctness rests on the conditional ``UPDATE``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import keys
from agentworker.db import runs
from agentworker.db.runs import IdleRun
from agentworker.jobs import job_key
from agentworker.logs import get_logger
from agentworker.redis_lock import RedisLock, every_interval
from agentworker.tasks.workflow_tasks import promise_run_event, run_event

if TYPE_CHECKING:
    from agentworker.tasks.context import JobRuntime

log = get_logger("agentworker.run_sweeper")

#: seconds between one process's attempts to sweep (times a random factor in [0.5, 1]: processes do not
#: align); also how long the lock is held, so the fleet sweeps about once per interval
SWEEP_INTERVAL_S = 30.0
#: a running run is only examined once it has not been updated for this long
ORPHAN_AFTER_S = 60.0
#: runs listed (and their job records checked) per query
PAGE_SIZE = 100
#: a sweep stops listing more runs after this share of the lock's life (the lock must outlive it)
_SWEEP_BUDGET_SHARE = 0.8
_NOT_MIGRATED_PAUSE_S = 60.0


def orphan_error(job_id: str) -> dict[str, Any]:
    """The ``error`` an orphaned run is failed with."""
    return {"error": "RunOrphaned", "message": f"no job is left to continue this run (job {job_id} is gone)",
            "reason": "orphaned"}


async def sweep_orphaned_runs(runtime: JobRuntime, *, older_than_s: float = ORPHAN_AFTER_S,
                              limit: int = PAGE_SIZE, budget_s: float | None = None) -> int:
    """Fail every run of every tenant that is ``running``, not updated for ``older_than_s`` seconds, and
    whose job record is gone from Redis; return how many were failed.

    Runs are listed ``limit`` at a time (oldest first, each page's job records checked in one round
    trip) until none are left or ``budget_s`` seconds have passed. PostgreSQL and Redis errors propagate.
    """
    database = await runtime.database()
    stop_at = None if budget_s is None else time.monotonic() + budget_s
    failed = 0
    after: IdleRun | None = None
    while stop_at is None or time.monotonic() < stop_at:
        page = await runs.idle_running_runs(database, idle_for_s=older_than_s, limit=limit, after=after)
        if not page:
            break
        alive = await _jobs_alive(runtime.redis, [idle.job_id for idle in page])
        for idle, is_alive in zip(page, alive, strict=True):
            if not is_alive and await _fail_orphan(runtime, idle, older_than_s):
                failed += 1
        if len(page) < limit:
            break
        after = page[-1]
    return failed


async def _jobs_alive(redis: Redis, job_ids: list[str]) -> list[bool]:
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.exists(job_key(job_id))
        replies = await pipe.execute()
    return [bool(reply) for reply in replies]


async def _fail_orphan(runtime: JobRuntime, idle: IdleRun, older_than_s: float) -> bool:
    database = await runtime.database()
    outbox = await runtime.event_outbox()
    error = orphan_error(idle.job_id)
    async with database.tenant(idle.tenant_id) as tx:
        run = await runs.fail_running_run(tx, idle.run_id, job_id=idle.job_id, error=error,
                                          idle_for_s=older_than_s)
        if run is not None:  # announced after the commit, through the outbox
            await promise_run_event(outbox, tx, run, "workflow_run_failed",
                                    run_event(run, "failed", None, {"error": error}))
    if run is None:
        return False  # it moved on since it was listed
    log.warning("orphaned run failed", tenant_id=idle.tenant_id, run_id=idle.run_id, job_id=idle.job_id,
                workflow_id=run.workflow_id)
    return True


class SweepLock(RedisLock):
    """The run sweeper's lock (:func:`agentworker.keys.run_sweeper_lock`)."""

    def __init__(self, redis: Redis, hold_s: float) -> None:
        super().__init__(redis, keys.run_sweeper_lock(), hold_s)


async def sweep_once(runtime: JobRuntime, *, hold_s: float = SWEEP_INTERVAL_S,
                     older_than_s: float = ORPHAN_AFTER_S, limit: int = PAGE_SIZE) -> int | None:
    """Take the lock for ``hold_s`` seconds and sweep; None when another process holds it.

    The lock is left to expire after the sweep (whatever its outcome), so the next sweep anywhere is a
    full interval later; it is released early only when this process is cancelled mid-sweep (shutting
    down), so another can take over at once."""
    lock = SweepLock(runtime.redis, hold_s)
    if not await lock.acquire():
        return None
    try:
        return await sweep_orphaned_runs(runtime, older_than_s=older_than_s, limit=limit,
                                         budget_s=hold_s * _SWEEP_BUDGET_SHARE)
    except asyncio.CancelledError:
        with contextlib.suppress(RedisError, OSError):  # else it expires on its own
            await lock.release()
        raise


async def sweep_forever(runtime: JobRuntime, *, interval: float = SWEEP_INTERVAL_S,
                        older_than_s: float = ORPHAN_AFTER_S) -> None:
    """Sweep until cancelled: every ``interval`` seconds (:data:`SWEEP_INTERVAL_S`, times a random factor
    in [0.5, 1]) try to take the lock and, if this process gets it, fail the runs orphaned for
    :data:`ORPHAN_AFTER_S` seconds. The first try waits one pause, so a starting worker does not open its
    database pool at once. Never raises: PostgreSQL or Redis down, or a database not yet migrated, is
    logged once per outage and tried again next time."""
    await every_interval(lambda: sweep_once(runtime, hold_s=interval, older_than_s=older_than_s),
                         interval=interval, name="run sweeping", log=log,
                         done=lambda failed: log.info("run sweep done", failed=failed),
                         not_migrated_pause_s=_NOT_MIGRATED_PAUSE_S)
