"""Incoming webhooks: verify the signature first, deduplicate on the delivery id, start the workflow.

The webhook ingress (``agentworker webhooks``, :mod:`agentworker.ingress`), or the backend, receives the
provider's HTTP call and enqueues ``handle_webhook`` with the source's name, the request's headers and its
raw body (``body_encoding="base64"`` for a body that is not UTF-8 text). The ingress runs :func:`verify`,
:func:`check_media_type` and :func:`parse_json_body` before it answers; the worker runs them again. The
source is a tenant integration (kind ``webhook``, name = the source) holding the signing secret and the
workflow to start (:class:`~agentworker.integrations.WebhookSettings`).

**Signature.** ``<signature_header>: sha256=<hex>`` (default ``X-Signature``), the lowercase hex
HMAC-SHA256, keyed with the source's secret, of:

* ``<timestamp>.<body>`` when ``tolerance_seconds`` > 0 (the default, 300): the Unix time in seconds from
  ``<timestamp_header>`` (default ``X-Signature-Timestamp``), a dot, and the raw body; a timestamp further
  than ``tolerance_seconds`` from now is refused, so a captured request cannot be replayed later;
* the raw body alone when ``tolerance_seconds`` is 0 (GitHub's ``X-Hub-Signature-256`` scheme).

Verified before anything else, compared in constant time (:func:`hmac.compare_digest`). A request that
fails — unknown source, missing or malformed header, wrong signature, stale timestamp — is rejected
(the job fails with :class:`WebhookRejected`), logged without its body or any secret, counted in
``agentworker_webhooks_total{outcome}``, and runs nothing.

**Body.** Then the body must be declared JSON — ``Content-Type: application/json`` (or
``application/<something>+json``; a ``charset``, if given, ``utf-8``) — and be a JSON document nesting
at most :data:`MAX_BODY_DEPTH` levels (62: the workflow's payload holds it two levels down): otherwise
the webhook is rejected in the same way (``unsupported_media_type``, ``bad_body``).
:attr:`WebhookRejected.http_status` is the status for the HTTP front that received the call to answer
(415 for a body that is not JSON).

**Deduplication.** The delivery id is the ``<delivery_header>`` (default ``X-Delivery-Id``), else the
SHA-256 of the body. It is recorded in ``agentworker.webhook_deliveries`` in the transaction that enqueues
the workflow (job id ``{tenant}:execute_workflow:wh-{source}-{digest}``): a second delivery finds it and
starts nothing. Deliveries older than :data:`DELIVERY_RETENTION_DAYS` are forgotten.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from typing import Any

from agentworker import metrics
from agentworker.db import SCHEMA, Database
from agentworker.db import integrations as integration_rows
from agentworker.errors import AgentWorkerError
from agentworker.integrations import WEBHOOK_SOURCE_PATTERN, WebhookSettings
from agentworker.jobs import MAX_PAYLOAD_DEPTH, make_job_id, nesting_depth
from agentworker.logs import Logger
from agentworker.submit import JobSubmitter

DELIVERY_RETENTION_DAYS = 30
_MAX_DELIVERY_ID = 200
#: headers never handed to the workflow (credentials, and the signature itself)
_PRIVATE_HEADERS = ("authorization", "cookie", "proxy-authorization")


#: the HTTP status that answers each rejection (for the front that received the provider's call)
HTTP_STATUS = {"bad_signature": 401, "stale": 401, "unknown_source": 404, "unsupported_media_type": 415,
               "bad_body": 400}
_MAX_SHOWN = 80
#: how deeply a body may nest: the workflow's payload wraps it two levels down (``input_data.payload``),
#: and the whole payload may nest :data:`~agentworker.jobs.MAX_PAYLOAD_DEPTH` levels
MAX_BODY_DEPTH = MAX_PAYLOAD_DEPTH - 2


class WebhookRejected(AgentWorkerError):
    """The webhook was refused before anything ran; ``outcome`` is the metric's label."""

    def __init__(self, outcome: str, message: str) -> None:
        self.outcome = outcome
        self.http_status = HTTP_STATUS.get(outcome, 400)
        super().__init__(message)


