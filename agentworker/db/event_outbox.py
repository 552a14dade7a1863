"""The rows of the event outbox (migration 0005): events promised in a transaction, until published.

See :mod:`agentworker.event_outbox` for how they are published; this module is the SQL only.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from agentworker.db.database import SCHEMA, Database, TenantTransaction


@dataclass(frozen=True, slots=True)
class StaleEvent:
    tenant_id: str
    event_id: str
    created_at: datetime


async def record(tx: TenantTransaction, event_id: str, body: str) -> bool:
    """Record a promised event in ``tx``; False if an earlier try already recorded it (it keeps its body)."""
    status = await tx.execute(
        f"INSERT INTO {SCHEMA}.event_outbox (tenant_id, event_id, body) VALUES ($1, $2, $3) "
        "ON CONFLICT (tenant_id, event_id) DO NOTHING", tx.tenant_id, event_id, body)
    return status.endswith(" 1")


async def bodies(tx: TenantTransaction, event_ids: list[str]) -> list[tuple[str, str]]:
    """``(event id, body)`` of those of ``event_ids`` still waiting, in the order they were recorded."""
    rows = await tx.fetch(f"SELECT event_id, body FROM {SCHEMA}.event_outbox WHERE event_id = ANY($1::text[]) "
                          "ORDER BY created_at, event_id", event_ids)
    return [(row["event_id"], row["body"]) for row in rows]


async def forget(tx: TenantTransaction, event_ids: list[str]) -> int:
    """Delete published events; how many were still there."""
    status = await tx.execute(f"DELETE FROM {SCHEMA}.event_outbox WHERE event_id = ANY($1::text[])", event_ids)
    return int(status.rsplit(" ", 1)[-1])


async def pending(tx: TenantTransaction) -> list[tuple[str, str]]:
    """Every event of the tenant not yet published (oldest first): for tests and inspection."""
    rows = await tx.fetch(f"SELECT event_id, body FROM {SCHEMA}.event_outbox ORDER BY created_at, event_id")
    return [(row["event_id"], row["body"]) for row in rows]


async def stale(database: Database, *, older_than_s: float, limit: int) -> list[StaleEvent]:
    """Events of every tenant recorded ``older_than_s`` seconds ago or more and still waiting (ids only),
    oldest first, at most ``limit`` (1 to 1000)."""
    if not 1 <= limit <= 1000:
        raise ValueError(f"limit must be from 1 to 1000, got {limit!r}")
    rows = await database.fetch_without_tenant(f"SELECT * FROM {SCHEMA}.stale_outbox_events($1, $2)",
                                               float(older_than_s), limit)
    return [StaleEvent(row["tenant_id"], row["event_id"], row["created_at"]) for row in rows]
