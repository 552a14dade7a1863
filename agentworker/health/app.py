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
GET /openapi.json                the port's OpenAPI 3.1 description (:mod:`~agentworker.health.openapi`).
GET /status                      JSON: pools, processes, queue depths, per-tenant in-flight and
                                 pending, dead letters per pool.
GET /status/jobs/{id}            a job (``agentworker.job_control.JobView``: status, tries, timings,
                                 result or error) and ``events``: its events among the newest 500 of
                                 its tenant's stream. 404 for a job Redis does not know (any more).
GET /status/dead-letters         ``{pool: {letters, total, more}}``; ``?pool=NAME``, ``?limit=N``
                                 (1-200, default 50) per pool.
GET /status/tenants/{id}/runs    the tenant's workflow runs, newest first, without steps;
                                 ``?status=`` (a run status), ``?limit=N`` (1-200, default 50).
GET /status/tenants/{id}/runs/{run}
                                 one run with its step trail, ``approvals`` and ``waiting`` (the
                                 undecided approval steps); 404 if the tenant has no such run.
GET /status/tenants/{id}/schedules
                                 ``{schedules, more}``: each with its last run, ``failures`` in a
                                 row and ``last_error`` (at most 500; ``more``: there are others).
GET /status/tenants/{id}/failures
                                 the tenant's newest ``job_failed``/``job_rejected`` events (of the
                                 newest 500 of its stream); ``?limit=N`` (1-200, default 20).
GET /ui                          the operator console: one HTML page, its script and style under
                                 ``/ui/static/`` (served from the package; no build step, no CDN).
                                 The shell holds no data and is served without a token; everything
                                 it shows comes from the endpoints above, with the token typed in.
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
POST /admin/jobs/{id}/cancel     cancel a job (a queued one is removed, a running one is stopped
                                 and its run ends ``cancelled``); optional body ``{"by": WHO}``.
                                 200 with the job's view; 404 unknown job; 409 already finished.
POST /admin/jobs/{id}/retry      run a failed or cancelled job again under its id; same answers,
                                 409 for any other, 429 over its tenant's quota.
POST /admin/tenants/{id}/runs/{run}/decision
                                 approve or reject the step a run waits for: body ``{"decision":
                                 "approve"|"reject", "by": WHO, "comment"?, "step_id"?}``; 202
                                 ``{job_id, created, step_id}`` once ``resume_run`` is enqueued;
                                 404 no such run; 409 not waiting (for that step); 429 over quota.
===============================  ==============================================================

**Tokens.** With ``AGENTWORKER_STATUS_TOKEN`` set, ``/status`` and every ``/status/...`` endpoint need
``Authorization: Bearer`` with it or with the admin token (401 otherwise); unset, they are open like the
probes. ``/health``, ``/ready`` and ``/metrics`` are always open (kubelet and Prometheus), and so is the
console's shell (``/ui``, ``/ui/static/...``), which holds no data. ``/admin/*`` needs the admin token.
The console is served with a strict Content-Security-Policy (``default-src 'self'``, no inline script or
style), ``X-Content-Type-Options: nosniff`` and ``frame-ancestors 'none'``; its script writes every value
with ``textContent``, since tenants control many of the strings it shows.

