"""Incoming webhooks end to end: a real worker verifies HMAC signatures, deduplicates deliveries and
starts the source's workflow; rejections run nothing and are counted."""

from __future__ import annotations

import base64
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import Redis

from agentworker.client import AgentWorkerClient, JobFailed
from agentworker.db import Database
from agentworker.schedules.webhooks import sign
from tests.conftest import new_tenant
from tests.schedule_helpers import schedule_worker_env
from tests.workflow_helpers import workflow_client

pytestmark = pytest.mark.slow

SECRET = "whsec-test-0123456789"
ON_PAYMENT = {"id": "on-payment", "steps": [{"id": "take", "kind": "transform", "template": {
    "event": "{{ input.payload.event }}", "delivery": "{{ input.delivery_id }}", "source": "{{ input.source }}"}}]}


async def deliver(client: AgentWorkerClient, tenant: str, headers: dict[str, str], body: bytes, key: str,
                  source: str = "shop") -> Any:
    job = await client.enqueue("handle_webhook", tenant, idempotency_key=key, payload={
        "source": source, "headers": headers, "body": base64.b64encode(body).decode(), "body_encoding": "base64"})
    return await job.result(timeout=30)


async def test_a_bad_signature_runs_nothing_and_a_good_delivery_sent_twice_runs_once(
        redis: Redis, redis_url: str, quota_file: Path, database_url: str, database: Database, spawn_worker: Any,
        tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    tenant = new_tenant("hook")
    worker = spawn_worker(quota_file, PROMETHEUS_MULTIPROC_DIR=str(metrics_dir), **schedule_worker_env(database_url))
    body = b'{"event": "payment.succeeded", "amount": 42}'
    now = int(time.time())
    signed = {"X-Signature": sign(SECRET, body, now), "X-Signature-Timestamp": str(now), "X-Delivery-Id": "evt-1",
              "Content-Type": "application/json"}
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, ON_PAYMENT)
        saved = await client.save_integration(tenant, "webhook", {"secret": SECRET, "workflow_id": "on-payment"},
                                              name="shop")
        assert saved["secret"] == "***"
        await worker.wait_serving()

        attempts: list[tuple[Callable[[], dict[str, str]], str, str]] = [
            (lambda: {**signed, "X-Signature": sign("not-the-tenant-secret", body, now)}, "bad_signature",
             "the signature does not match"),
            (lambda: {k: v for k, v in signed.items() if k != "X-Signature"}, "bad_signature",
             "missing or malformed X-Signature header"),
            (lambda: {**signed, "X-Signature": sign(SECRET, body, now - 3600),
                      "X-Signature-Timestamp": str(now - 3600)}, "stale", "more than 300s from now"),
        ]
        for index, (headers, _outcome, message) in enumerate(attempts):
            with pytest.raises(JobFailed) as rejected:
                await deliver(client, tenant, headers(), body, f"bad-{index}")
            assert rejected.value.error == "WebhookRejected" and message in rejected.value.message
        with pytest.raises(JobFailed, match="no webhook source of that name"):
            await deliver(client, tenant, signed, body, "unknown", source="github")
        assert await client.list_runs(tenant) == [], "a rejected webhook runs nothing"
        assert await redis.keys(f"arq:*:{tenant}:execute_workflow:*") == []

        first = await deliver(client, tenant, signed, body, "good-1")
        again = await deliver(client, tenant, signed, body, "good-2")  # the provider retried the same delivery
        assert first["status"] == "accepted" and again["status"] == "duplicate"
        assert first["delivery_id"] == again["delivery_id"] == "evt-1" and first["job_id"] == again["job_id"]
        run = await client.job(first["job_id"]).result(timeout=60)
        assert run["status"] == "completed"
        assert run["output"] == {"take": {"event": "payment.succeeded", "delivery": "evt-1", "source": "shop"}}
        runs = await client.list_runs(tenant)
        assert len(runs) == 1 and runs[0].trigger == "webhook"
        assert "x-signature" not in runs[0].input["headers"] and runs[0].input["headers"]["x-delivery-id"] == "evt-1"

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(metrics_dir))
    counted = {outcome: registry.get_sample_value("agentworker_webhooks_total", {"outcome": outcome})
               for outcome in ("bad_signature", "stale", "unknown_source", "accepted", "duplicate")}
    assert counted == {"bad_signature": 2, "stale": 1, "unknown_source": 1, "accepted": 1, "duplicate": 1}
    log = worker.log()
    assert log.count('"webhook rejected"') == 4 and SECRET not in log
