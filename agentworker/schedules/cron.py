"""Cron expressions in an IANA time zone: validation and the next due time.

Syntax: five fields ``minute hour day-of-month month day-of-week``, or six with ``second`` first
(``*/5 * * * * *`` is every five seconds). Each field takes ``*``, numbers, ranges ``a-b``, steps ``*/n`` and
``a-b/n``, lists ``a,b``, month and weekday names (``jan``, ``mon``), and ``?``; day-of-month also ``L`` (last
day) and day-of-week ``5#2`` (second Friday) and ``5L`` (last Friday). When both day fields are restricted a
day matching either one fires (Vixie cron's rule). The macros ``@yearly`` (``@annually``), ``@monthly``,
``@weekly``, ``@daily`` (``@midnight``) and ``@hourly`` are accepted. Hash (``H``) and random (``R``) fields
are refused: every dispatcher must compute the same due times.

Due times are computed on the wall clock of the schedule's time zone (the field matching is croniter's, a
maintained library), with these rules for daylight-saving transitions:

* **spring forward** — a wall time that does not exist that day (02:30 when clocks jump from 02:00 to
  03:00) fires once, at the end of the gap (03:00); several such times collapse into that one due time;
* **fall back** — a wall time that happens twice (01:30 when clocks go back from 02:00 to 01:00) fires
  only at its first occurrence, unless the hour field is ``*``: an hourly or more frequent schedule keeps
  firing through the repeated hour, as real time goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# croniter ships no type information (and its stubs follow an older major version).
from croniter import CroniterBadCronError, CroniterBadDateError, CroniterError, croniter  # type: ignore[import-untyped]

from agentworker.errors import AgentWorkerError


class InvalidCron(AgentWorkerError, ValueError):
    """A cron expression or time zone that cannot be used (one sentence naming the value)."""


_MACROS = {
    "@yearly": "0 0 1 1 *", "@annually": "0 0 1 1 *", "@monthly": "0 0 1 * *", "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *", "@midnight": "0 0 * * *", "@hourly": "0 * * * *",
}
_FIELD_RE = re.compile(r"^[0-9A-Za-z*?,/#-]+$")
#: a due time must come within this many years, or the expression is refused as never matching
_HORIZON_YEARS = 9
_MAX_LENGTH = 200


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name`` (``Europe/Paris``, ``UTC``); :class:`InvalidCron` if unknown."""
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or name.startswith("/") or ".." in name:
        raise InvalidCron(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris' or 'UTC'")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise InvalidCron(f"unknown time zone {name!r}: use an IANA name such as 'Europe/Paris' or 'UTC'") from None


@dataclass(frozen=True)
class CronSchedule:
    """A validated cron expression in a time zone. Build it with :func:`parse_cron`."""

    expression: str
    timezone: str
    _fields: str = field(repr=False)
    _seconds: bool = field(repr=False)
    _tz: ZoneInfo = field(repr=False)
    _hour_is_wildcard: bool = field(repr=False)

    def next_after(self, instant: datetime) -> datetime:
        """The first due time strictly after ``instant`` (an aware datetime), in UTC."""
        local = instant.astimezone(self._tz)
        while True:
            candidate = self._croniter(local).get_next(datetime)
            resolved = self._resolve(candidate)
            if resolved is not None and resolved > instant:
                return resolved.astimezone(UTC)
            local = candidate

    def first_at_or_after(self, instant: datetime) -> datetime:
        """The first due time at or after ``instant``, in UTC (due times are whole seconds)."""
        whole = instant.replace(microsecond=0)
        start = whole - timedelta(seconds=1) if whole == instant else whole
        return self.next_after(start)

    def _croniter(self, start: datetime) -> croniter:
        return croniter(self._fields, start, second_at_beginning=self._seconds)

    def _resolve(self, candidate: datetime) -> datetime | None:
        """Apply the fall-back rule to a due time croniter found (None: not a due time)."""
        wall = candidate.replace(tzinfo=None)
        first = wall.replace(tzinfo=self._tz, fold=0)
        second = wall.replace(tzinfo=self._tz, fold=1)
        if first.utcoffset() == second.utcoffset() or not _exists(first):
            return candidate  # an ordinary time, or croniter's end of a spring-forward gap
        # A wall time that happens twice: keep the second occurrence only for hourly (or faster) schedules.
        if candidate.utcoffset() == second.utcoffset() and not self._hour_is_wildcard:
            return None
        return candidate


def _exists(local: datetime) -> bool:
    """True when the wall time of ``local`` exists in its zone (it survives a round trip through UTC)."""
    back = local.astimezone(UTC).astimezone(local.tzinfo)
    return back.replace(tzinfo=None) == local.replace(tzinfo=None)


def parse_cron(expression: str, timezone: str = "UTC") -> CronSchedule:
    """Validate ``expression`` in ``timezone``; :class:`InvalidCron` says what is wrong in one sentence."""
    tz = zone(timezone)
    if not isinstance(expression, str) or not expression.strip() or len(expression) > _MAX_LENGTH:
        raise InvalidCron(f"invalid cron expression {expression!r}: expected 5 fields (minute hour day month "
                          "weekday) or 6 with seconds first")
    text = " ".join(expression.split())
    fields = _MACROS.get(text.lower(), text).split(" ")
    if len(fields) not in (5, 6):
        raise InvalidCron(f"invalid cron expression {expression!r}: expected 5 fields (minute hour day month "
                          f"weekday) or 6 with seconds first, got {len(fields)}")
    for part in fields:
        if not _FIELD_RE.fullmatch(part):
            raise InvalidCron(f"invalid cron expression {expression!r}: field {part!r} has characters cron "
                              "does not use")
        if any(item[:1].upper() in ("H", "R") for item in part.split(",")):
            raise InvalidCron(f"invalid cron expression {expression!r}: hash (H) and random (R) fields are "
                              "not supported")
    seconds = len(fields) == 6
    hour = fields[2] if seconds else fields[1]
    schedule = CronSchedule(expression=text, timezone=timezone, _fields=" ".join(fields), _seconds=seconds,
                            _tz=tz, _hour_is_wildcard=hour in ("*", "?"))
    now = datetime.now(UTC)
    try:
        first = schedule.next_after(now)
    except CroniterBadCronError as exc:
        raise InvalidCron(f"invalid cron expression {expression!r}: {_reason(exc)}") from None
    except (CroniterBadDateError, CroniterError, OverflowError):
        raise InvalidCron(f"invalid cron expression {expression!r}: it never matches a date") from None
    if first - now > timedelta(days=366 * _HORIZON_YEARS):
        raise InvalidCron(f"invalid cron expression {expression!r}: it never matches a date")
    return schedule


def _reason(exc: Exception) -> str:
    text = str(exc)
    if "out of range" in text:
        return "a field value is out of its range (second/minute 0-59, hour 0-23, day 1-31, month 1-12, weekday 0-7)"
    # croniter repeats the expression in brackets first; keep its reason only.
    return re.sub(r"^\[[^\]]*\]\s*", "", text.strip().rstrip(".")) or "not a cron expression"
