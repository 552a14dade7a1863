"""The webhook ingress's HTTP app: ``POST /webhooks/{tenant_id}/{source}``, and probes and metrics.

A delivery is checked in this order, cheapest first, and answered as soon as one check fails (every
refusal is one sentence of JSON, ``{"error": ...}``, that never repeats the body or a secret):

====  ===================================================================================================
404   the path's tenant id or source name is not well formed
413   ``Content-Length`` over ``AGENTWORKER_WEBHOOK_MAX_BODY_BYTES`` (refused unread); the connection
      is closed
415   ``Content-Type`` is not JSON in UTF-8 (checked before the body is read)
404   the tenant has no such source (before the body is read, too)
413   a body without ``Content-Length`` that grows past the limit (reading stops there)
408   the body took longer than ``AGENTWORKER_WEBHOOK_BODY_TIMEOUT`` to arrive
401   bad, missing or malformed signature, or a signed timestamp too far from now
400   the body is not a JSON document (or nests too deeply), or it arrived incomplete
429   the source is past its token bucket (``AGENTWORKER_WEBHOOK_RATE``/``_BURST``), or the tenant past
      its ``max_pending``/``rate_limit`` at enqueue; ``Retry-After`` says when to try again
200   ``{"status": "duplicate", "job_id", "delivery_id"}``: that delivery id was already received
202   ``{"status": "accepted", "job_id", "delivery_id"}``: ``handle_webhook`` is enqueued
503   Redis or PostgreSQL cannot be used now (``Retry-After``), or the ingress is shutting down
====  ===================================================================================================

**Rate.** Only a verified delivery spends its source's bucket: someone who knows a source's address but
not its secret cannot hold the provider back with junk. What junk costs is bounded anyway — a cached
source lookup (:mod:`~agentworker.ingress.sources`), at most the body limit read, one HMAC — and a flood
from one client is for the Ingress controller in front to cut (the example Ingress limits requests per
second per client address).

The signature scheme, delivery ids and body rules are :mod:`agentworker.schedules.webhooks`' — the
same functions the worker runs, so both agree by construction. The worker checks again when it runs
``handle_webhook`` (the job may also come from a backend), against the ``received_at`` the ingress
records, so a long queue does not turn a verified delivery stale.

**Exactly once.** The job's idempotency key is derived from the delivery id
(:func:`~agentworker.schedules.webhooks.delivery_key`), so its job id is the same for every replay of
one delivery, and the enqueue script admits only the first: its ``created`` flag is what tells 202
from 200, atomically in Redis, however many replays arrive at once and on whichever replica. After the
job's record has expired (``AGENTWORKER_KEEP_RESULT`` after it finished), Redis no longer knows it: a
replay is then found in PostgreSQL's ``webhook_deliveries`` (where the worker records each delivery it
started, for 30 days) and answered 200 too. The window between — a record expired but the delivery not
recorded, which means the job failed before it started the workflow — lets a replay be enqueued again,
which is a retry of a delivery that did nothing. Past 30 days a replay would start a new run, but with
the default ``tolerance_seconds`` it is refused as stale long before.

Headers handed to the job are the request's (first value of each name, lowercased) without
``Authorization``, ``Cookie`` and ``Proxy-Authorization``: credentials never reach Redis.

**Metrics** (``/metrics``): ``agentworker_webhook_requests_total{status}`` (the HTTP status of each
delivery; no tenant or source label, so the series stay bounded whatever callers send) and
``agentworker_webhook_request_duration_seconds``, in the app's own registry.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.process_collector import ProcessCollector
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker.db import SCHEMA, Database, DatabaseError
from agentworker.health.checks import FAIL, HEALTH_JSON, PASS, Check, check_postgres, check_redis, health_document
from agentworker.ingress.buckets import TokenBuckets
from agentworker.ingress.sources import SourceDirectory, SourceUnusable
from agentworker.integrations import WEBHOOK_SOURCE_PATTERN
from agentworker.jobs import InvalidJob, make_job_id
from agentworker.logs import get_logger
from agentworker.routing import InvalidTenantId, validate_tenant_id
from agentworker.schedules.webhooks import (
    WebhookRejected,
    check_media_type,
    delivery_id_of,
    delivery_key,
    parse_json_body,
    verify,
)
from agentworker.settings import Settings
from agentworker.submit import JobSubmitter, QuotaExceeded

TASK = "handle_webhook"
ROUTE = "/webhooks/{tenant_id}/{source}"
#: seconds PostgreSQL, or Redis, has to answer one delivery's query before it is answered 503
DEPENDENCY_TIMEOUT_S = 10.0
#: what a 503 tells the caller to wait
RETRY_AFTER_UNAVAILABLE_S = 5
#: the statuses a delivery can get (their series exist at 0 from the start)
STATUSES = ("200", "202", "400", "401", "404", "408", "413", "415", "429", "500", "503")
#: request headers never handed to the job: credentials (the signature header is kept: the worker checks it)
PRIVATE_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})

_SOURCE_RE = re.compile(WEBHOOK_SOURCE_PATTERN)
_log = get_logger("agentworker.ingress")


class IngressMetrics:
    """The ingress's metrics, in a registry of their own (the port serves only these)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("agentworker_webhook_requests_total", "Webhook deliveries answered by the "
                                "ingress, by HTTP status.", ["status"], registry=self.registry)
        self.duration = Histogram("agentworker_webhook_request_duration_seconds", "Time from a delivery's "
                                  "request head to its answer.", registry=self.registry,
                                  buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        ProcessCollector(registry=self.registry)
        for status in STATUSES:
            self.requests.labels(status)


class Refused(Exception):
    """A delivery answered with an error status (raised inside the handler, turned into the answer)."""

    def __init__(self, status: int, message: str, *, retry_after: int | None = None, close: bool = False) -> None:
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.close = close
        super().__init__(message)


DatabaseOpener = Callable[[], Awaitable[Database]]


class WebhookIngress:
    """The state the app serves from: connections, the submitter, caches, buckets and metrics.

    ``database`` is an opener (called for each delivery; it returns the process's pool, made on first
    use), so the port serves — 503 for deliveries, a failing ``/ready`` — while PostgreSQL is away.
    The owner (:mod:`agentworker.ingress.server`) closes the connections and swaps
    :attr:`JobSubmitter.config` when the quota file changes.
    """

    def __init__(self, settings: Settings, redis: Redis, database: DatabaseOpener, submitter: JobSubmitter, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.redis = redis
        self.database = database
        self.submitter = submitter
        self.sources = SourceDirectory()
        self.buckets = TokenBuckets(settings.webhook_rate, settings.webhook_burst)
        self.metrics = IngressMetrics()
        #: set on SIGTERM: /ready fails, new deliveries are answered 503
        self.draining = False
        self._clock = clock

    def make_app(self) -> web.Application:
        app = web.Application()
        app.router.add_post(ROUTE, self._delivery)
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready)
        app.router.add_get("/metrics", self._metrics)
        return app

    # -- deliveries -------------------------------------------------------------------------------

    async def _delivery(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        tenant_id, source = request.match_info["tenant_id"], request.match_info["source"]
        try:
            response = await self._receive(request, tenant_id, source)
        except Refused as refused:
            response = _refusal(refused)
            log = _log.warning if refused.status >= 500 else _log.info
            log("webhook refused", tenant_id=_shown(tenant_id), webhook_source=_shown(source),
                status=refused.status, reason=refused.message)
        except Exception:  # a bug of ours: one 500, logged with its traceback, never the body
            _log.exception("webhook delivery failed", tenant_id=_shown(tenant_id), webhook_source=_shown(source))
            response = _refusal(Refused(500, "the ingress failed to handle this delivery; retry later"))
        self.metrics.requests.labels(str(response.status)).inc()
        self.metrics.duration.observe(time.perf_counter() - started)
        return response

    async def _receive(self, request: web.Request, tenant_id: str, source: str) -> web.Response:
        try:
            validate_tenant_id(tenant_id)
        except InvalidTenantId:
            raise Refused(404, "no webhook source at this address: the path is /webhooks/{tenant_id}/{source} "
                               "with a valid tenant id") from None
        if not _SOURCE_RE.fullmatch(source):
            raise Refused(404, "no webhook source at this address: a source name is 1-63 lowercase letters, "
                               "digits, '_' or '-', starting with a letter")
        if self.draining:
            raise Refused(503, "the ingress is shutting down; retry in a few seconds",
                          retry_after=RETRY_AFTER_UNAVAILABLE_S)
        limit = self.settings.webhook_max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            raise Refused(413, f"the body is {request.content_length} bytes, over the {limit}-byte limit",
                          close=True)
        headers: dict[str, str] = {}
        for name, value in request.headers.items():
            headers.setdefault(name.lower(), value)
        try:
            check_media_type(headers)
        except WebhookRejected as exc:
            raise Refused(415, str(exc)) from None

        settings = await self._dependency("PostgreSQL", self._source(tenant_id, source))
        if settings is None:
            raise Refused(404, f"tenant {tenant_id!r} has no webhook source {source!r}")
        body = await self._read_body(request, limit)
        received_at = self._clock()
        try:
            verify(settings, headers, body, received_at)
        except WebhookRejected as exc:
            raise Refused(401, str(exc)) from None
        try:
            parse_json_body(headers, body)
        except WebhookRejected as exc:
            raise Refused(exc.http_status, str(exc)) from None
        # Only verified deliveries spend the bucket: junk at a known address cannot hold the provider back.
        wait = self.buckets.take((tenant_id, source))
        if wait > 0:
            seconds = max(1, math.ceil(wait))
            raise Refused(429, f"too many deliveries from this source: over "
                               f"{self.settings.webhook_rate:g}/s (burst {self.settings.webhook_burst}); "
                               f"retry in {seconds}s", retry_after=seconds)

        delivery = delivery_id_of(settings, headers, body)
        key = delivery_key(source, delivery)
        job_id = str(make_job_id(tenant_id, TASK, key))
        if await self._dependency("PostgreSQL", self._recorded(tenant_id, source, delivery)):
            return _answer(200, "duplicate", job_id, delivery)
        payload = {"source": source, "body": body.decode("utf-8"), "body_encoding": "text",
                   "received_at": received_at,
                   "headers": {name: value for name, value in headers.items() if name not in PRIVATE_HEADERS}}
        try:
            submitted = await self._dependency("Redis", self.submitter.submit(TASK, tenant_id, payload,
                                                                              idempotency_key=key))
        except QuotaExceeded as exc:
            seconds = max(1, math.ceil(exc.retry_after or 1))
            raise Refused(429, f"tenant {tenant_id!r} is over its {exc.limit}; retry in {seconds}s",
                          retry_after=seconds) from None
        except InvalidJob:  # the body and headers together do not fit AGENTWORKER_MAX_PAYLOAD_BYTES
            raise Refused(413, "the delivery is too large to enqueue (body and headers over "
                               "AGENTWORKER_MAX_PAYLOAD_BYTES)", close=True) from None
        if not submitted.created:
            return _answer(200, "duplicate", submitted.job_id, delivery)
        _log.info("webhook accepted", tenant_id=tenant_id, webhook_source=source, job_id=submitted.job_id)
        return _answer(202, "accepted", submitted.job_id, delivery)

    async def _source(self, tenant_id: str, source: str) -> Any:
        try:
            return await self.sources.get(await self.database(), tenant_id, source)
        except SourceUnusable as exc:
            raise Refused(503, f"{exc} (an operator must fix it)", retry_after=60) from None

    async def _recorded(self, tenant_id: str, source: str, delivery: str) -> bool:
        """The worker recorded this delivery (PostgreSQL remembers after Redis forgot the job)."""
        async with (await self.database()).tenant(tenant_id) as tx:
            found = await tx.fetchval(f"SELECT 1 FROM {SCHEMA}.webhook_deliveries WHERE source = $1 "
                                      "AND delivery_id = $2", source, delivery)
        return found is not None

    async def _dependency(self, name: str, call: Awaitable[Any]) -> Any:
        """``call``'s result, or a 503 when ``name`` (Redis or PostgreSQL) fails or takes too long."""
        try:
            async with asyncio.timeout(DEPENDENCY_TIMEOUT_S):
                return await call
        except (TimeoutError, OSError, RedisError, DatabaseError, asyncpg.PostgresError,
                asyncpg.InterfaceError) as exc:
            _log.warning("webhook dependency unavailable", dependency=name,
                         error=f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            raise Refused(503, f"{name} cannot be used now; retry later",
                          retry_after=RETRY_AFTER_UNAVAILABLE_S) from None

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        """At most ``limit`` bytes of body within the body deadline, else a refusal (nothing more is read)."""
        chunks: list[bytes] = []
        size = 0
        timeout = self.settings.webhook_body_timeout
        try:
            async with asyncio.timeout(timeout):
                while chunk := await request.content.readany():
                    size += len(chunk)
                    if size > limit:
                        raise Refused(413, f"the body is over the {limit}-byte limit", close=True)
                    chunks.append(chunk)
        except TimeoutError:
            raise Refused(408, f"the body did not arrive within {timeout:g}s", close=True) from None
        except HttpProcessingError:  # the body ended early or its chunked encoding is broken
            raise Refused(400, "the body did not arrive complete", close=True) from None
        return b"".join(chunks)

    # -- probes and metrics -----------------------------------------------------------------------

    async def _health(self, _request: web.Request) -> web.Response:
        """Liveness: the event loop answers. A Redis or PostgreSQL outage does not fail it (a restart
        would not bring them back); /ready reports those."""
        return _health_response([Check("ingress:loop", PASS)], "agentworker webhook ingress liveness")

    async def _ready(self, _request: web.Request) -> web.Response:
        timeout = self.settings.ready_timeout
        checks = list(await asyncio.gather(check_redis(self.redis, timeout),
                                           check_postgres(self.settings.database_url, timeout),
                                           self._check_pool(timeout)))
        checks.append(Check("ingress:draining", FAIL, "shutting down") if self.draining
                      else Check("ingress:draining", PASS))
        return _health_response(checks, "agentworker webhook ingress readiness")

    async def _check_pool(self, timeout: float) -> Check:
        """The pool deliveries use can be made: reachable, migrated, a role under row-level security."""
        try:
            async with asyncio.timeout(timeout):
                await self.database()
        except TimeoutError:
            return Check("postgresql:pool", FAIL, f"not ready within {timeout:g}s")
        except Exception as exc:  # any failure to make the pool is a failed check, never a 500
            return Check("postgresql:pool", FAIL, f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
        return Check("postgresql:pool", PASS)

    async def _metrics(self, _request: web.Request) -> web.Response:
        response = web.Response(body=generate_latest(self.metrics.registry))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response


def _answer(status: int, word: str, job_id: str, delivery: str) -> web.Response:
    return web.json_response({"status": word, "job_id": job_id, "delivery_id": delivery}, status=status)


def _refusal(refused: Refused) -> web.Response:
    response = web.json_response({"error": refused.message}, status=refused.status)
    if refused.retry_after is not None:
        response.headers["Retry-After"] = str(refused.retry_after)
    if refused.close:  # the rest of the body is not read: the connection cannot carry another request
        response.force_close()
    return response


def _health_response(checks: list[Check], description: str) -> web.Response:
    document = health_document(checks, description, service="webhooks")
    return web.Response(text=json.dumps(document), status=503 if document["status"] == FAIL else 200,
                        content_type=HEALTH_JSON)


def _shown(value: str) -> str:
    """A path segment as logged: printable and short (it is whatever the caller sent)."""
    return "".join(c if c.isprintable() else "?" for c in value[:80])
