"""A webhook's body must be declared JSON and be JSON: otherwise it is rejected (415, or 400 for a body
that is not the JSON it claims to be), even when correctly signed, and nothing runs."""

from __future__ import annotations

import base64
import time
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker.client import JobFailed
from agentworker.db import Database
from agentworker.jobs import check_payload
from agentworker.schedules.webhooks import MAX_BODY_DEPTH, WebhookRejected, parse_json_body, sign
from tests.conftest import new_tenant
from tests.schedule_helpers import schedule_worker_env
from tests.workflow_helpers import workflow_client

SECRET = "whsec-test-0123456789"


def test_declared_json_bodies_are_parsed() -> None:
    for content_type in ("application/json", "Application/JSON; charset=UTF-8", 'application/json;charset="utf-8"',
                         "application/vnd.github+json", "application/cloudevents+json"):
        assert parse_json_body({"content-type": content_type}, b'{"a": [1]}') == {"a": [1]}


def test_a_body_not_declared_json_is_415_and_a_bad_json_body_400() -> None:
    refused: list[tuple[dict[str, str], bytes, str, int, str]] = [
        ({"content-type": "text/xml"}, b"<a/>", "unsupported_media_type", 415,
         "the body's Content-Type is 'text/xml'; webhook bodies must be application/json (UTF-8)"),
        ({}, b"{}", "unsupported_media_type", 415,
         "the request has no Content-Type header; webhook bodies must be application/json"),
        ({"content-type": "application/json; charset=latin-1"}, b"{}", "unsupported_media_type", 415,
         "the body's Content-Type is 'application/json; charset=latin-1'"),
        ({"content-type": "application/x-www-form-urlencoded"}, b"a=1", "unsupported_media_type", 415,
         "'application/x-www-form-urlencoded'"),
        ({"content-type": "application/json"}, b"<a/>", "bad_body", 400,
         "the body is not a valid UTF-8 JSON document"),
        ({"content-type": "application/json"}, b'"\xff"', "bad_body", 400,
         "the body is not a valid UTF-8 JSON document"),
        ({"content-type": "application/json"}, b"[" * 100_000 + b"]" * 100_000, "bad_body", 400,
         f"deeper than the {MAX_BODY_DEPTH}-level limit"),
        ({"content-type": "application/json"}, b"[" * (MAX_BODY_DEPTH + 1) + b"]" * (MAX_BODY_DEPTH + 1),
         "bad_body", 400, f"deeper than the {MAX_BODY_DEPTH}-level limit"),
    ]
    for headers, body, outcome, status, message in refused:
        with pytest.raises(WebhookRejected) as info:
            parse_json_body(headers, body)
        assert (info.value.outcome, info.value.http_status) == (outcome, status)
        assert message in str(info.value), str(info.value)
    deepest = parse_json_body({"content-type": "application/json"}, b"[" * MAX_BODY_DEPTH + b"]" * MAX_BODY_DEPTH)
    # The deepest body accepted still fits the workflow's payload, where it lands as input_data.payload.
    check_payload({"tenant_id": "acme", "input_data": {"payload": deepest}}, "acme")


@pytest.mark.slow
async def test_a_signed_xml_webhook_is_rejected_and_runs_nothing(
        redis: Redis, redis_url: str, quota_file: Path, database_url: str, database: Database,
        spawn_worker: Any) -> None:
    tenant = new_tenant("hookct")
    worker = spawn_worker(quota_file, **schedule_worker_env(database_url))
    body = b"<event>payment.succeeded</event>"
    now = int(time.time())
    signed = {"X-Signature": sign(SECRET, body, now), "X-Signature-Timestamp": str(now), "X-Delivery-Id": "evt-1",
              "Content-Type": "text/xml"}
    async with workflow_client(redis_url, quota_file, database) as client:
        await client.save_workflow(tenant, {"id": "on-payment", "steps": [
            {"id": "take", "kind": "transform", "template": {"source": "{{ input.source }}"}}]})
        await client.save_integration(tenant, "webhook", {"secret": SECRET, "workflow_id": "on-payment"},
                                      name="shop")
        await worker.wait_serving()
        job = await client.enqueue("handle_webhook", tenant, idempotency_key="xml", payload={
            "source": "shop", "headers": signed, "body": base64.b64encode(body).decode(),
            "body_encoding": "base64"})
        with pytest.raises(JobFailed) as rejected:
            await job.result(timeout=30)
        assert rejected.value.error == "WebhookRejected"
        assert "Content-Type is 'text/xml'; webhook bodies must be application/json" in rejected.value.message
        assert await client.list_runs(tenant) == [], "a rejected webhook runs nothing"
    log = worker.log()
    assert '"outcome": "unsupported_media_type"' in log and SECRET not in log
