"""Workflow runs and their step records (the audit trail): one row per run, one row per step attempt.

A run records the job that last started working it (``job_id``): the run sweeper fails a run left
``running`` once that job is gone (:func:`idle_running_runs`, :func:`fail_running_run`).
"""

from __future__ import annotations

import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

import asyncpg

from agentworker.db.database import SCHEMA, Database, TenantTransaction
from agentworker.errors import AgentWorkerError


class RunStatus(StrEnum):
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    COMPLETED = "completed"
    FAILED = "failed"
    REJECTED = "rejected"
    #: its job was cancelled on request (agentworker.job_control; migration 0008)
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.REJECTED, RunStatus.CANCELLED})


class StepStatus(StrEnum):
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    #: the attempt's worker died or its job was cancelled before it finished
    INTERRUPTED = "interrupted"
    WAITING_APPROVAL = "waiting_approval"
    REJECTED = "rejected"
    #: not run because the run was rejected before it
    SKIPPED = "skipped"


class InvalidRunId(AgentWorkerError, ValueError):
    def __init__(self, run_id: object) -> None:
        super().__init__(f"invalid run id {run_id!r}: must be a UUID")


def parse_run_id(run_id: object) -> uuid.UUID:
    if isinstance(run_id, uuid.UUID):
        return run_id
    try:
        return uuid.UUID(str(run_id))
    except ValueError:
        raise InvalidRunId(run_id) from None


@dataclass(frozen=True, slots=True)
class StepRecord:
    step_id: str
    kind: str
    attempt: int
    status: str
    input: Any
    output: Any
    error: Any
    job_id: str | None
    started_at: datetime
    finished_at: datetime | None

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass(frozen=True, slots=True)
class RunRecord:
    tenant_id: str
    run_id: str
    workflow_id: str
    workflow_version: int
    idempotency_key: str
    status: str
    trigger: str
    input: Any
    output: Any
    error: Any
    attempts: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None
    #: the job that last started working the run (None for runs made before migration 0004)
    job_id: str | None = None
    steps: tuple[StepRecord, ...] = field(default=())

    @property
    def finished(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def to_dict(self) -> dict[str, Any]:
        data = _jsonable({k: v for k, v in asdict(self).items() if k != "steps"})
        data["steps"] = [step.to_dict() for step in self.steps]
        return data


def _jsonable(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v.isoformat() if isinstance(v, datetime) else v for k, v in data.items()}


def _run(row: asyncpg.Record, steps: tuple[StepRecord, ...] = ()) -> RunRecord:
    return RunRecord(
        tenant_id=row["tenant_id"], run_id=str(row["run_id"]), workflow_id=row["workflow_id"],
        workflow_version=row["workflow_version"], idempotency_key=row["idempotency_key"], status=row["status"],
        trigger=row["trigger"], input=row["input"], output=row["output"], error=row["error"],
        attempts=row["attempts"], created_at=row["created_at"], updated_at=row["updated_at"],
        finished_at=row["finished_at"], job_id=row["job_id"], steps=steps,
    )


def _step(row: asyncpg.Record) -> StepRecord:
    return StepRecord(step_id=row["step_id"], kind=row["kind"], attempt=row["attempt"], status=row["status"],
                      input=row["input"], output=row["output"], error=row["error"], job_id=row["job_id"],
                      started_at=row["started_at"], finished_at=row["finished_at"])


# -- runs ----------------------------------------------------------------------------------------------


async def create_run(tx: TenantTransaction, *, workflow_id: str, workflow_version: int, idempotency_key: str,
                     trigger: str, input_data: Any, job_id: str | None = None) -> tuple[RunRecord, bool]:
    """The run of ``idempotency_key``: created now (``True``) or found from an earlier attempt (``False``).

    ``job_id``: the job creating it (default the key, which is ``execute_workflow``'s job id)."""
    row = await tx.fetchrow(
        f"INSERT INTO {SCHEMA}.workflow_runs (tenant_id, run_id, workflow_id, workflow_version, idempotency_key, "
        "status, trigger, input, job_id) VALUES ($1, $2, $3, $4, $5, 'running', $6, $7, coalesce($8, $5)) "
        "ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING *",
        tx.tenant_id, uuid.uuid4(), workflow_id, workflow_version, idempotency_key, trigger, input_data, job_id)
    if row is not None:
        return _run(row), True
    existing = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_runs WHERE idempotency_key = $1",
                                 idempotency_key)
    assert existing is not None, "conflicting row must be visible to its own tenant"
    return _run(existing), False


