"""The OpenAPI 3.1 description of the supervisor's HTTP port, served at ``GET /openapi.json``.

Written by hand as data, not generated from the handlers: the document is a contract the backend and the
SREs' tooling read, so it changes only when someone means it to. ``tests/test_openapi.py`` validates it
with ``openapi-spec-validator`` and checks that its paths and methods are exactly the routes
:func:`agentworker.health.app.create_app` serves, so a route added without its description (or a
description left behind) fails the tests.

Security: ``/status``, the console's data (``/status/...``) and ``/ui``'s data need the status token (or
the admin token) when ``AGENTWORKER_STATUS_TOKEN`` is set, and are open when it is not; ``/admin/...``
needs the admin token and answers 404 while none is configured. ``/health``, ``/ready``, ``/metrics``,
``/openapi.json`` and the console's static shell are always open.
"""

from __future__ import annotations

from typing import Any

from agentworker import __version__
from agentworker.config import NAME_PATTERN
from agentworker.job_control import MAX_JOB_ID_CHARS

_JSON = "application/json"

# -- building blocks ---------------------------------------------------------------------------------------


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json_response(description: str, schema: dict[str, Any], media: str = _JSON) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json_response(description, _ref("Error"))


def _text(description: str, media: str = "text/plain") -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


_UNAUTHORIZED = _text("No valid bearer token was given (`WWW-Authenticate: Bearer`).")
_NO_ADMIN = {"description": "No admin token is configured: every /admin/ path answers 404."}
_STATUS_SECURITY: list[dict[str, list[str]]] = [{"statusToken": []}, {"adminToken": []}, {}]
_ADMIN_SECURITY: list[dict[str, list[str]]] = [{"adminToken": []}]


def _path_param(name: str, description: str, pattern: str | None = None, max_length: int = 256) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string", "maxLength": max_length}
    if pattern:
        schema["pattern"] = pattern
    return {"name": name, "in": "path", "required": True, "description": description, "schema": schema}


