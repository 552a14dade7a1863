"""Tenant schedules (cron, polling sources): saved and read in the tenant's transaction, and the one
index across tenants the dispatcher needs (:func:`due_schedules`).

Validation is :mod:`agentworker.schedules.spec`'s job; this module stores what it is given.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from agentworker.db.database import SCHEMA, Database, TenantTransaction


@dataclass(frozen=True, slots=True)
class ScheduleRow:
    tenant_id: str
    schedule_id: str
    kind: str
    spec: dict[str, Any]
    enabled: bool
    next_due_at: datetime | None
    last_due_at: datetime | None
    last_job_id: str | None
    dispatched_count: int
    missed_count: int
    poll_state: dict[str, Any]
    failures: int
    last_error: str | None
    backoff_until: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class DueSchedule:
    tenant_id: str
    schedule_id: str
    next_due_at: datetime


def _row(record: asyncpg.Record) -> ScheduleRow:
    return ScheduleRow(**{name: record[name] for name in ScheduleRow.__slots__})


async def save_schedule(tx: TenantTransaction, *, schedule_id: str, kind: str, cron: str, timezone: str,
                        spec: dict[str, Any], enabled: bool, missed_policy: str, misfire_grace_seconds: int,
                        next_due_at: datetime | None) -> tuple[ScheduleRow, bool]:
    """Insert or replace; return the row and whether it is new.

    Replacing keeps the pending due time when the cron expression, time zone and enabled flag did not
    change (re-saving a schedule never skips a run), and the polling cursor while the source URL stays.
    """
    record = await tx.fetchrow(
        f"INSERT INTO {SCHEMA}.schedules AS s (tenant_id, schedule_id, kind, cron, timezone, spec, enabled, "
        "missed_policy, misfire_grace_seconds, next_due_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
        "ON CONFLICT (tenant_id, schedule_id) DO UPDATE SET kind = EXCLUDED.kind, spec = EXCLUDED.spec, "
        "missed_policy = EXCLUDED.missed_policy, misfire_grace_seconds = EXCLUDED.misfire_grace_seconds, "
        "next_due_at = CASE WHEN s.cron = EXCLUDED.cron AND s.timezone = EXCLUDED.timezone "
        "  AND s.enabled = EXCLUDED.enabled AND s.next_due_at IS NOT NULL THEN s.next_due_at "
        "  ELSE EXCLUDED.next_due_at END, "
        "cron = EXCLUDED.cron, timezone = EXCLUDED.timezone, enabled = EXCLUDED.enabled, "
        "poll_state = CASE WHEN s.spec->'poll'->>'url' IS NOT DISTINCT FROM EXCLUDED.spec->'poll'->>'url' "
        "  THEN s.poll_state ELSE '{}'::jsonb END, "
        "failures = 0, last_error = NULL, backoff_until = NULL, updated_at = now() "
        "RETURNING *, (xmax = 0) AS created",
        tx.tenant_id, schedule_id, kind, cron, timezone, spec, enabled, missed_policy, misfire_grace_seconds,
        next_due_at)
    assert record is not None
    return _row(record), bool(record["created"])


async def get_schedule(tx: TenantTransaction, schedule_id: str) -> ScheduleRow | None:
    record = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.schedules WHERE schedule_id = $1", schedule_id)
    return None if record is None else _row(record)


async def list_schedules(tx: TenantTransaction, kind: str | None = None, *,
                         limit: int | None = None) -> list[ScheduleRow]:
    """The tenant's schedules by id (of one ``kind``), the first ``limit`` of them (None: all)."""
    records = await tx.fetch(f"SELECT * FROM {SCHEMA}.schedules WHERE ($1::text IS NULL OR kind = $1) "
                             "ORDER BY schedule_id LIMIT $2", kind, limit)
    return [_row(r) for r in records]


async def delete_schedule(tx: TenantTransaction, schedule_id: str) -> bool:
    status = await tx.execute(f"DELETE FROM {SCHEMA}.schedules WHERE schedule_id = $1", schedule_id)
    return status.endswith(" 1")


async def set_enabled(tx: TenantTransaction, schedule_id: str, enabled: bool,
                      next_due_at: datetime | None) -> ScheduleRow | None:
    """Enable (from ``next_due_at`` on, when it was disabled) or disable a schedule; None if unknown."""
    record = await tx.fetchrow(
        f"UPDATE {SCHEMA}.schedules SET enabled = $2, "
        "next_due_at = CASE WHEN NOT $2 THEN NULL WHEN enabled THEN next_due_at ELSE $3 END, "
        "spec = jsonb_set(spec, '{enabled}', to_jsonb($2)), failures = 0, backoff_until = NULL, "
        "updated_at = now() WHERE schedule_id = $1 RETURNING *", schedule_id, enabled, next_due_at)
    return None if record is None else _row(record)


