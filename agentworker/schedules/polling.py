"""One poll of a polling source: new items start their workflow once, failures back off.

Run by the ``poll_source`` job the dispatcher enqueues at each due time of a ``poll`` schedule:

1. read the schedule's cursor and the ids it has seen (one short transaction);
2. read the source (:func:`~agentworker.schedules.sources.read_source`), outside any transaction;
3. in one transaction holding the schedule's row: if the cursor is still the one read in 1 (else a
   concurrent poll got there first and this one stops), enqueue ``execute_workflow`` for each new item
   with the job id ``{tenant}:execute_workflow:poll-{schedule}-{digest of the item id}`` (``trigger:
   "poll"``, ``input: {"item", "schedule_id"}``), then store the new cursor and seen ids, and commit.

A poll that dies before the commit is simply done again: the same items give the same job ids (no-ops,
and a workflow run is keyed by its job id), so each item starts its workflow once.

A failed read counts a failure and sets ``backoff_until`` to now + ``backoff_initial_seconds`` ×
2^(failures − 1), capped at ``backoff_max_seconds``: no poll is dispatched (and a poll job already queued
does not call the source) before then. The next successful poll resets the count.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from agentworker import metrics
from agentworker.db import Database
from agentworker.db import schedules as rows
from agentworker.errors import AgentWorkerError
from agentworker.logs import Logger
from agentworker.schedules.sources import SEEN_LIMIT, SourceError, read_source
from agentworker.schedules.spec import ScheduleSpec
from agentworker.submit import JobSubmitter


class PollSourceFailed(AgentWorkerError):
    """The source failed; the failure is recorded on the schedule and the next polls back off."""


@dataclass(frozen=True, slots=True)
class PollResult:
    #: ok, gone (no such poll schedule), backing_off, or superseded (a concurrent poll moved the cursor)
    status: str
    new_items: int = 0
    job_ids: tuple[str, ...] = ()
    cursor: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "new_items": self.new_items, "job_ids": list(self.job_ids),
                "cursor": self.cursor}


def item_job_key(schedule_id: str, item_id: str) -> str:
    return f"poll-{schedule_id}-{hashlib.sha256(item_id.encode()).hexdigest()[:32]}"


def backoff_seconds(failures: int, initial: float, maximum: float) -> float:
    """Seconds to wait after the ``failures``-th failure in a row."""
    return float(min(maximum, initial * 2 ** min(max(failures - 1, 0), 40)))


async def poll_once(database: Database, submitter: JobSubmitter, tenant_id: str, schedule_id: str,
                    log: Logger) -> PollResult:
    """Poll the source of ``schedule_id`` once (see the module's docstring)."""
    async with database.tenant(tenant_id) as tx:
        row = await rows.get_schedule(tx, schedule_id)
        now = await tx.fetchval("SELECT clock_timestamp()")
    if row is None or row.kind != "poll":
        return PollResult("gone")
    if row.backoff_until is not None and row.backoff_until > now:
        metrics.POLLS_TOTAL.labels("backing_off").inc()
        return PollResult("backing_off", cursor=row.poll_state.get("cursor"))
    source = ScheduleSpec.model_validate(row.spec).poll
    assert source is not None
    cursor = row.poll_state.get("cursor")
    seen: list[str] = list(row.poll_state.get("seen", []))
    try:
        read = await read_source(source, cursor, set(seen))
    except SourceError as exc:
        await _record_failure(database, tenant_id, schedule_id, str(exc), log)
        raise PollSourceFailed(f"poll of schedule {schedule_id!r} failed: {exc}") from None

    async with database.tenant(tenant_id) as tx:
        locked = await rows.lock_for_poll(tx, schedule_id)
        if locked is None or locked.poll_state.get("cursor") != cursor:
            metrics.POLLS_TOTAL.labels("superseded").inc()
            return PollResult("superseded", cursor=None if locked is None else locked.poll_state.get("cursor"))
        job_ids = []
        for item, identifier in zip(read.new_items, read.new_ids, strict=True):
            handle = await submitter.submit(
                "execute_workflow", tenant_id, idempotency_key=item_job_key(schedule_id, identifier),
                payload={"workflow_id": source.workflow_id, "trigger": "poll",
                         "input_data": {"item": item, "schedule_id": schedule_id}})
            job_ids.append(handle.job_id)
        remembered = [*locked.poll_state.get("seen", []), *read.new_ids][-SEEN_LIMIT:]
        await rows.record_poll_success(tx, schedule_id, {"cursor": read.cursor, "seen": remembered})
    metrics.POLLS_TOTAL.labels("success").inc()
    metrics.POLL_ITEMS_TOTAL.inc(len(job_ids))
    log.info("source polled", schedule_id=schedule_id, pages=read.pages, new_items=len(job_ids), cursor=read.cursor)
    return PollResult("ok", new_items=len(job_ids), job_ids=tuple(job_ids), cursor=read.cursor)


async def _record_failure(database: Database, tenant_id: str, schedule_id: str, error: str, log: Logger) -> None:
    async with database.tenant(tenant_id) as tx:
        row = await rows.lock_for_poll(tx, schedule_id)
        if row is None:
            return
        source = ScheduleSpec.model_validate(row.spec).poll
        assert source is not None
        failures = row.failures + 1
        wait = backoff_seconds(failures, source.backoff_initial_seconds, source.backoff_max_seconds)
        await rows.record_poll_failure(tx, schedule_id, failures=failures, error=error, backoff_seconds=wait)
    metrics.POLLS_TOTAL.labels("error").inc()
    log.warning("poll source failed; backing off", schedule_id=schedule_id, failures=failures, backoff_s=wait,
                error=error)
