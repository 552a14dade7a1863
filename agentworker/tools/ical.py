"""iCalendar (RFC 5545) export of calendar events: a VCALENDAR of VEVENTs, folded and escaped."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from agentworker.db.calendar import CalendarEvent

PRODID = "-//agentworker//calendar tool//EN"
_FOLD_OCTETS = 75


def ical_datetime(value: datetime) -> str:
    """A UTC DATE-TIME (form #2 of RFC 5545 3.3.5): ``19980119T070000Z``."""
    return value.astimezone(UTC).strftime("%Y%m%dT%H%M%SZ")


def escape_text(value: str) -> str:
    """TEXT escaping (RFC 5545 3.3.11): backslash, semicolon, comma and newlines."""
    return (value.replace("\\", "\\\\").replace(";", "\\;").replace(",", "\\,")
            .replace("\r\n", "\\n").replace("\n", "\\n").replace("\r", "\\n"))


def fold(line: str) -> str:
    """Fold a content line at 75 octets (RFC 5545 3.1) without splitting a UTF-8 character."""
    out: list[str] = []
    current = ""
    size = 0
    limit = _FOLD_OCTETS
    for char in line:
        width = len(char.encode())
        if size + width > limit:
            out.append(current)
            current, size, limit = " ", 1, _FOLD_OCTETS
        current += char
        size += width
    out.append(current)
    return "\r\n".join(out)


def to_ical(events: Iterable[CalendarEvent], *, calendar_name: str, now: datetime | None = None) -> str:
    stamp = ical_datetime(now or datetime.now(UTC))
    lines = ["BEGIN:VCALENDAR", "VERSION:2.0", f"PRODID:{PRODID}", "CALSCALE:GREGORIAN",
             f"X-WR-CALNAME:{escape_text(calendar_name)}"]
    for event in events:
        lines += ["BEGIN:VEVENT", f"UID:{event.event_id}@agentworker", f"DTSTAMP:{stamp}",
                  f"CREATED:{ical_datetime(event.created_at)}", f"DTSTART:{ical_datetime(event.starts_at)}",
                  f"DTEND:{ical_datetime(event.ends_at)}", f"SUMMARY:{escape_text(event.title)}"]
        if event.description:
            lines.append(f"DESCRIPTION:{escape_text(event.description)}")
        if event.location:
            lines.append(f"LOCATION:{escape_text(event.location)}")
        lines += [f"ATTENDEE;RSVP=TRUE:mailto:{address}" for address in event.attendees]
        lines.append("END:VEVENT")
    lines.append("END:VCALENDAR")
    return "".join(fold(line) + "\r\n" for line in lines)
