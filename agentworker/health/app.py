"""The supervisor's one HTTP port (aiohttp): probes, metrics, status and the admin endpoints.

===============================  ==============================================================
GET /health                      liveness: the reconcile loop turned recently. Redis or PostgreSQL
                                 being down does not fail it (restarting the pod would not bring
                                 them back).
GET /ready                       readiness: Redis and PostgreSQL reachable, every pool has a
                                 serving process and none is failing, the supervisor is not
                                 draining.
GET /metrics                     Prometheus text: the supervisor's metrics and every worker's,
                                 merged.
GET /status                      JSON: pools, processes, queue depths, per-tenant in-flight and
                                 pending, dead letters per pool.
POST /admin/reload               re-read the quota file (bearer token ``AGENTWORKER_ADMIN_TOKEN``;
                                 without a token configured every /admin/ path answers 404). 200
                                 with what changed, or 422 with the file's errors (the running
                                 config stays).
GET /admin/tenants               the tenant store's entries (:mod:`agentworker.tenants`) in id
                                 order, a JSON list of views; ``?after=ID`` (paging), ``?limit=N``
                                 (1-5000, default 100).
GET /admin/tenants/{id}          one tenant's view: stored plan and overrides, version, who changed
                                 it when, pool, shard, queue, effective ``limits`` and each key's
                                 ``sources`` (any valid id has one; ``stored`` says if it has an
                                 entry).
PATCH /admin/tenants/{id}        change the entry: a JSON object (at most 64 KiB) of ``by`` (who,
                                 required), ``plan`` (a name, or null: none), ``overrides`` (merged
                                 over the stored ones), ``unset`` (keys to remove, ``"plan"``
                                 included); 200 with the new view.
DELETE /admin/tenants/{id}       remove the entry (the quota file's limits apply again);
                                 ``?by=WHO`` required; 200 with the view, 404 if there was none.
GET /admin/tenants/{id}/history  the entry's audit trail, newest first, a JSON list of changes
                                 (``old`` and ``new`` entries, ``changed_by``, ``changed_at``,
                                 ``version``); ``?limit=N`` (1-5000, default 100).
===============================  ==============================================================

The tenant endpoints answer 400 ``{"error": ..., "errors": [...]}`` for a refused change (one
``path: message`` per problem, nothing changed), a bad tenant id, a bad query value or a body that
is not a JSON object of the keys above; 413 for a body over :data:`MAX_BODY_BYTES`; 503 (same shape)
while PostgreSQL cannot be used; 408 for a body still not received after :data:`BODY_TIMEOUT_S` (the
server's deadline covers heads only).

The app knows the supervisor only through :class:`HealthBackend`, so it can be tested on its own.
:mod:`~agentworker.health.server` serves it (a deadline on request heads, one-line logs for malformed
requests).
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from agentworker.config import ConfigError
from agentworker.db.database import DatabaseError
from agentworker.health.checks import FAIL, HEALTH_JSON, Check, health_document
from agentworker.routing import InvalidTenantId, validate_tenant_id

#: the largest request body read (PATCH /admin/tenants/{id}); a bigger one is refused unread
MAX_BODY_BYTES = 64 * 1024
#: seconds a request body may take to arrive (the server's deadline covers request heads only)
BODY_TIMEOUT_S = 10.0
#: the keys of a PATCH /admin/tenants/{id} body
TENANT_CHANGE_KEYS = ("by", "overrides", "plan", "unset")


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

    # The tenant store (agentworker.tenants). Each raises InvalidTenantId for a bad id, ConfigError
    # (InvalidTenantChange) for a refused change or argument, DatabaseError while PostgreSQL cannot be used.

    async def list_tenants(self, *, after: str, limit: int) -> list[dict[str, Any]]:
        """The stored tenants' views (``TenantView.as_json()``) in id order, ``limit`` after ``after``."""
        ...

    async def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        """The tenant's view (any valid id has one)."""
        ...

    async def set_tenant(self, tenant_id: str, *, by: str, change: dict[str, Any]) -> dict[str, Any]:
        """Apply ``change`` (any of ``plan``, ``overrides``, ``unset``: a PATCH body without ``by``,
        its values' JSON types checked); return the new view."""
        ...

    async def remove_tenant(self, tenant_id: str, *, by: str) -> dict[str, Any] | None:
        """Remove the tenant's entry and return its view now; None if it had no entry."""
        ...

    async def tenant_history(self, tenant_id: str, *, limit: int) -> list[dict[str, Any]]:
        """The entry's audit trail (``TenantChange.as_json()``), newest first."""
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


# -- /admin/tenants -------------------------------------------------------------------------------------


class _Refused(Exception):
    """A tenant request answered with ``{"error": ..., "errors": [...]}`` and ``status``."""

    def __init__(self, status: int, error: str, errors: list[str]) -> None:
        super().__init__(error)
        self.status, self.error, self.errors = status, error, errors


def _refused(status: int, error: str, errors: list[str]) -> web.Response:
    return web.json_response({"error": error, "errors": errors}, status=status,
                             headers={"Cache-Control": "no-store"})


