"""Calendar events of a tenant (the calendar tools' storage)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg

from agentworker.db.database import SCHEMA, TenantTransaction


@dataclass(frozen=True, slots=True)
class CalendarEvent:
    event_id: str
    calendar: str
    title: str
    description: str
    location: str
    starts_at: datetime
    ends_at: datetime
    attendees: list[str]
    created_at: datetime

    def to_dict(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "calendar": self.calendar, "title": self.title,
                "description": self.description, "location": self.location,
                "starts_at": self.starts_at.isoformat(), "ends_at": self.ends_at.isoformat(),
                "attendees": list(self.attendees)}


def _event(row: asyncpg.Record) -> CalendarEvent:
    return CalendarEvent(event_id=str(row["event_id"]), calendar=row["calendar"], title=row["title"],
                         description=row["description"], location=row["location"], starts_at=row["starts_at"],
                         ends_at=row["ends_at"], attendees=list(row["attendees"]), created_at=row["created_at"])


async def create_event(tx: TenantTransaction, *, idempotency_key: str, calendar: str, title: str, description: str,
                       location: str, starts_at: datetime, ends_at: datetime, attendees: list[str]) -> CalendarEvent:
    """Insert the event, or return the one an earlier try created with the same ``idempotency_key``."""
    row = await tx.fetchrow(
        f"INSERT INTO {SCHEMA}.calendar_events (tenant_id, event_id, calendar, title, description, location, "
        "starts_at, ends_at, attendees, idempotency_key) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) "
        "ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING *",
        tx.tenant_id, uuid.uuid4(), calendar, title, description, location, starts_at, ends_at, attendees,
        idempotency_key)
    if row is None:
        row = await tx.fetchrow(f"SELECT * FROM {SCHEMA}.calendar_events WHERE idempotency_key = $1",
                                idempotency_key)
    assert row is not None
    return _event(row)


async def list_events(tx: TenantTransaction, calendar: str, start: datetime, end: datetime,
                      limit: int = 500) -> list[CalendarEvent]:
    """Events of ``calendar`` overlapping ``[start, end)``, by start time."""
    rows = await tx.fetch(
        f"SELECT * FROM {SCHEMA}.calendar_events WHERE calendar = $1 AND starts_at < $3 AND ends_at > $2 "
        "ORDER BY starts_at, event_id LIMIT $4", calendar, start, end, limit)
    return [_event(row) for row in rows]
