"""Scheduled and external work: tenant cron schedules, polling sources, incoming webhooks, run reports.

* :mod:`.cron` — cron expressions in a time zone (validation, next due time, daylight-saving rules);
* :mod:`.spec` — what a tenant saves (:class:`ScheduleSpec`), validated with one-sentence errors;
* :mod:`.plan` — what to do with a due schedule at a given time (on time, missed: skip or run once);
* :mod:`.dispatcher` — the loop, in every worker process, that enqueues each due run exactly once;
* :mod:`.sources` — the polling source contract (HTTP, cursor) and :mod:`.polling`, a poll;
* :mod:`.webhooks` — signature verification and deduplication of incoming webhooks;
* :mod:`.reports` — the recurring run report, emailed once per period.

The task functions that workers run are in :mod:`agentworker.tasks.scheduled_tasks`.
"""

from agentworker.schedules.cron import CronSchedule, InvalidCron, parse_cron
from agentworker.schedules.spec import InvalidSchedule, PollSource, ScheduleSpec, parse_schedule

__all__ = ["CronSchedule", "InvalidCron", "InvalidSchedule", "PollSource", "ScheduleSpec", "parse_cron",
           "parse_schedule"]