def decode_body(body: str, encoding: str) -> bytes:
    if encoding == "text":
        return body.encode("utf-8")
    if encoding == "base64":
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("body is not valid base64") from None
    raise ValueError(f"unknown body_encoding {encoding!r}: use 'text' or 'base64'")


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The signature header's value for ``body`` (what a provider sends; tests and clients use it)."""
    message = body if timestamp is None else f"{timestamp}.".encode() + body
    return "sha256=" + hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def verify(settings: WebhookSettings, headers: Mapping[str, str], body: bytes, now: float) -> None:
    """Raise :class:`WebhookRejected` unless the request is signed with the source's secret."""
    given = headers.get(settings.signature_header.lower(), "")
    if not given.startswith("sha256=") or len(given) != 71:
        raise WebhookRejected("bad_signature", f"missing or malformed {settings.signature_header} header "
                                               "(expected sha256=<64 hex digits>)")
    message = body
    if settings.tolerance_seconds > 0:
        raw = headers.get(settings.timestamp_header.lower(), "")
        if not raw.isascii() or not raw.isdigit() or len(raw) > 12:
            raise WebhookRejected("bad_signature", f"missing or malformed {settings.timestamp_header} header "
                                                   "(expected Unix seconds)")
        if abs(now - int(raw)) > settings.tolerance_seconds:
            raise WebhookRejected("stale", f"the signed timestamp is more than {settings.tolerance_seconds}s "
                                           "from now")
        message = f"{raw}.".encode() + body
    expected = hmac.new(settings.secret.get_secret_value().encode(), message, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given[7:].lower().encode("utf-8", "replace")):
        raise WebhookRejected("bad_signature", "the signature does not match")


def _media_type(declared: str) -> tuple[str, str | None]:
    """``Content-Type`` → (lowercased media type, lowercased charset or None)."""
    media_type, *parameters = declared.split(";")
    charset = None
    for parameter in parameters:
        name, _, value = parameter.partition("=")
        if name.strip().lower() == "charset":
            charset = value.strip().strip('"').lower()
    return media_type.strip().lower(), charset


def check_media_type(headers: Mapping[str, str]) -> None:
    """Raise :class:`WebhookRejected` (``unsupported_media_type``) unless ``Content-Type`` declares JSON in
    UTF-8; ``headers`` are lowercased names. The ingress checks this before it reads the body."""
    declared = headers.get("content-type", "").strip()
    if not declared:
        raise WebhookRejected("unsupported_media_type",
                              "the request has no Content-Type header; webhook bodies must be application/json")
    media_type, charset = _media_type(declared)
    is_json = media_type == "application/json" or (media_type.startswith("application/")
                                                   and media_type.endswith("+json"))
    if not is_json or charset not in (None, "utf-8", "utf8"):
        raise WebhookRejected("unsupported_media_type",
                              f"the body's Content-Type is {declared[:_MAX_SHOWN]!r}; webhook bodies must be "
                              f"application/json (UTF-8)")


def parse_json_body(headers: Mapping[str, str], body: bytes) -> Any:
    """The body as JSON, checked to be declared and to be JSON; raise :class:`WebhookRejected` if not.

    ``headers`` are lowercased names.
    """
    check_media_type(headers)
    too_deep = WebhookRejected("bad_body", f"the body nests objects or arrays deeper than the "
                                           f"{MAX_BODY_DEPTH}-level limit")
    try:
        document = json.loads(body.decode("utf-8"))
    except RecursionError:
        raise too_deep from None
    except ValueError:  # UnicodeDecodeError included
        raise WebhookRejected("bad_body", "the body is not a valid UTF-8 JSON document") from None
    if body.count(b"{") + body.count(b"[") > MAX_BODY_DEPTH and nesting_depth(document) > MAX_BODY_DEPTH:
        raise too_deep
    return document


def delivery_id_of(settings: WebhookSettings, headers: Mapping[str, str], body: bytes) -> str:
    value = headers.get(settings.delivery_header.lower(), "").strip()
    if not value or len(value) > _MAX_DELIVERY_ID or not value.isprintable():
        return "sha256:" + hashlib.sha256(body).hexdigest()
    return value


