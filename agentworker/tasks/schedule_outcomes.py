"""What became of the jobs a schedule dispatched, recorded on the schedule.

A task or workflow schedule's job that fails for good (an error, a time-out, a rejection, a poisoning)
adds one to the schedule's ``failures`` and sets its ``last_error`` ("job ID failed: Error: message");
the next one that completes resets both. So ``get_schedule`` shows a schedule whose runs keep failing
instead of ``failures: 0``. Polling schedules record their own polls (``poll_source``) and are left alone
here. The job is the schedule's when its idempotency key is the dispatcher's
(``sched-{schedule_id}-{due}``, :func:`agentworker.schedules.dispatcher.job_key`).
"""

from __future__ import annotations

import asyncio
import re
from typing import Any

from agentworker.db import schedules as schedule_rows
from agentworker.db.database import DatabaseError
from agentworker.jobs import JobId
from agentworker.logs import get_logger
from agentworker.tasks.context import JobRuntime

log = get_logger("agentworker.schedules")

_KEY_RE = re.compile(r"^sched-(.+)-\d+$")
#: the longest the bookkeeping may hold up the end of a job
RECORD_TIMEOUT_S = 5.0


def schedule_of(job_id: str) -> str | None:
    """The schedule that dispatched ``job_id``, or None for any other job."""
    try:
        key = JobId.parse(job_id).key
    except ValueError:
        return None
    match = _KEY_RE.match(key)
    return match.group(1) if match else None


async def record_outcome(runtime: JobRuntime, tenant_id: str, job_id: str, error: dict[str, Any] | None) -> None:
    """Record a dispatched job's end on its schedule (``error``: its error record; None: it completed).
    Never raises: a database that is down or slow costs the record, not the job."""
    schedule_id = schedule_of(job_id)
    if schedule_id is None:
        return
    try:
        database = await runtime.database()

        async def write() -> None:
            async with database.tenant(tenant_id) as tx:
                if error is None:
                    await schedule_rows.record_job_success(tx, schedule_id)
                else:
                    await schedule_rows.record_job_failure(
                        tx, schedule_id, f"job {job_id} failed: {error.get('error')}: {error.get('message')}")

        await asyncio.wait_for(write(), RECORD_TIMEOUT_S)
    except (DatabaseError, TimeoutError, OSError) as exc:
        log.warning("schedule outcome not recorded", schedule_id=schedule_id, job_id=job_id, error=str(exc))
    except Exception as exc:  # a bug here must not reach the worker
        log.exception("recording a schedule outcome raised", schedule_id=schedule_id, job_id=job_id, error=repr(exc))
