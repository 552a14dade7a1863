"""The recurring run report: a real worker summarises a tenant's runs and emails them, once per period,
to a local aiosmtpd server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from agentworker.db import Database, definitions, runs
from tests.agent_helpers import smtp_settings
from tests.conftest import new_tenant, wait_for
from tests.schedule_helpers import schedule_worker_env
from tests.workflow_helpers import workflow_client

pytestmark = pytest.mark.slow

HTTP_502 = {"step_id": "charge", "error": "HttpError", "message": "HTTP 502 from the payment API"}


async def add_run(database: Database, tenant: str, key: str, status: str, created: datetime,
                  seconds: float | None, error: Any = None) -> None:
    async with database.tenant(tenant) as tx:
        stored = await definitions.get_definition(tx, "billing")
        assert stored is not None
        run, _ = await runs.create_run(tx, workflow_id="billing", workflow_version=stored.version,
                                       idempotency_key=key, trigger="manual", input_data={})
        await tx.execute("UPDATE agentworker.workflow_runs SET status = $2, error = $3, created_at = $4, "
                         "finished_at = $5 WHERE run_id = $1", runs.parse_run_id(run.run_id), status, error,
                         created, None if seconds is None else created + timedelta(seconds=seconds))


async def test_the_report_email_has_the_right_counts_and_is_sent_once_per_period(
        redis_url: str, quota_file: Path, database_url: str, database: Database, spawn_worker: Any,
        smtp_server: Any) -> None:
    smtp = smtp_server()
    tenant = new_tenant("report")
    worker = spawn_worker(quota_file, **schedule_worker_env(database_url))
    end = datetime.now(UTC).replace(microsecond=0)
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, {"id": "billing", "steps": [
            {"id": "charge", "kind": "transform", "template": {"ok": True}}]})
        await client.save_integration(tenant, "smtp", smtp_settings(smtp))
        for n, (status, seconds) in enumerate([("completed", 1), ("completed", 2), ("completed", 4),
                                               ("failed", 3), ("failed", 10), ("waiting_approval", None)]):
            await add_run(database, tenant, f"r{n}", status, end - timedelta(hours=n + 1), seconds,
                          HTTP_502 if status == "failed" else None)
        await add_run(database, tenant, "old", "failed", end - timedelta(hours=30), 1, HTTP_502)  # last period
        await worker.wait_serving()

        payload = {"to": ["ops@acme.example"], "period_hours": 24, "period_end": end.isoformat()}
        first = await (await client.enqueue("send_run_report", tenant, payload, idempotency_key="p1")).result(60)
        again = await (await client.enqueue("send_run_report", tenant, payload, idempotency_key="p2")).result(60)

    assert first["summary"]["counts"] == {"completed": 3, "failed": 2, "waiting_approval": 1}
    assert first["summary"]["durations"] == {"p50": 3.0, "p90": 7.6, "p99": 9.76, "max": 10.0}
    assert first["email"]["status"] == "sent" and again["email"] == first["email"], "the period's email, once"
    await wait_for(lambda: len(smtp.messages()) >= 1, 10, what="the report email")
    (mail,) = smtp.messages()
    assert mail.rcpt_tos == ["ops@acme.example"]
    assert mail.message["Subject"].startswith(f"Workflow runs of {tenant}: 6 from ")
    body = mail.message.get_payload(decode=True).decode()
    for line in ("Total: 6", "  completed: 3", "  failed: 2", "  waiting_approval: 1",
                 "Duration of the 5 finished runs (seconds): p50 3, p90 7.6, p99 9.76, max 10", "Failures: 2"):
        assert line in body.splitlines(), f"{line!r} not in:\n{body}"
    failures = [line for line in body.splitlines() if "billing run" in line]
    assert len(failures) == 2 and all(line.endswith("step charge: HttpError: HTTP 502 from the payment API")
                                      for line in failures)