async def get_run(tx: TenantTransaction, run_id: str | uuid.UUID, *, with_steps: bool = False) -> RunRecord | None:
    row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_runs WHERE run_id = $1", parse_run_id(run_id))
    if row is None:
        return None
    steps = tuple(await list_steps(tx, row["run_id"])) if with_steps else ()
    return _run(row, steps)


async def list_runs(tx: TenantTransaction, *, workflow_id: str | None = None, status: str | None = None,
                    limit: int = 50) -> list[RunRecord]:
    """The tenant's runs, newest first, optionally of one workflow and/or in one status."""
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be from 1 to 1000, got {limit!r}")
    if status is not None and status not in RunStatus.__members__.values():
        raise ValueError(f"unknown run status {status!r}: use one of {', '.join(RunStatus)}")
    rows = await tx.fetch(
        f"SELECT * FROM {SCHEMA}.workflow_runs WHERE ($1::text IS NULL OR workflow_id = $1) "
        "AND ($2::text IS NULL OR status = $2) ORDER BY created_at DESC, run_id LIMIT $3",
        workflow_id, status, limit)
    return [_run(row) for row in rows]


async def count_attempt(tx: TenantTransaction, run_id: str | uuid.UUID, *, job_id: str) -> None:
    """Another job attempt (of job ``job_id``, which now drives the run) picked up the run."""
    await tx.execute(f"UPDATE {SCHEMA}.workflow_runs SET attempts = attempts + 1, job_id = $2, updated_at = now() "
                     "WHERE run_id = $1", parse_run_id(run_id), job_id)


async def set_run_status(tx: TenantTransaction, run_id: str | uuid.UUID, status: RunStatus, *,
                         output: Any = None, error: Any = None) -> None:
    finished = status in TERMINAL_STATUSES
    await tx.execute(
        f"UPDATE {SCHEMA}.workflow_runs SET status = $2, output = coalesce($3, output), error = $4, "
        "updated_at = now(), finished_at = CASE WHEN $5 THEN now() ELSE NULL END WHERE run_id = $1",
        parse_run_id(run_id), status.value, output, error, finished)


# -- steps ---------------------------------------------------------------------------------------------


async def completed_step(tx: TenantTransaction, run_id: str | uuid.UUID, step_id: str) -> StepRecord | None:
    row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_steps WHERE run_id = $1 AND step_id = $2 "
                            "AND status = 'completed'", parse_run_id(run_id), step_id)
    return None if row is None else _step(row)


async def latest_step(tx: TenantTransaction, run_id: str | uuid.UUID, step_id: str) -> StepRecord | None:
    row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_steps WHERE run_id = $1 AND step_id = $2 "
                            "ORDER BY attempt DESC LIMIT 1", parse_run_id(run_id), step_id)
    return None if row is None else _step(row)


async def start_step(tx: TenantTransaction, run_id: str | uuid.UUID, step_id: str, *, kind: str, input_data: Any,
                     job_id: str | None, status: StepStatus = StepStatus.RUNNING) -> int:
    """Record a new attempt of ``step_id``; return its number. Attempts left 'running' by a dead worker
    are marked 'interrupted' first."""
    run_uuid = parse_run_id(run_id)
    await tx.execute(f"UPDATE {SCHEMA}.workflow_steps SET status = 'interrupted', finished_at = clock_timestamp() "
                     "WHERE run_id = $1 AND step_id = $2 AND status = 'running'", run_uuid, step_id)
    attempt: int = await tx.fetchval(
        f"INSERT INTO {SCHEMA}.workflow_steps (tenant_id, run_id, step_id, kind, attempt, status, input, job_id) "
        "SELECT $1, $2, $3, $4, coalesce(max(attempt), 0) + 1, $5, $6, $7 "
        f"FROM {SCHEMA}.workflow_steps WHERE run_id = $2 AND step_id = $3 RETURNING attempt",
        tx.tenant_id, run_uuid, step_id, kind, status.value, input_data, job_id)
    return attempt


async def finish_step(tx: TenantTransaction, run_id: str | uuid.UUID, step_id: str, attempt: int,
                      status: StepStatus, *, output: Any = None, error: Any = None) -> None:
    await tx.execute(
        f"UPDATE {SCHEMA}.workflow_steps SET status = $4, output = $5, error = $6, finished_at = clock_timestamp() "
        "WHERE run_id = $1 AND step_id = $2 AND attempt = $3",
        parse_run_id(run_id), step_id, attempt, status.value, output, error)


