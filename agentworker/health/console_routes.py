"""The operator console's endpoints on the supervisor's port: its data (``GET /status/...``), its actions
(``POST /admin/jobs/{id}/cancel|retry``, ``POST /admin/tenants/{t}/runs/{run}/decision``) and its files
(``GET /ui``, ``GET /ui/static/{name}``). The table of all endpoints, and who may call them, is
:mod:`agentworker.health.app`'s; the page itself is ``agentworker/health/console/``."""

from __future__ import annotations

from importlib import resources
from typing import Any

from aiohttp import web

from agentworker.health.common import BACKEND, MAX_LIST_LIMIT, Refused, json_body, no_store_json, read_body
from agentworker.job_control import parse_job_id
from agentworker.routing import validate_tenant_id
from agentworker.tenants import MAX_BY_CHARS, valid_by

#: the largest ``limit`` of the /status/... lists, and the longest ``by`` of a job action
#: who an action is recorded as when its body names no one
DEFAULT_BY = "admin-http"
#: the console's files (agentworker/health/console/): the only names /ui/static/ serves
CONSOLE_FILES = {"console.js": "text/javascript", "console.css": "text/css"}
#: headers of every console file: nothing but the package's own files may load or run, no framing
CONSOLE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                               "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# -- the console's data (/status/...) and actions (/admin/jobs, decisions) ------------------------------------


def _query_int(request: web.Request, name: str, default: int, most: int = MAX_LIST_LIMIT) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if not 1 <= value <= most:
        raise Refused(400, "invalid query", [f"{name}: must be an integer from 1 to {most} (got {raw[:50]!r})"])
    return value


def _query_text(request: web.Request, name: str, most: int = 100) -> str | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if len(raw) > most:
        raise Refused(400, "invalid query", [f"{name}: longer than {most} characters"])
    return raw


def _job_id(request: web.Request) -> str:
    """The path's job id, checked as the submitter makes them (tenant id, task name, key; InvalidJob is
    answered 400) before anything is read."""
    job_id = request.match_info["job_id"]
    parse_job_id(job_id)
    return job_id


def _action_by(body: Any) -> str:
    """``by`` of a job action's optional body ``{"by": WHO}`` (default :data:`DEFAULT_BY`)."""
    if not isinstance(body, dict) or set(body) - {"by"}:
        raise Refused(400, "invalid request body", ['body: must be empty or the JSON object {"by": WHO}'])
    by = body.get("by", DEFAULT_BY)
    if not valid_by(by):
        raise Refused(400, "invalid request body", [f"by: 1 to {MAX_BY_CHARS} printable ASCII characters"])
    return by


async def status_job(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    view = await request.app[BACKEND].job(job_id)
    if view.get("status") == "not_found":
        raise Refused(404, f"job {job_id} is not known: never enqueued, or its result has expired", [])
    return no_store_json(view)


async def status_dead_letters(request: web.Request) -> web.Response:
    pool = _query_text(request, "pool")
    return no_store_json(await request.app[BACKEND].dead_letters(pool, limit=_query_int(request, "limit", 50)))


async def status_tenant_runs(request: web.Request) -> web.Response:
    tenant_id = validate_tenant_id(request.match_info["tenant_id"])
    return no_store_json(await request.app[BACKEND].tenant_runs(tenant_id, status=_query_text(request, "status", 40),
                                                        limit=_query_int(request, "limit", 50)))


async def status_tenant_run(request: web.Request) -> web.Response:
    tenant_id = validate_tenant_id(request.match_info["tenant_id"])
    return no_store_json(await request.app[BACKEND].tenant_run(tenant_id, request.match_info["run_id"]))


async def status_tenant_schedules(request: web.Request) -> web.Response:
    tenant_id = validate_tenant_id(request.match_info["tenant_id"])
    return no_store_json(await request.app[BACKEND].tenant_schedules(tenant_id))


async def status_tenant_failures(request: web.Request) -> web.Response:
    tenant_id = validate_tenant_id(request.match_info["tenant_id"])
    return no_store_json(await request.app[BACKEND].tenant_failures(tenant_id, limit=_query_int(request, "limit", 20)))


async def admin_job_cancel(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    by = _action_by(json_body(await read_body(request), optional=True))
    return no_store_json(await request.app[BACKEND].cancel_job(job_id, by=by))


async def admin_job_retry(request: web.Request) -> web.Response:
    job_id = _job_id(request)
    by = _action_by(json_body(await read_body(request), optional=True))
    return no_store_json(await request.app[BACKEND].retry_job(job_id, by=by))


async def admin_run_decision(request: web.Request) -> web.Response:
    tenant_id = validate_tenant_id(request.match_info["tenant_id"])  # before reading any body
    body = json_body(await read_body(request))
    answer = await request.app[BACKEND].decide(tenant_id, request.match_info["run_id"], body)
    return web.json_response(answer, status=202, headers={"Cache-Control": "no-store"})


# -- the console's files ----------------------------------------------------------------------------------------


def _console_file(name: str) -> bytes:
    return resources.files("agentworker.health").joinpath("console", name).read_bytes()


async def console_page(request: web.Request) -> web.Response:
    return web.Response(body=_console_file("index.html"), content_type="text/html", charset="utf-8",
                        headers=CONSOLE_HEADERS)


async def console_static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    media = CONSOLE_FILES.get(name)  # a fixed list: no path is ever built from the request
    if media is None:
        raise web.HTTPNotFound(text=f"no console file {name[:100]!r}\n")
    return web.Response(body=_console_file(name), content_type=media, charset="utf-8", headers=CONSOLE_HEADERS)


def add_console_routes(app: web.Application) -> None:
    app.router.add_get("/status/jobs/{job_id}", status_job)
    app.router.add_get("/status/dead-letters", status_dead_letters)
    app.router.add_get("/status/tenants/{tenant_id}/runs", status_tenant_runs)
    app.router.add_get("/status/tenants/{tenant_id}/runs/{run_id}", status_tenant_run)
    app.router.add_get("/status/tenants/{tenant_id}/schedules", status_tenant_schedules)
    app.router.add_get("/status/tenants/{tenant_id}/failures", status_tenant_failures)
    app.router.add_post("/admin/jobs/{job_id}/cancel", admin_job_cancel)
    app.router.add_post("/admin/jobs/{job_id}/retry", admin_job_retry)
    app.router.add_post("/admin/tenants/{tenant_id}/runs/{run_id}/decision", admin_run_decision)
    app.router.add_get("/ui", console_page)
    app.router.add_get("/ui/static/{name}", console_static)
