"""The tasks of scheduled and external work (the logic is in :mod:`agentworker.schedules`):

* ``poll_source(tenant_id, schedule_id, due_at)`` — enqueued by the dispatcher at each due time of a
  ``poll`` schedule: reads the source after its cursor and starts the workflow once per new item;
* ``handle_webhook(tenant_id, source, headers, body, body_encoding="text", received_at=None)`` — enqueued
  by the webhook ingress (``agentworker webhooks``, :mod:`agentworker.ingress`) or by the backend for each
  incoming webhook call: verifies the signature, deduplicates, starts the source's workflow;
* ``send_run_report(tenant_id, to, period_hours=24, period_end=None, subject=None)`` — emails the
  tenant's run report for the period, once.

All three retry on :class:`~agentworker.db.DatabaseUnavailable` (and the first two when the tenant is
over its quota) with backoff while the pool's ``max_tries`` allow.
"""

from __future__ import annotations

import time
from typing import Any

from agentworker.db import DatabaseUnavailable
from agentworker.schedules import polling, reports, webhooks
from agentworker.submit import JobSubmitter, QuotaExceeded
from agentworker.tasks.context import JobContext
from agentworker.tasks.registry import task


def _submitter(ctx: JobContext) -> JobSubmitter:
    # Borrows the worker's Redis client (the worker closes it) and takes its current quota file.
    return ctx.runtime.submitter()


@task(retry_on=(DatabaseUnavailable, QuotaExceeded))
async def poll_source(ctx: JobContext, tenant_id: str, schedule_id: str, due_at: str | None = None) -> dict[str, Any]:
    """Poll the source of schedule ``schedule_id`` (``due_at``: the due time that dispatched this poll)."""
    database = await ctx.runtime.database()
    result = await polling.poll_once(database, _submitter(ctx), tenant_id, schedule_id,
                                     ctx.log.bind(schedule_id=schedule_id, due_at=due_at))
    return result.to_dict()


#: how old a ``received_at`` of ``handle_webhook`` may be: the life of an unclaimed job (ARQ's expiry)
_MAX_RECEIVED_AGE_S = 86_400.0
#: how far in the future it may be (clocks of two hosts disagree a little, not by minutes)
_MAX_RECEIVED_AHEAD_S = 60.0


@task(retry_on=(DatabaseUnavailable, QuotaExceeded))
async def handle_webhook(ctx: JobContext, tenant_id: str, source: str, headers: dict[str, Any], body: str,
                         body_encoding: str = "text", received_at: float | None = None) -> dict[str, Any]:
    """Verify an incoming webhook of ``source`` and start its workflow once per delivery.

    ``received_at`` (Unix seconds) is when the call reached the HTTP front that enqueued this job (the
    webhook ingress sets it): the signed timestamp is checked against it rather than against now, so a
    delivery the ingress verified and answered 202 is not refused as stale because the queue was long
    or the job was retried. Whoever can enqueue jobs is trusted anyway (it could enqueue the workflow
    itself); the value is still bounded to the last day.
    """
    if not isinstance(headers, dict) or not isinstance(body, str):
        raise ValueError("headers must be a JSON object and body a string")
    if received_at is not None and not _plausible_receipt_time(received_at):
        raise ValueError("received_at must be the Unix time, within the last day, the webhook was received")
    raw = webhooks.decode_body(body, body_encoding)
    database = await ctx.runtime.database()
    return await webhooks.receive(database, _submitter(ctx), tenant_id, source, headers, raw,
                                  ctx.log.bind(webhook_source=source),
                                  now=None if received_at is None else float(received_at))


def _plausible_receipt_time(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    return -_MAX_RECEIVED_AHEAD_S <= time.time() - value <= _MAX_RECEIVED_AGE_S


@task(retry_on=(DatabaseUnavailable,))
async def send_run_report(ctx: JobContext, tenant_id: str, to: list[str], period_hours: int = 24,
                          period_end: str | None = None, subject: str | None = None) -> dict[str, Any]:
    """Email the tenant's run report for the ``period_hours`` before ``period_end`` (default: now), once."""
    if not isinstance(to, list) or not all(isinstance(address, str) for address in to):
        raise ValueError("to must be a list of email addresses")
    return await reports.send_report(await ctx.scope(), to, period_hours=period_hours, period_end=period_end,
                                     subject=subject)