# -- the dispatcher -------------------------------------------------------------------------------------


async def due_schedules(database: Database, now: datetime | None, limit: int) -> list[DueSchedule]:
    """Due schedules of every tenant (ids and due times only), oldest due first; ``now`` None: the
    database's clock, one clock for every dispatcher whatever their hosts' clocks say."""
    records = await database.fetch_without_tenant(
        f"SELECT * FROM {SCHEMA}.due_schedules(coalesce($1, clock_timestamp()), $2)", now, limit)
    return [DueSchedule(r["tenant_id"], r["schedule_id"], r["next_due_at"]) for r in records]


async def database_now(database: Database) -> datetime:
    records = await database.fetch_without_tenant("SELECT clock_timestamp() AS now")
    now: datetime = records[0]["now"]
    return now


async def lock_due(tx: TenantTransaction, schedule_id: str, due: datetime) -> ScheduleRow | None:
    """The schedule, locked, if it is still enabled and due at ``due``; None when another dispatcher has
    it locked or already moved it on."""
    record = await tx.fetchrow(
        f"SELECT * FROM {SCHEMA}.schedules WHERE schedule_id = $1 AND enabled AND next_due_at = $2 "
        "FOR UPDATE SKIP LOCKED", schedule_id, due)
    return None if record is None else _row(record)


async def advance(tx: TenantTransaction, schedule_id: str, *, expected_due: datetime, next_due: datetime,
                  dispatched_due: datetime | None, job_id: str | None, missed: int) -> bool:
    """Move the schedule from ``expected_due`` to ``next_due`` (compare-and-set); False if it moved."""
    status = await tx.execute(
        f"UPDATE {SCHEMA}.schedules SET next_due_at = $3, "
        "last_due_at = coalesce($4, last_due_at), last_job_id = coalesce($5, last_job_id), "
        "dispatched_count = dispatched_count + (CASE WHEN $4::timestamptz IS NULL THEN 0 ELSE 1 END), "
        "missed_count = missed_count + $6, updated_at = now() "
        "WHERE schedule_id = $1 AND next_due_at = $2",
        schedule_id, expected_due, next_due, dispatched_due, job_id, missed)
    return status.endswith(" 1")


async def hold(tx: TenantTransaction, schedule_id: str, *, until: datetime, error: str) -> None:
    """Dispatch nothing of this schedule before ``until`` (the tenant is over a quota)."""
    await tx.execute(f"UPDATE {SCHEMA}.schedules SET backoff_until = $2, last_error = $3, updated_at = now() "
                     "WHERE schedule_id = $1", schedule_id, until, error)


# -- polling sources ------------------------------------------------------------------------------------


async def lock_for_poll(tx: TenantTransaction, schedule_id: str) -> ScheduleRow | None:
    record = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.schedules WHERE schedule_id = $1 AND kind = 'poll' "
                               "FOR UPDATE", schedule_id)
    return None if record is None else _row(record)


async def record_poll_success(tx: TenantTransaction, schedule_id: str, poll_state: dict[str, Any]) -> None:
    await tx.execute(f"UPDATE {SCHEMA}.schedules SET poll_state = $2, failures = 0, last_error = NULL, "
                     "backoff_until = NULL, updated_at = now() WHERE schedule_id = $1", schedule_id, poll_state)


async def record_poll_failure(tx: TenantTransaction, schedule_id: str, *, failures: int, error: str,
                              backoff_seconds: float) -> None:
    """Count a failure; nothing is dispatched before ``backoff_seconds`` from now (the database's clock)."""
    await tx.execute(f"UPDATE {SCHEMA}.schedules SET failures = $2, last_error = $3, "
                     "backoff_until = clock_timestamp() + make_interval(secs => $4), updated_at = now() "
                     "WHERE schedule_id = $1", schedule_id, failures, error, backoff_seconds)


async def record_job_failure(tx: TenantTransaction, schedule_id: str, error: str) -> None:
    """A job a (task or workflow) schedule dispatched failed for good: count it and keep its error, so the
    schedule shows it (``failures``, ``last_error``). No backoff: the next due time dispatches as usual."""
    await tx.execute(f"UPDATE {SCHEMA}.schedules SET failures = failures + 1, last_error = $2, updated_at = now() "
                     "WHERE schedule_id = $1 AND spec->'poll' IS NULL", schedule_id, error[:1000])


async def record_job_success(tx: TenantTransaction, schedule_id: str) -> None:
    """A job a (task or workflow) schedule dispatched completed: its failures are over (one write only
    when there were some)."""
    await tx.execute(f"UPDATE {SCHEMA}.schedules SET failures = 0, last_error = NULL, updated_at = now() "
                     "WHERE schedule_id = $1 AND failures > 0 AND spec->'poll' IS NULL", schedule_id)
