"""Approval requests of workflow steps, and the decisions that answer them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from agentworker.db.database import SCHEMA, TenantTransaction
from agentworker.db.runs import parse_run_id


@dataclass(frozen=True, slots=True)
class ApprovalRecord:
    run_id: str
    step_id: str
    status: str  # pending, approved, rejected
    request: Any
    decision: Any
    requested_at: datetime
    decided_at: datetime | None


def _approval(row: asyncpg.Record) -> ApprovalRecord:
    return ApprovalRecord(run_id=str(row["run_id"]), step_id=row["step_id"], status=row["status"],
                          request=row["request"], decision=row["decision"], requested_at=row["requested_at"],
                          decided_at=row["decided_at"])


async def request_approval(tx: TenantTransaction, run_id: str | uuid.UUID, step_id: str,
                           request: Any) -> tuple[ApprovalRecord, bool]:
    """The approval of ``step_id``: requested now (``True``) or already there (``False``)."""
    run_uuid = parse_run_id(run_id)
    row = await tx.fetchrow(
        f"INSERT INTO {SCHEMA}.workflow_approvals (tenant_id, run_id, step_id, status, request) "
        "VALUES ($1, $2, $3, 'pending', $4) ON CONFLICT DO NOTHING RETURNING *",
        tx.tenant_id, run_uuid, step_id, request)
    if row is not None:
        return _approval(row), True
    existing = await get_approval(tx, run_uuid, step_id)
    assert existing is not None
    return existing, False


async def get_approval(tx: TenantTransaction, run_id: str | uuid.UUID, step_id: str) -> ApprovalRecord | None:
    row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_approvals WHERE run_id = $1 AND step_id = $2",
                            parse_run_id(run_id), step_id)
    return None if row is None else _approval(row)


async def pending_approvals(tx: TenantTransaction, run_id: str | uuid.UUID) -> list[ApprovalRecord]:
    rows = await tx.fetch(f"SELECT * FROM {SCHEMA}.workflow_approvals WHERE run_id = $1 AND status = 'pending' "
                          "ORDER BY requested_at, step_id", parse_run_id(run_id))
    return [_approval(row) for row in rows]


async def decide(tx: TenantTransaction, run_id: str | uuid.UUID, step_id: str, *, approved: bool,
                 decision: Any) -> ApprovalRecord | None:
    """Record the decision of a pending approval; None when it is not pending (unknown or decided)."""
    row = await tx.fetchrow(
        f"UPDATE {SCHEMA}.workflow_approvals SET status = $3, decision = $4, decided_at = now() "
        "WHERE run_id = $1 AND step_id = $2 AND status = 'pending' RETURNING *",
        parse_run_id(run_id), step_id, "approved" if approved else "rejected", decision)
    return None if row is None else _approval(row)


async def list_approvals(tx: TenantTransaction, run_id: str | uuid.UUID) -> list[ApprovalRecord]:
    rows = await tx.fetch(f"SELECT * FROM {SCHEMA}.workflow_approvals WHERE run_id = $1 ORDER BY requested_at, step_id",
                          parse_run_id(run_id))
    return [_approval(row) for row in rows]