def _query(name: str, description: str, schema: dict[str, Any], required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


_TENANT = _path_param("tenant_id", "The tenant's id (1-63 lowercase letters, digits, `_` and `-`, starting with "
                      "a letter or digit).", NAME_PATTERN, 63)
_JOB = _path_param("job_id", "The job's id, `{tenant_id}:{task}:{idempotency_key}`.", max_length=MAX_JOB_ID_CHARS)
_RUN = _path_param("run_id", "The workflow run's id (a UUID).", max_length=64)
_LIMIT = _query("limit", "How many entries at most (1-5000).", {"type": "integer", "minimum": 1, "maximum": 5000,
                                                                "default": 100})


def _operation(summary: str, responses: dict[str, Any], *, op_id: str, tags: list[str],
               security: list[dict[str, list[str]]] | None = None, parameters: list[dict[str, Any]] | None = None,
               body: dict[str, Any] | None = None, description: str | None = None) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": summary, "operationId": op_id, "tags": tags, "responses": responses}
    if description:
        operation["description"] = description
    operation["security"] = security if security is not None else []
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = body
    return operation


def _status_read(summary: str, op_id: str, schema: dict[str, Any], parameters: list[dict[str, Any]],
                 not_found: str | None = None, description: str | None = None) -> dict[str, Any]:
    responses: dict[str, Any] = {"200": _json_response("The document.", schema),
                                 "400": _error("A bad id or query value."), "401": _UNAUTHORIZED,
                                 "503": _error("Redis or PostgreSQL cannot be used.")}
    if not_found:
        responses["404"] = _error(not_found)
    return _operation(summary, responses, op_id=op_id, tags=["console"], security=_STATUS_SECURITY,
                      parameters=parameters, description=description)


def _admin_job_action(verb: str, op_id: str, refused: str) -> dict[str, Any]:
    return _operation(
        f"{verb} a job", {"200": _json_response("The job's view after the request.", _ref("JobView")),
                          "400": _error("A bad job id."), "401": _UNAUTHORIZED,
                          "404": _error("No such job (or no admin token is configured)."),
                          "409": _error(refused), "503": _error("Redis cannot be used.")},
        op_id=op_id, tags=["jobs"], security=_ADMIN_SECURITY, parameters=[_JOB])


# -- schemas -----------------------------------------------------------------------------------------------

_ANY_OBJECT: dict[str, Any] = {"type": "object", "additionalProperties": True}
_TIMESTAMP = {"type": ["number", "null"], "description": "Unix time in seconds."}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object", "required": ["error"],
        "properties": {"error": {"type": "string", "description": "One sentence."},
                       "errors": {"type": "array", "items": {"type": "string"},
                                  "description": "One `path: message` per problem."}},
    },
    "HealthCheck": {
        "type": "object", "required": ["status", "time"],
        "properties": {"status": {"enum": ["pass", "warn", "fail"]}, "time": {"type": "string", "format": "date-time"},
                       "output": {"type": "string"}, "observedValue": {}, "observedUnit": {"type": "string"}},
    },
    "HealthDocument": {
        "type": "object", "required": ["status", "checks"],
        "description": "draft-inadarei-api-health-check: `fail` answers 503, `pass` and `warn` 200.",
        "properties": {
            "status": {"enum": ["pass", "warn", "fail"]},
            "version": {"type": "string", "description": "The public version of the HTTP contract."},
            "releaseId": {"type": "string", "description": "The package's version."},
            "serviceId": {"type": "string", "description": "`agentworker-<service>/<host name>`."},
            "description": {"type": "string"},
            "checks": {"type": "object", "additionalProperties": {"type": "array", "items": _ref("HealthCheck")},
                       "description": "By `component:measurement`, e.g. `redis:ping`, `pool:standard`."},
        },
    },
    "Process": {
        "type": "object", "required": ["pool", "slot", "role", "state"],
        "properties": {
            "pool": {"type": "string"}, "slot": {"type": "integer"},
            "role": {"enum": ["current", "incoming", "retiring"]},
            "pid": {"type": ["integer", "null"]}, "state": {"type": "string"},
            "uptime_s": {"type": "number"}, "rss_bytes": {"type": ["integer", "null"]},
            "jobs_served": {"type": "integer"}, "running": {"type": "integer"},
            "restarts": {"type": "integer"}, "backoff_s": {"type": "number"},
            "last_exit": {"type": ["object", "null"]},
        },
        "additionalProperties": True,
    },
    "Status": {
        "type": "object", "required": ["supervisor", "pools", "processes", "queues", "tenants"],
        "properties": {
            "supervisor": _ANY_OBJECT,
            "pools": {"type": "object", "additionalProperties": _ANY_OBJECT},
            "processes": {"type": "array", "items": _ref("Process")},
            "queues": {"type": "object", "description": "Pool → shard → `ready`, `total`, `runnable`.",
                       "additionalProperties": {"type": "object", "additionalProperties": _ANY_OBJECT}},
            "tenants": {"type": "object", "description": "Tenant → `in_flight`, `pending`.",
                        "additionalProperties": _ANY_OBJECT},
            "dead_letters": {"type": "object", "additionalProperties": {"type": "integer"}},
            "observed_at": {"type": ["number", "null"]},
            "restarts": {"type": "object", "additionalProperties": {"type": "integer"}},
        },
        "additionalProperties": True,
    },
    "ReloadResult": {
        "type": "object", "required": ["ok", "trigger"],
        "properties": {"ok": {"type": "boolean"}, "trigger": {"type": "string"},
                       "errors": {"type": "array", "items": {"type": "string"}}, "changes": _ANY_OBJECT},
    },
    "TenantView": {
        "type": "object", "required": ["tenant_id", "stored", "pool", "shard", "queue", "limits"],
        "properties": {
            "tenant_id": {"type": "string"}, "stored": {"type": "boolean"}, "plan": {"type": ["string", "null"]},
            "overrides": _ANY_OBJECT, "version": {"type": "integer"},
            "updated_at": {"type": ["string", "null"], "format": "date-time"},
            "updated_by": {"type": ["string", "null"]}, "pool": {"type": "string"}, "shard": {"type": "integer"},
            "queue": {"type": "string"}, "limits": _ANY_OBJECT,
            "sources": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    },
    "TenantChange": {
        "type": "object", "required": ["id", "tenant_id", "changed_at", "changed_by", "version"],
        "properties": {"id": {"type": "integer"}, "tenant_id": {"type": "string"},
                       "changed_at": {"type": "string", "format": "date-time"}, "changed_by": {"type": "string"},
                       "version": {"type": "integer"}, "old": {"type": ["object", "null"]},
                       "new": {"type": ["object", "null"]}},
    },
    "TenantChangeRequest": {
        "type": "object", "required": ["by"], "additionalProperties": False,
        "properties": {"by": {"type": "string", "description": "Who makes the change (kept in the history)."},
                       "plan": {"type": ["string", "null"]}, "overrides": _ANY_OBJECT,
                       "unset": {"type": "array", "items": {"type": "string"}}},
    },
    "JobView": {
        "type": "object", "required": ["job_id", "status"],
        "properties": {
            "job_id": {"type": "string"}, "tenant_id": {"type": "string"}, "task": {"type": "string"},
            "queue": {"type": "string"},
            "status": {"enum": ["queued", "deferred", "running", "completed", "failed", "cancelled", "not_found"]},
            "tries": {"type": "integer"}, "enqueued_at": _TIMESTAMP, "started_at": _TIMESTAMP,
            "finished_at": _TIMESTAMP, "result": {}, "error": {"type": ["object", "null"]},
            "cancel_requested": {"type": "boolean"},
            "events": {"type": "array", "items": _ref("Event")},
        },
        "additionalProperties": True,
    },
    "Event": {
        "type": "object", "required": ["event", "tenant_id"],
        "properties": {"id": {"type": "string"}, "stream_id": {"type": "string"}, "event": {"type": "string"},
                       "tenant_id": {"type": "string"}, "ts": {"type": "string"}, "data": _ANY_OBJECT},
        "additionalProperties": True,
    },
    "Run": {
        "type": "object", "required": ["run_id", "status"],
        "properties": {"run_id": {"type": "string"}, "workflow_id": {"type": "string"},
                       "status": {"type": "string"}, "steps": {"type": "array", "items": _ANY_OBJECT},
                       "approvals": {"type": "array", "items": _ANY_OBJECT}},
        "additionalProperties": True,
    },
    "Decision": {
        "type": "object", "required": ["decision", "by"],
        "properties": {"decision": {"enum": ["approve", "reject"]}, "by": {"type": "string"},
                       "comment": {"type": ["string", "null"]}, "step_id": {"type": ["string", "null"]}},
    },
    "Accepted": {
        "type": "object", "required": ["job_id"],
        "properties": {"job_id": {"type": "string"}, "created": {"type": "boolean"}},
        "additionalProperties": True,
    },
}