The tenant, job and ``/status/...`` endpoints answer 400 ``{"error": ..., "errors": [...]}`` for a refused change (one
``path: message`` per problem, nothing changed), a bad tenant id, a bad query value or a body that
is not a JSON object of the keys above; 413 for a body over :data:`MAX_BODY_BYTES`; 503 (same shape)
while PostgreSQL cannot be used; 408 for a body still not received after :data:`BODY_TIMEOUT_S` (the
server's deadline covers heads only).

The probes, ``/status``, the guards, the error answers and the tenant endpoints are here; the console's
endpoints are :mod:`~agentworker.health.console_routes`, and what both share (the backend protocol, bodies,
refusals) :mod:`~agentworker.health.common`. The app knows the supervisor only through
:class:`HealthBackend`, so it can be tested on its own.
:mod:`~agentworker.health.server` serves it (a deadline on request heads, one-line logs for malformed
requests).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST
from redis.exceptions import RedisError

from agentworker import jobs
from agentworker.config import ConfigError
from agentworker.db.database import DatabaseError
from agentworker.db.runs import InvalidRunId
from agentworker.health.checks import FAIL, HEALTH_JSON, Check, health_document
from agentworker.health.common import (
    BACKEND,
    BODY_TIMEOUT_S,
    MAX_BODY_BYTES,
    ConsoleRefusal,
    HealthBackend,
    Refused,
    authorized,
    json_body,
    no_store_json,
    read_body,
    refusal,
)
from agentworker.health.console_routes import add_console_routes
from agentworker.health.openapi import openapi_document
from agentworker.job_control import JobNotCancellable, JobNotFound, JobNotRetryable
from agentworker.routing import InvalidTenantId, validate_tenant_id
from agentworker.submit import QuotaExceeded

__all__ = ["BACKEND", "BODY_TIMEOUT_S", "MAX_BODY_BYTES", "HealthBackend", "create_app"]

#: the keys of a PATCH /admin/tenants/{id} body
TENANT_CHANGE_KEYS = ("by", "overrides", "plan", "unset")


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


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_document(), headers={"Cache-Control": "no-store"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(request.app[BACKEND].status())


@web.middleware
async def admin_guard(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path.startswith("/admin/") or request.path == "/admin":
        token = request.app[BACKEND].admin_token
        if not token:
            raise web.HTTPNotFound()
        if not authorized(request, token):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="agentworker"'},
                                       text="a valid bearer token is required\n")
    response: web.StreamResponse = await handler(request)
    return response


def _reads_status(path: str) -> bool:
    return path == "/status" or path.startswith("/status/")


@web.middleware
async def status_guard(request: web.Request, handler: Any) -> web.StreamResponse:
    """``/status`` and ``/status/...`` need the status token or the admin token while a status token is
    set (the admin may read what it may change); without one they are open, as before the setting."""
    if _reads_status(request.path):
        backend = request.app[BACKEND]
        token = backend.status_token
        if token and not (authorized(request, token)
                          or (backend.admin_token and authorized(request, backend.admin_token))):
            raise web.HTTPUnauthorized(headers={"WWW-Authenticate": 'Bearer realm="agentworker"'},
                                       text="a valid bearer token (AGENTWORKER_STATUS_TOKEN or the admin token) "
                                            "is required\n")
    response: web.StreamResponse = await handler(request)
    return response


async def admin_reload(request: web.Request) -> web.Response:
    code, body = await request.app[BACKEND].reload("POST /admin/reload")
    return web.json_response(body, status=code)


# -- /admin/tenants -------------------------------------------------------------------------------------


@web.middleware
async def tenant_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """The failures of the tenant store, the console's reads and the job actions as JSON answers
    ``{"error": sentence, "errors": [...]}`` (the guards have let the request in)."""
    if not request.path.startswith(("/admin/tenants", "/admin/jobs/", "/status/")):
        response: web.StreamResponse = await handler(request)
        return response
    try:
        response = await handler(request)
    except Refused as exc:
        return refusal(exc.status, exc.error, exc.errors)
    except InvalidTenantId as exc:
        return refusal(400, "invalid tenant id", [str(exc)])
    except (InvalidRunId, jobs.InvalidJob) as exc:
        return refusal(400, str(exc), [str(exc)])
    except ConfigError as exc:  # InvalidTenantChange: one path: message per problem, nothing changed
        return refusal(400, f"{exc.source}: {len(exc.errors)} error(s)", exc.errors)
    except JobNotFound as exc:
        return refusal(404, str(exc), [])
    except (JobNotCancellable, JobNotRetryable) as exc:
        return refusal(409, str(exc), [])
    except QuotaExceeded as exc:
        return refusal(429, str(exc), [f"{exc.limit}: {exc}"])
    except DatabaseError as exc:
        store = request.path.startswith("/admin/tenants") and "/runs/" not in request.path
        what = "the tenant store is" if store else "workflow runs and schedules are"
        return refusal(503, f"{what} unavailable: PostgreSQL cannot be used", [str(exc)])
    except RedisError as exc:
        return refusal(503, "Redis cannot be used", [str(exc)[:500]])
    except ConsoleRefusal as exc:
        return refusal(exc.status, str(exc), [])
    return response


def _limit(request: web.Request) -> int:
    raw = request.query.get("limit", "100")
    try:
        return int(raw)
    except ValueError:
        raise Refused(400, "invalid query", [f"limit: must be an integer from 1 to 5000 (got {raw!r})"]) from None


def _tenant_change(raw: bytes) -> tuple[str, dict[str, Any]]:
    """``by`` and the rest of a PATCH body, its shape checked (every problem at once); the values
    themselves are the store's to validate."""
    body = json_body(raw)
    if not isinstance(body, dict):
        raise Refused(400, "invalid request body", [f"body: must be a JSON object, not {type(body).__name__}"])
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
        raise Refused(400, "invalid request body", problems)
    by = body.pop("by")
    return by, body


async def admin_tenants(request: web.Request) -> web.Response:
    after = request.query.get("after", "")
    return no_store_json(await request.app[BACKEND].list_tenants(after=after, limit=_limit(request)))


async def admin_tenant(request: web.Request) -> web.Response:
    return no_store_json(await request.app[BACKEND].get_tenant(request.match_info["tenant_id"]))


async def admin_tenant_patch(request: web.Request) -> web.Response:
    tenant_id = validate_tenant_id(request.match_info["tenant_id"])  # before reading any body
    by, change = _tenant_change(await read_body(request))
    return no_store_json(await request.app[BACKEND].set_tenant(tenant_id, by=by, change=change))


async def admin_tenant_delete(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    view = await request.app[BACKEND].remove_tenant(tenant_id, by=request.query.get("by", ""))
    if view is None:
        raise Refused(404, f"tenant {tenant_id} has no stored entry", [])
    return no_store_json(view)


async def admin_tenant_history(request: web.Request) -> web.Response:
    tenant_id = request.match_info["tenant_id"]
    return no_store_json(await request.app[BACKEND].tenant_history(tenant_id, limit=_limit(request)))


def create_app(backend: HealthBackend) -> web.Application:
    app = web.Application(middlewares=[admin_guard, status_guard, tenant_errors])
    app[BACKEND] = backend
    app.router.add_get("/health", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", openapi)
    app.router.add_get("/status", status)
    app.router.add_post("/admin/reload", admin_reload)
    app.router.add_get("/admin/tenants", admin_tenants)
    app.router.add_get("/admin/tenants/{tenant_id}", admin_tenant)
    app.router.add_patch("/admin/tenants/{tenant_id}", admin_tenant_patch)
    app.router.add_delete("/admin/tenants/{tenant_id}", admin_tenant_delete)
    app.router.add_get("/admin/tenants/{tenant_id}/history", admin_tenant_history)
    add_console_routes(app)
    return app