@web.middleware
async def tenant_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """The tenant store's failures as JSON answers (the admin guard has let the request in)."""
    if not request.path.startswith("/admin/tenants"):
        response: web.StreamResponse = await handler(request)
        return response
    try:
        response = await handler(request)
    except _Refused as exc:
        return _refused(exc.status, exc.error, exc.errors)
    except InvalidTenantId as exc:
        return _refused(400, "invalid tenant id", [str(exc)])
    except ConfigError as exc:  # InvalidTenantChange: one path: message per problem, nothing changed
        return _refused(400, f"{exc.source}: {len(exc.errors)} error(s)", exc.errors)
    except DatabaseError as exc:
        return _refused(503, "the tenant store is unavailable: PostgreSQL cannot be used", [str(exc)])
    return response


def _json(body: Any) -> web.Response:
    return web.json_response(body, headers={"Cache-Control": "no-store"})


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    try:
        return int(raw)
    except ValueError:
        raise _Refused(400, "invalid query", [f"limit: must be an integer from 1 to 5000 (got {raw!r})"]) from None


async def _read_body(request: web.Request) -> bytes:
    """The request body, at most :data:`MAX_BODY_BYTES`, within :data:`BODY_TIMEOUT_S`."""
    too_big = _Refused(413, "request body too large", [f"body: larger than {MAX_BODY_BYTES} bytes"])
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise too_big
    body = bytearray()
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            while chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(body)):
                body += chunk
                if len(body) > MAX_BODY_BYTES:
                    raise too_big
    except TimeoutError:
        raise _Refused(408, "request body too slow", [f"body: not received within {BODY_TIMEOUT_S:g}s"]) from None
    return bytes(body)


def _tenant_change(raw: bytes) -> tuple[str, dict[str, Any]]:
    """``by`` and the rest of a PATCH body, its shape checked (every problem at once); the values
    themselves are the store's to validate."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:  # not UTF-8, not JSON, a number too long, nested too deep
        raise _Refused(400, "invalid request body", [f"body: not JSON ({str(exc)[:200]})"]) from None
    if not isinstance(body, dict):
        raise _Refused(400, "invalid request body", [f"body: must be a JSON object, not {type(body).__name__}"])
    known = ", ".join(TENANT_CHANGE_KEYS)
    problems = [f"{key}: unknown key (known: {known})" for key in body if key not in TENANT_CHANGE_KEYS]
    if "by" not in body:
        problems.append("by: required (who makes the change, kept in the tenant's history)")
    elif not isinstance(body["by"], str):
        problems.append("by: must be a string")
    if "plan" in body and body["plan"] is not None and not isinstance(body["plan"], str):
        problems.append("plan: must be a plan's name or null (no plan)")
    if "overrides" in body and body["overrides"] is not None and not isinstance(body["overrides"], dict):
        problems.append("overrides: must be a JSON object of tenant keys")
    unset = body.get("unset")
    if unset is not None and (not isinstance(unset, list) or not all(isinstance(key, str) for key in unset)):
        problems.append("unset: must be a list of key names")
    if not problems and not (body.get("overrides") or body.get("unset") or "plan" in body):
        problems.append("body: nothing to change (give plan, overrides or unset)")
    if problems:
        raise _Refused(400, "invalid request body", problems)
    by = body.pop("by")
    return by, body


async def admin_tenants(request: web.Request) -> web.Response:
    after = request.query.get("after", "")
    return _json(await request.app[BACKEND].list_tenants(after=after, limit=_limit(request)))


async def admin_tenant(request: web.Request) -> web.Response:
    return _json(await request.app[BACKEND].get_tenant(request.match_info["tenant_id"]))


async def admin_tenant_patch(request: web.Request) -> web.Response:
    tenant_id = validate_tenant_id(request.match_info["tenant_id"])  # before reading any body
    by, change = _tenant_change(await _read_body(request))
    return _json(await request.app[BACKEND].set_tenant(tenant_id, by=by, change=change))


async def admin_tenant_delete(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    view = await request.app[BACKEND].remove_tenant(tenant_id, by=request.query.get("by", ""))
    if view is None:
        raise _Refused(404, f"tenant {tenant_id} has no stored entry", [])
    return _json(view)


async def admin_tenant_history(request: web.Request) -> web.Response:
    return _json(await request.app[BACKEND].tenant_history(request.match_info["tenant_id"], limit=_limit(request)))


def create_app(backend: HealthBackend) -> web.Application:
    app = web.Application(middlewares=[admin_guard, tenant_errors])
    app[BACKEND] = backend
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/status", status)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_get("/admin/tenants", admin_tenants)
    app.router.add_get("/admin/tenants/{tenant_id}", admin_tenant)
    app.router.add_patch("/admin/tenants/{tenant_id}", admin_tenant_patch)
    app.router.add_delete("/admin/tenants/{tenant_id}", admin_tenant_delete)
    app.router.add_get("/admin/tenants/{tenant_id}/history", admin_tenant_history)
    return app
