"""The supervisor's one HTTP port (aiohttp): probes, metrics, status and the admin endpoints.

==================  ===========================================================================
GET /health         liveness: the reconcile loop turned recently. Redis or PostgreSQL being down
                    does not fail it (restarting the pod would not bring them back).
GET /ready          readiness: Redis and PostgreSQL reachable, every pool has a serving process
                    and none is failing, the supervisor is not draining.
GET /metrics        Prometheus text: the supervisor's metrics and every worker's, merged.
GET /status         JSON: pools, processes, queue depths, per-tenant in-flight and pending, dead
                    letters per pool.
POST /admin/reload  re-read the quota file (bearer token ``AGENTWORKER_ADMIN_TOKEN``; without a
                    token configured every /admin/ path answers 404). 200 with what changed, or
                    422 with the file's errors (the running config stays).
==================  ===========================================================================

The app knows the supervisor only through :class:`HealthBackend`, so it can be tested on its own.
:mod:`~agentworker.health.server` serves it (a deadline on request heads, one-line logs for malformed
requests).
"""

from __future__ import annotations

import hmac
import json
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from agentworker.health.checks import FAIL, HEALTH_JSON, Check, health_document


class HealthBackend(Protocol):
    """What the HTTP app needs from the supervisor."""

    admin_token: str | None

    def liveness_checks(self) -> list[Check]: ...

    async def readiness_checks(self) -> list[Check]: ...

    def status(self) -> dict[str, Any]: ...

    def metrics(self) -> bytes: ...

    async def reload(self, trigger: str) -> tuple[int, dict[str, Any]]:
        """Reload the quota file; return the HTTP status (200, 422 refused, 503 no answer) and the body."""
        ...


BACKEND: web.AppKey[HealthBackend] = web.AppKey("backend", HealthBackend)


def _health_response(checks: list[Check], description: str) -> web.Response:
    document = health_document(checks, description)
    return web.Response(status=503 if document["status"] == FAIL else 200, text=json.dumps(document),
                        content_type=HEALTH_JSON, headers={"Cache-Control": "no-store"})


async def health(request: web.Request) -> web.Response:
    return _health_response(request.app[BACKEND].liveness_checks(), "agentworker supervisor liveness")


async def ready(request: web.Request) -> web.Response:
    return _health_response(await request.app[BACKEND].readiness_checks(), "agentworker supervisor readiness")


async def metrics(request: web.Request) -> web.Response:
    try:
        body = request.app[BACKEND].metrics()
    except Exception as exc:  # one failed scrape, not a crashed endpoint; Prometheus retries
        raise web.HTTPServiceUnavailable(text=f"metrics unavailable: {exc}\n") from None
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[BACKEND].status())


def _authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


@web.middleware
async def admin_guard(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/admin/") or request.path == "/admin":
        token = request.app[BACKEND].admin_token
        if not token:
            raise web.HTTPNotFound()
        if not _authorized(request, token):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="agentworker"'},
                                       text="a valid bearer token is required\n")
    response: web.StreamResponse = await handler(request)
    return response


async def admin_reload(request: web.Request) -> web.Response:
    code, body = await request.app[BACKEND].reload("POST /admin/reload")
    return web.json_response(body, status=code)


def create_app(backend: HealthBackend) -> web.Application:
    app = web.Application(middlewares=[admin_guard])
    app[BACKEND] = backend
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_post("/admin/reload", admin_reload)
    return app
