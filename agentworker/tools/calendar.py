"""Calendar tools: create and list events, find free slots, export iCalendar (RFC 5545).

Events live in our PostgreSQL (``agentworker.calendar_events``) under the same row-level security as
every tenant row: no per-tenant CalDAV account to provision or credential to keep, transactions for the
"create once" rule (a retried create finds its event by the call's idempotency key), and standard
iCalendar export for any calendar application to import or subscribe to.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from agentworker.db import calendar as store
from agentworker.db.calendar import CalendarEvent
from agentworker.integrations import EmailAddress
from agentworker.tools.ical import to_ical
from agentworker.tools.registry import ToolContext, tool
from agentworker.tools.tenant_settings import require_database

MAX_RANGE = timedelta(days=366)
CalendarName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]


def _one_line(value: str) -> str:
    if "\n" in value or "\r" in value:
        raise ValueError("must be a single line")
    return value


def _clock(value: str) -> str:
    try:
        time.fromisoformat(value)
    except ValueError:
        raise ValueError("must be a time of day like 09:00") from None
    return value


def _zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("unknown time zone; use an IANA name like Europe/Paris") from None
    return value


class _Range(BaseModel):
    model_config = ConfigDict(extra="forbid")

    start: AwareDatetime = Field(description="ISO 8601 with a UTC offset")
    end: AwareDatetime = Field(description="ISO 8601 with a UTC offset, after start")
    calendar: CalendarName = "default"

    @model_validator(mode="after")
    def _ordered(self) -> _Range:
        if self.end <= self.start:
            raise ValueError("end must be after start")
        if self.end - self.start > MAX_RANGE:
            raise ValueError("the range may span at most 366 days")
        return self


class CreateEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    title: Annotated[str, Field(min_length=1, max_length=200), AfterValidator(_one_line)]
    starts_at: AwareDatetime = Field(description="ISO 8601 with a UTC offset")
    ends_at: AwareDatetime | None = Field(default=None, description="give ends_at or duration_minutes")
    duration_minutes: int | None = Field(default=None, ge=1, le=1440)
    description: str = Field(default="", max_length=5000)
    location: str = Field(default="", max_length=500)
    attendees: list[EmailAddress] = Field(default_factory=list, max_length=100)
    calendar: CalendarName = "default"

    @model_validator(mode="after")
    def _one_end(self) -> CreateEvent:
        if (self.ends_at is None) == (self.duration_minutes is None):
            raise ValueError("give exactly one of ends_at and duration_minutes")
        if self.end <= self.starts_at:
            raise ValueError("the event must end after it starts")
        return self

    @property
    def end(self) -> datetime:
        if self.ends_at is not None:
            return self.ends_at
        return self.starts_at + timedelta(minutes=self.duration_minutes or 0)


class ListEvents(_Range):
    pass


class ExportIcs(_Range):
    pass


class FindFreeSlots(_Range):
    duration_minutes: int = Field(ge=5, le=1440)
    day_start: Annotated[str, AfterValidator(_clock)] = "09:00"
    day_end: Annotated[str, AfterValidator(_clock)] = "17:00"
    timezone: Annotated[str, AfterValidator(_zone)] = "UTC"
    max_slots: int = Field(default=10, ge=1, le=50)


@tool(side_effects=True, input_model=CreateEvent, timeout=15, description="Create a calendar event")
async def calendar_create_event(ctx: ToolContext, args: CreateEvent) -> dict[str, Any]:
    async with require_database(ctx).tenant(ctx.tenant_id) as tx:
        event = await store.create_event(
            tx, idempotency_key=ctx.idempotency_key, calendar=args.calendar, title=args.title,
            description=args.description, location=args.location, starts_at=args.starts_at, ends_at=args.end,
            attendees=list(args.attendees))
    return event.to_dict()


@tool(side_effects=False, input_model=ListEvents, timeout=15,
      description="List the calendar events between start and end")
async def calendar_list_events(ctx: ToolContext, args: ListEvents) -> dict[str, Any]:
    events = await _events(ctx, args)
    return {"events": [event.to_dict() for event in events]}


@tool(side_effects=False, input_model=FindFreeSlots, timeout=15,
      description="Find free slots of duration_minutes within working hours between start and end")
async def calendar_find_free_slots(ctx: ToolContext, args: FindFreeSlots) -> dict[str, Any]:
    events = await _events(ctx, args)
    slots = free_slots(events, args)
    return {"slots": [{"start": s.isoformat(), "end": e.isoformat()} for s, e in slots]}


@tool(side_effects=False, input_model=ExportIcs, timeout=15,
      description="Export the calendar events between start and end as iCalendar (RFC 5545) text")
async def calendar_export_ics(ctx: ToolContext, args: ExportIcs) -> dict[str, Any]:
    events = await _events(ctx, args)
    return {"ics": to_ical(events, calendar_name=args.calendar), "count": len(events)}


async def _events(ctx: ToolContext, args: _Range) -> list[CalendarEvent]:
    async with require_database(ctx).tenant(ctx.tenant_id) as tx:
        return await store.list_events(tx, args.calendar, args.start, args.end)


def free_slots(events: list[CalendarEvent], args: FindFreeSlots) -> list[tuple[datetime, datetime]]:
    """Back-to-back slots of ``duration_minutes`` inside working hours, outside every event."""
    zone = ZoneInfo(args.timezone)
    length = timedelta(minutes=args.duration_minutes)
    opens, closes = time.fromisoformat(args.day_start), time.fromisoformat(args.day_end)
    busy = sorted((e.starts_at, e.ends_at) for e in events)
    found: list[tuple[datetime, datetime]] = []
    day = args.start.astimezone(zone).date()
    last_day = args.end.astimezone(zone).date()
    while day <= last_day and len(found) < args.max_slots:
        window_start = max(args.start, datetime.combine(day, opens, tzinfo=zone))
        window_end = min(args.end, datetime.combine(day, closes, tzinfo=zone))
        cursor = window_start
        for busy_start, busy_end in [*busy, (window_end, window_end)]:
            if busy_end <= cursor:
                continue
            gap_end = min(busy_start, window_end)
            while cursor + length <= gap_end and len(found) < args.max_slots:
                found.append((cursor.astimezone(UTC), (cursor + length).astimezone(UTC)))
                cursor += length
            cursor = max(cursor, busy_end)
            if cursor >= window_end:
                break
        day += timedelta(days=1)
    return found