# -- paths -------------------------------------------------------------------------------------------------


def _paths() -> dict[str, Any]:
    health = {"200": _json_response("`pass` or `warn`.", _ref("HealthDocument"), "application/health+json"),
              "503": _json_response("`fail`.", _ref("HealthDocument"), "application/health+json")}
    tenant_errors = {"400": _error("A bad tenant id, query value or body; nothing changed."),
                     "401": _UNAUTHORIZED, "404": _NO_ADMIN, "503": _error("PostgreSQL cannot be used.")}
    return {
        "/health": {"get": _operation(
            "Liveness", health, op_id="health", tags=["probes"],
            description="The reconcile loop turned recently. Redis or PostgreSQL being down does not fail it.")},
        "/ready": {"get": _operation(
            "Readiness", health, op_id="ready", tags=["probes"],
            description="Redis and PostgreSQL reachable, every pool serving, the supervisor not draining.")},
        "/metrics": {"get": _operation(
            "Prometheus metrics", {"200": _text("The supervisor's and every worker's metrics, merged.",
                                                "text/plain; version=0.0.4"),
                                   "503": _text("This scrape could not be made; the next one will.")},
            op_id="metrics", tags=["probes"])},
        "/openapi.json": {"get": _operation(
            "This document", {"200": _json_response("OpenAPI 3.1.", {"type": "object"})},
            op_id="openapi", tags=["probes"])},
        "/status": {"get": _operation(
            "The supervisor's status", {"200": _json_response("Pools, processes, queues, tenants.", _ref("Status")),
                                        "401": _UNAUTHORIZED},
            op_id="status", tags=["console"], security=_STATUS_SECURITY)},
        "/admin/reload": {"post": _operation(
            "Re-read the quota file",
            {"200": _json_response("Applied, with what changed.", _ref("ReloadResult")),
             "401": _UNAUTHORIZED, "404": _NO_ADMIN,
             "422": _json_response("The file was refused; the running config stays.", _ref("ReloadResult")),
             "503": _json_response("The reconcile loop did not answer.", _ref("ReloadResult"))},
            op_id="reload", tags=["admin"], security=_ADMIN_SECURITY)},
        "/admin/tenants": {"get": _operation(
            "The tenant store's entries, by id",
            {"200": _json_response("Views.", {"type": "array", "items": _ref("TenantView")}), **tenant_errors},
            op_id="listTenants", tags=["tenants"], security=_ADMIN_SECURITY,
            parameters=[_query("after", "Page after this id.", {"type": "string", "maxLength": 64}), _LIMIT])},
        "/admin/tenants/{tenant_id}": {
            "get": _operation("One tenant's view", {"200": _json_response("The view.", _ref("TenantView")),
                                                    **tenant_errors},
                              op_id="getTenant", tags=["tenants"], security=_ADMIN_SECURITY, parameters=[_TENANT]),
            "patch": _operation(
                "Change a tenant's entry", {"200": _json_response("The new view.", _ref("TenantView")),
                                            "408": _error("The body did not arrive in time."),
                                            "413": _error("The body is over 64 KiB."), **tenant_errors},
                op_id="setTenant", tags=["tenants"], security=_ADMIN_SECURITY, parameters=[_TENANT],
                body={"required": True, "content": {_JSON: {"schema": _ref("TenantChangeRequest")}}}),
            "delete": _operation(
                "Remove a tenant's entry", {"200": _json_response("The view now.", _ref("TenantView")),
                                            **tenant_errors},
                op_id="removeTenant", tags=["tenants"], security=_ADMIN_SECURITY,
                parameters=[_TENANT, _query("by", "Who removes it.", {"type": "string"}, required=True)]),
        },
        "/admin/tenants/{tenant_id}/history": {"get": _operation(
            "A tenant entry's audit trail, newest first",
            {"200": _json_response("Changes.", {"type": "array", "items": _ref("TenantChange")}), **tenant_errors},
            op_id="tenantHistory", tags=["tenants"], security=_ADMIN_SECURITY, parameters=[_TENANT, _LIMIT])},
        **_console_paths(),
    }