async def list_steps(tx: TenantTransaction, run_id: str | uuid.UUID) -> list[StepRecord]:
    rows = await tx.fetch(f"SELECT * FROM {SCHEMA}.workflow_steps WHERE run_id = $1 ORDER BY started_at, id",
                          parse_run_id(run_id))
    return [_step(row) for row in rows]


async def interrupt_running_steps(tx: TenantTransaction, run_id: str | uuid.UUID) -> None:
    """Close the attempts left 'running' when the run ends (parallel siblings of a failed step)."""
    await tx.execute(f"UPDATE {SCHEMA}.workflow_steps SET status = 'interrupted', finished_at = clock_timestamp() "
                     "WHERE run_id = $1 AND status = 'running'", parse_run_id(run_id))


async def find_run_by_key(tx: TenantTransaction, idempotency_key: str) -> RunRecord | None:
    row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_runs WHERE idempotency_key = $1", idempotency_key)
    return None if row is None else _run(row)


# -- runs whose job is gone ------------------------------------------------------------------------------


async def fail_running_run(tx: TenantTransaction, run_id: str | uuid.UUID, *, job_id: str, error: Any,
                           idle_for_s: float | None = None,
                           status: RunStatus = RunStatus.FAILED) -> RunRecord | None:
    """Mark the run ``failed`` (or ``status``: ``cancelled`` for a job cancelled on request) with ``error``
    if it is still ``running`` and driven by ``job_id`` (and, with ``idle_for_s``, not updated for that
    long); close its running steps. Return the run so ended, or None when it was not in that state
    (finished, waiting, picked up by another job, or ended by another reporter already): the condition is
    in the ``UPDATE``, so of two reporters only one gets the run."""
    if status not in (RunStatus.FAILED, RunStatus.CANCELLED):
        raise ValueError(f"a running run is ended failed or cancelled, not {status}")
    run_uuid = parse_run_id(run_id)
    row = await tx.fetchrow(
        f"UPDATE {SCHEMA}.workflow_runs SET status = $5, error = $3, updated_at = now(), finished_at = now() "
        "WHERE run_id = $1 AND status = 'running' AND coalesce(job_id, idempotency_key) = $2 "
        "AND ($4::float8 IS NULL OR updated_at <= now() - make_interval(secs => $4::float8)) RETURNING *",
        run_uuid, job_id, error, idle_for_s, status.value)
    if row is None:
        return None
    await interrupt_running_steps(tx, run_uuid)
    return _run(row)


async def cancel_waiting_run(tx: TenantTransaction, run_id: str | uuid.UUID, *, error: Any) -> RunRecord | None:
    """End a run that waits for approval as ``cancelled`` (no job drives it, so there is no job to cancel):
    its waiting steps are closed ``interrupted``; a later decision finds it finished. None when the run is
    not waiting (the condition is in the ``UPDATE``)."""
    run_uuid = parse_run_id(run_id)
    row = await tx.fetchrow(
        f"UPDATE {SCHEMA}.workflow_runs SET status = 'cancelled', error = $2, updated_at = now(), "
        "finished_at = now() WHERE run_id = $1 AND status = 'waiting_approval' RETURNING *", run_uuid, error)
    if row is None:
        return None
    await tx.execute(f"UPDATE {SCHEMA}.workflow_steps SET status = 'interrupted', finished_at = clock_timestamp() "
                     "WHERE run_id = $1 AND status = 'waiting_approval'", run_uuid)
    return _run(row)


@dataclass(frozen=True, slots=True)
class IdleRun:
    """A ``running`` run not updated for a while, and the job that should be driving it."""

    tenant_id: str
    run_id: str
    job_id: str
    updated_at: datetime


async def idle_running_runs(database: Database, *, idle_for_s: float, limit: int,
                            after: IdleRun | None = None) -> list[IdleRun]:
    """Running runs of every tenant not updated for ``idle_for_s`` seconds (ids only), oldest first, at
    most ``limit`` (1 to 1000); ``after``: the last run of the previous page."""
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be from 1 to 1000, got {limit!r}")
    records = await database.fetch_without_tenant(
        f"SELECT * FROM {SCHEMA}.idle_running_runs($1, $2, $3, $4, $5)", float(idle_for_s), limit,
        after.updated_at if after else None, after.tenant_id if after else None,
        parse_run_id(after.run_id) if after else None)
    return [IdleRun(r["tenant_id"], str(r["run_id"]), r["job_id"], r["updated_at"]) for r in records]
