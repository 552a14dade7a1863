"""The recurring run report: a tenant's workflow runs over a period, emailed once per period.

Schedule it like any task (``period_end: "{{ due_at }}"`` makes each report cover the period ending at
its due time)::

    {"id": "daily-report", "cron": "0 8 * * *", "timezone": "Europe/Paris", "task": "send_run_report",
     "payload": {"to": ["ops@acme.example"], "period_hours": 24, "period_end": "{{ due_at }}"}}

The report counts the runs created in ``[period_end - period_hours, period_end)`` by status, gives the
duration percentiles of those that finished (p50, p90, p99, max; from creation to finish) and lists the
failed ones with their reasons (the first :data:`~agentworker.db.run_reports.MAX_FAILURES_LISTED`). It
goes out through the ``send_email`` tool (the tenant's SMTP settings) inside the side-effect ledger,
keyed by the period and the recipients: whatever retries or repeated jobs, one email per period and
recipient list (and the email outbox covers a crash in the middle of the send).
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from agentworker.db.run_reports import RunSummary, summarise_runs
from agentworker.errors import AgentWorkerError

if TYPE_CHECKING:
    from agentworker.tools.scope import TenantScope

REPORT_RUN_ID = "run-report"
MAX_PERIOD_HOURS = 24 * 31



class InvalidReport(AgentWorkerError, ValueError):
    """Report arguments that cannot be used."""


def report_window(period_end: str | None, period_hours: int, now: datetime | None = None) -> tuple[datetime, datetime]:
    if isinstance(period_hours, bool) or not isinstance(period_hours, int) or not 1 <= period_hours <= MAX_PERIOD_HOURS:
        raise InvalidReport(f"period_hours must be an integer from 1 to {MAX_PERIOD_HOURS}, got {period_hours!r}")
    if period_end is None:
        end = (now or datetime.now(UTC)).replace(microsecond=0)
    else:
        try:
            end = datetime.fromisoformat(period_end)
        except (TypeError, ValueError):
            raise InvalidReport(f"period_end must be an ISO 8601 time, got {period_end!r}") from None
        if end.tzinfo is None:
            raise InvalidReport(f"period_end must carry a UTC offset, got {period_end!r}")
    end = end.astimezone(UTC)
    return end - timedelta(hours=period_hours), end


def render(tenant_id: str, summary: RunSummary) -> tuple[str, str]:
    """The subject and plain-text body of a report."""
    period = f"{summary.start:%Y-%m-%d %H:%M} to {summary.end:%Y-%m-%d %H:%M} UTC"
    subject = f"Workflow runs of {tenant_id}: {summary.total} from {period}"
    lines = [f"Workflow runs of tenant {tenant_id}, created from {period}.", "",
             f"Total: {summary.total}"]
    lines += [f"  {status}: {count}" for status, count in sorted(summary.counts.items())]
    lines.append("")
    if summary.durations:
        d = summary.durations
        lines.append(f"Duration of the {summary.finished} finished runs (seconds): p50 {d['p50']:g}, "
                     f"p90 {d['p90']:g}, p99 {d['p99']:g}, max {d['max']:g}")
    else:
        lines.append("No run finished in the period.")
    failed = summary.counts.get("failed", 0)
    lines += ["", f"Failures: {failed}"]
    lines += [f"  {f.created_at:%Y-%m-%d %H:%M:%S} {f.workflow_id} run {f.run_id}: {f.reason}"
              for f in summary.failures]
    if failed > len(summary.failures):
        lines.append(f"  ... and {failed - len(summary.failures)} more")
    return subject, "\n".join(lines) + "\n"


async def send_report(scope: TenantScope, to: list[str], *, period_hours: int = 24, period_end: str | None = None,
                      subject: str | None = None) -> dict[str, Any]:
    """Summarise the period and email it once; return ``{"period", "summary", "email"}``."""
    from agentworker.tools import TOOLS

    tenant_id, database = scope.tenant_id, scope.database

    start, end = report_window(period_end, period_hours)
    async with database.tenant(tenant_id) as tx:
        summary = await summarise_runs(tx, start, end)
    default_subject, body = render(tenant_id, summary)
    args = {"to": to, "subject": subject or default_subject, "body": body}
    send_email = TOOLS.get(tenant_id, "send_email")  # validates ``args`` itself: a bad address fails the job
    period = f"{start.isoformat()}/{end.isoformat()}"
    recipients = hashlib.sha256("\x1f".join(sorted(to)).encode()).hexdigest()[:24]

    async def effect(key: str) -> Any:
        return await send_email.func(scope.tool_context(REPORT_RUN_ID, period, idempotency_key=key), args)

    receipt = await scope.ledger.run_once(tenant_id, REPORT_RUN_ID, period, f"send_email:{recipients}", effect)
    scope.log.info("run report sent", period=period, runs=summary.total, email_status=receipt.get("status"))
    return {"period": period, "summary": summary.to_dict(), "email": receipt}
