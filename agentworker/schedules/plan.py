"""What a dispatcher does with one due schedule at a given time: pure, so every rule is easy to test.

A due time is **on time** while it is at most ``misfire_grace_seconds`` old: it is dispatched, each on-time
due time once. Older due times were **missed** (every dispatcher was down, or the tenant was over its
quota for that long). The schedule's ``missed_policy`` then says what happens to all of them together:
``skip`` dispatches none, ``run_once`` dispatches one run, for the latest missed due time. Either way the
schedule moves on to the first due time that is still on time (or in the future): never a burst of every
missed tick.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from agentworker.schedules.cron import CronSchedule

#: missed due times walked one by one at most; past that the count stops there (a per-second schedule
#: down for a week is not iterated)
MAX_MISSED_COUNTED = 100


@dataclass(frozen=True, slots=True)
class DispatchStep:
    #: the due time to dispatch a run for now, or None
    run_due: datetime | None
    #: the schedule's next due time after this step
    next_due: datetime
    #: due times passed over without a run of their own
    missed: int


def plan_step(cron: CronSchedule, due: datetime, now: datetime, *, grace_seconds: float,
              missed_policy: str) -> DispatchStep:
    """One step for a schedule whose next due time ``due`` is at or before ``now``."""
    on_time_from = now - timedelta(seconds=grace_seconds)
    if due >= on_time_from:
        return DispatchStep(run_due=due, next_due=cron.next_after(due), missed=0)
    first_on_time = cron.first_at_or_after(on_time_from)
    last_missed, missed = due, 1
    while missed < MAX_MISSED_COUNTED:
        following = cron.next_after(last_missed)
        if following >= first_on_time:
            break
        last_missed, missed = following, missed + 1
    else:
        # Too many to walk: the latest missed one is the last due time before the first on-time one.
        last_missed = _last_before(cron, first_on_time, last_missed)
    if missed_policy == "run_once":
        return DispatchStep(run_due=last_missed, next_due=first_on_time, missed=missed - 1)
    return DispatchStep(run_due=None, next_due=first_on_time, missed=missed)


def _last_before(cron: CronSchedule, bound: datetime, known: datetime) -> datetime:
    """The latest due time before ``bound``, searching back from it by doubling windows (``known`` is one)."""
    window = timedelta(seconds=1)
    while True:
        start = max(known, bound - window)
        found, probe = None, cron.first_at_or_after(start)
        while probe < bound:
            found, probe = probe, cron.next_after(probe)
        if found is not None:
            return found
        window *= 2