def delivery_key(source: str, delivery_id: str) -> str:
    """The idempotency key of a delivery's jobs: ``wh-{source}-{32 hex digits of its SHA-256}``."""
    return f"wh-{source}-{hashlib.sha256(delivery_id.encode()).hexdigest()[:32]}"


def _workflow_input(source: str, delivery_id: str, headers: Mapping[str, str], payload: Any,
                    settings: WebhookSettings) -> dict[str, Any]:
    hidden = {*_PRIVATE_HEADERS, settings.signature_header.lower()}
    return {"source": source, "delivery_id": delivery_id, "payload": payload,
            "headers": {k: v for k, v in sorted(headers.items()) if k not in hidden}}


async def receive(database: Database, submitter: JobSubmitter, tenant_id: str, source: str,
                  headers: Mapping[str, Any], body: bytes, log: Logger, *, now: float | None = None) -> dict[str, Any]:
    """Verify, deduplicate and start the source's workflow; return ``{"status", "delivery_id", "job_id"}``."""
    lowered = {str(k).lower(): str(v) for k, v in headers.items()}
    try:
        settings = await _settings(database, tenant_id, source)
        verify(settings, lowered, body, time.time() if now is None else now)
        payload = parse_json_body(lowered, body)
    except WebhookRejected as exc:
        metrics.WEBHOOKS_TOTAL.labels(exc.outcome).inc()
        log.warning("webhook rejected", source=source, outcome=exc.outcome, reason=str(exc))
        raise WebhookRejected(exc.outcome, f"webhook from source {source!r} rejected: {exc}") from None

    delivery = delivery_id_of(settings, lowered, body)
    key = delivery_key(source, delivery)
    async with database.tenant(tenant_id) as tx:
        await tx.execute(f"DELETE FROM {SCHEMA}.webhook_deliveries WHERE source = $1 AND "
                         f"received_at < now() - make_interval(days => {DELIVERY_RETENTION_DAYS})", source)
        job_id = str(make_job_id(tenant_id, "execute_workflow", key))
        inserted = await tx.fetchval(
            f"INSERT INTO {SCHEMA}.webhook_deliveries (tenant_id, source, delivery_id, job_id) "
            "VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING RETURNING job_id", tenant_id, source, delivery, job_id)
        if inserted is None:
            metrics.WEBHOOKS_TOTAL.labels("duplicate").inc()
            log.info("webhook delivery already received", source=source, delivery_id=delivery)
            return {"status": "duplicate", "delivery_id": delivery, "job_id": job_id}
        # Enqueued inside the transaction: if the commit is lost, the retry enqueues the same job id (a no-op).
        handle = await submitter.submit("execute_workflow", tenant_id, idempotency_key=key, payload={
            "workflow_id": settings.workflow_id, "trigger": "webhook",
            "input_data": _workflow_input(source, delivery, lowered, payload, settings)})
    metrics.WEBHOOKS_TOTAL.labels("accepted").inc()
    log.info("webhook accepted", source=source, delivery_id=delivery, job_id=handle.job_id)
    return {"status": "accepted", "delivery_id": delivery, "job_id": handle.job_id}


async def read_source(database: Database, tenant_id: str, source: str) -> WebhookSettings | None:
    """The source's stored settings, read in the tenant's transaction and validated (pydantic's
    ``ValidationError`` for a stored document that does not validate); None if the tenant has no such
    source. The worker's check and the ingress's cache (:mod:`agentworker.ingress.sources`) both read here."""
    async with database.tenant(tenant_id) as tx:
        config = await integration_rows.get_integration(tx, "webhook", source)
    return None if config is None else WebhookSettings.model_validate(config)


async def _settings(database: Database, tenant_id: str, source: str) -> WebhookSettings:
    if not isinstance(source, str) or not re.fullmatch(WEBHOOK_SOURCE_PATTERN, source):
        raise WebhookRejected("unknown_source", "not a webhook source name")
    settings = await read_source(database, tenant_id, source)
    if settings is None:
        raise WebhookRejected("unknown_source", "the tenant has no webhook source of that name")
    return settings
