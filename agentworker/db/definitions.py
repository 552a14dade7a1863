"""Stored workflow definitions: versioned per tenant and workflow id.

A save that changes nothing (the same canonical JSON as the latest version) returns that version
instead of adding one, so saving is idempotent. Validation is the caller's job
(:func:`agentworker.workflows.parse_workflow`); this module stores what it is given.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from agentworker.db.database import SCHEMA, TenantTransaction


@dataclass(frozen=True, slots=True)
class StoredWorkflow:
    tenant_id: str
    workflow_id: str
    version: int
    definition: dict[str, Any]
    created_at: datetime
    #: False when the save found the same definition already stored as the latest version
    created: bool = True


def definition_digest(definition: dict[str, Any]) -> str:
    canonical = json.dumps(definition, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _stored(row: asyncpg.Record, created: bool = True) -> StoredWorkflow:
    return StoredWorkflow(tenant_id=row["tenant_id"], workflow_id=row["workflow_id"], version=row["version"],
                          definition=row["definition"], created_at=row["created_at"], created=created)


async def save_definition(tx: TenantTransaction, workflow_id: str, definition: dict[str, Any]) -> StoredWorkflow:
    """Store ``definition`` as the next version of ``workflow_id`` (or return the latest if identical)."""
    digest = definition_digest(definition)
    # Two concurrent saves of one workflow would pick the same next version: serialize them.
    await tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                     f"{tx.tenant_id}\x1fworkflow\x1f{workflow_id}")
    latest = await tx.fetchrow(
        f"SELECT * FROM {SCHEMA}.workflow_definitions WHERE workflow_id = $1 ORDER BY version DESC LIMIT 1",
        workflow_id)
    if latest is not None and latest["digest"] == digest:
        return _stored(latest, created=False)
    version = 1 if latest is None else latest["version"] + 1
    row = await tx.fetchrow(
        f"INSERT INTO {SCHEMA}.workflow_definitions (tenant_id, workflow_id, version, definition, digest) "
        "VALUES ($1, $2, $3, $4, $5) RETURNING *", tx.tenant_id, workflow_id, version, definition, digest)
    assert row is not None
    return _stored(row)


async def get_definition(tx: TenantTransaction, workflow_id: str, version: int | None = None) -> StoredWorkflow | None:
    """A stored version of ``workflow_id`` (the latest when ``version`` is None), or None."""
    if version is None:
        row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_definitions WHERE workflow_id = $1 "
                                "ORDER BY version DESC LIMIT 1", workflow_id)
    else:
        row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.workflow_definitions WHERE workflow_id = $1 "
                                "AND version = $2", workflow_id, version)
    return None if row is None else _stored(row)