def _list_limit(default: int) -> dict[str, Any]:
    return _query("limit", "How many entries at most (1-200).",
                  {"type": "integer", "minimum": 1, "maximum": 200, "default": default})


def _console_paths() -> dict[str, Any]:
    """The console's data (status token) and actions (admin token), and its files (open: no data)."""
    events = {"type": "array", "items": _ref("Event")}
    letters = {"type": "object", "required": ["letters", "total", "more"],
               "properties": {"letters": {"type": "array", "items": _ANY_OBJECT}, "total": {"type": "integer"},
                              "more": {"type": "integer"}}}
    by_body = {"required": False, "content": {_JSON: {"schema": {
        "type": "object", "additionalProperties": False,
        "properties": {"by": {"type": "string", "maxLength": 200, "description": "Who asks (default admin-http)."}}}}}}
    cancel = _admin_job_action("Cancel", "cancelJob", "The job has finished (a result is kept).")
    retry = _admin_job_action("Retry", "retryJob", "The job is not failed or cancelled.")
    for operation in (cancel, retry):
        operation["requestBody"] = by_body
        operation["responses"]["413"] = _error("The body is over 64 KiB.")
    retry["responses"]["429"] = _error("The tenant is over max_pending or rate_limit; nothing was enqueued.")
    return {
        "/status/jobs/{job_id}": {"get": _status_read(
            "A job with its events", "getJob", _ref("JobView"), [_JOB],
            not_found="Nothing is known of the job (never enqueued, or its result has expired).",
            description="`events`: the job's among the newest 500 of its tenant's stream, oldest first.")},
        "/status/dead-letters": {"get": _status_read(
            "Dead letters per pool", "listDeadLetters", {"type": "object", "additionalProperties": letters},
            [_query("pool", "One pool of the quota file (default: every pool).", {"type": "string", "maxLength": 100}),
             _list_limit(50)])},
        "/status/tenants/{tenant_id}/runs": {"get": _status_read(
            "A tenant's workflow runs, newest first (without steps)", "listRuns",
            {"type": "array", "items": _ref("Run")},
            [_TENANT, _query("status", "Only runs in this status.", {
                "enum": ["running", "waiting_approval", "completed", "failed", "rejected", "cancelled"]}),
             _list_limit(50)])},
        "/status/tenants/{tenant_id}/runs/{run_id}": {"get": _status_read(
            "One run with its step trail and approvals", "getRun", _ref("Run"), [_TENANT, _RUN],
            not_found="The tenant has no such run.",
            description="`steps`: every attempt of every step in order; `approvals`: all of the run's; "
                        "`waiting`: the step ids still undecided.")},
        "/status/tenants/{tenant_id}/schedules": {"get": _status_read(
            "A tenant's schedules with their last run and error", "listSchedules",
            {"type": "object", "required": ["schedules", "more"],
             "properties": {"schedules": {"type": "array", "items": _ANY_OBJECT},
                            "more": {"type": "boolean", "description": "More than the 500 shown exist."}}},
            [_TENANT])},
        "/status/tenants/{tenant_id}/failures": {"get": _status_read(
            "A tenant's recent job failures, newest first", "tenantFailures", events, [_TENANT, _list_limit(20)],
            description="`job_failed` and `job_rejected` events among the newest 500 of the tenant's stream.")},
        "/admin/jobs/{job_id}/cancel": {"post": cancel},
        "/admin/jobs/{job_id}/retry": {"post": retry},
        "/admin/tenants/{tenant_id}/runs/{run_id}/decision": {"post": _operation(
            "Approve or reject the step a run waits for",
            {"202": _json_response("`resume_run` is enqueued (`created: false`: it already was).", _ref("Accepted")),
             "400": _error("A bad id or body."), "401": _UNAUTHORIZED,
             "404": _error("The tenant has no such run (or no admin token is configured)."),
             "409": _error("The run waits for no such undecided approval step."),
             "413": _error("The body is over 64 KiB."),
             "429": _error("The tenant is over max_pending or rate_limit; nothing was enqueued."),
             "503": _error("Redis or PostgreSQL cannot be used.")},
            op_id="decideRun", tags=["console"], security=_ADMIN_SECURITY, parameters=[_TENANT, _RUN],
            body={"required": True, "content": {_JSON: {"schema": _ref("Decision")}}})},
        "/ui": {"get": _operation(
            "The operator console", {"200": _text("One HTML page; it loads only /ui/static/ files.", "text/html")},
            op_id="console", tags=["console"],
            description="Holds no data, so it is served without a token; what it shows comes from /status and "
                        "/status/... with the token typed into it.")},
        "/ui/static/{name}": {"get": _operation(
            "The console's script and style",
            {"200": {"description": "The file.", "content": {media: {"schema": {"type": "string"}}
                                                             for media in ("text/javascript", "text/css")}},
             "404": _text("Not one of the console's files.")},
            op_id="consoleFile", tags=["console"],
            parameters=[_path_param("name", "`console.js` or `console.css`.", "^console\\.(js|css)$", 32)])},
    }


def openapi_document() -> dict[str, Any]:
    """The document served at ``/openapi.json``."""
    return {
        "openapi": "3.1.0",
        "info": {"title": "agentworker supervisor", "version": __version__,
                 "description": "The supervisor's internal HTTP port: probes, metrics, status, the operator "
                                "console's data and the admin endpoints."},
        "tags": [{"name": name} for name in ("probes", "console", "jobs", "admin", "tenants")],
        "paths": _paths(),
        "components": {
            "schemas": _SCHEMAS,
            "securitySchemes": {
                "statusToken": {"type": "http", "scheme": "bearer",
                                "description": "AGENTWORKER_STATUS_TOKEN (needed only when it is set)."},
                "adminToken": {"type": "http", "scheme": "bearer", "description": "AGENTWORKER_ADMIN_TOKEN."},
            },
        },
    }
