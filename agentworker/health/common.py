"""What the supervisor's HTTP modules share: the backend they serve (:class:`HealthBackend`, the app's
:data:`BACKEND` key), bearer checks, bounded request bodies and the ``{"error": ..., "errors": [...]}``
refusals (:class:`Refused`, answered by :func:`agentworker.health.app.tenant_errors`)."""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import Any, Protocol

from aiohttp import web

from agentworker.errors import AgentWorkerError
from agentworker.health.checks import Check

#: the largest request body read (PATCH /admin/tenants/{id}, the console's actions); a bigger one is refused unread
MAX_BODY_BYTES = 64 * 1024
#: seconds a request body may take to arrive (the server's deadline covers request heads only)
BODY_TIMEOUT_S = 10.0
#: the largest ``limit`` of the console's lists (/status/...), checked by the routes and the backend
MAX_LIST_LIMIT = 200


class ConsoleRefusal(AgentWorkerError):
    """A console request the backend refuses, answered ``status`` with the message as its sentence:
    400 a bad argument, 404 no such run, 409 not in a state the action applies to."""

    status = 400


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
        """The stored tenants' views (``TenantView.asno_store_json()``) in id order, ``limit`` after ``after``."""
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
        """The entry's audit trail (``TenantChange.asno_store_json()``), newest first."""
        ...

    # The console's reads and actions. Tenant ids raise InvalidTenantId, run ids InvalidRunId, refusals
    # of the backend's own a ConsoleRefusal; job control raises JobNotFound, JobNotCancellable and
    # JobNotRetryable.

    status_token: str | None

    async def job(self, job_id: str) -> dict[str, Any]:
        """``JobView.asno_store_json()`` plus ``events`` (none for a job whose status is ``not_found``)."""
        ...

    async def cancel_job(self, job_id: str, *, by: str) -> dict[str, Any]: ...

    async def retry_job(self, job_id: str, *, by: str) -> dict[str, Any]: ...

    async def dead_letters(self, pool: str | None, *, limit: int) -> dict[str, Any]: ...

    async def tenant_runs(self, tenant_id: str, *, status: str | None, limit: int) -> list[dict[str, Any]]: ...

    async def tenant_run(self, tenant_id: str, run_id: str) -> dict[str, Any]: ...

    async def tenant_schedules(self, tenant_id: str) -> dict[str, Any]: ...

    async def tenant_failures(self, tenant_id: str, *, limit: int) -> list[dict[str, Any]]: ...

    async def decide(self, tenant_id: str, run_id: str, body: Any) -> dict[str, Any]:
        """Check ``body`` (a decision) and enqueue ``resume_run``: ``{job_id, created, step_id}``."""
        ...


BACKEND: web.AppKey[HealthBackend] = web.AppKey("backend", HealthBackend)


def authorized(request: web.Request, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


class Refused(Exception):
    """A tenant request answered with ``{"error": ..., "errors": [...]}`` and ``status``."""

    def __init__(self, status: int, error: str, errors: list[str]) -> None:
        super().__init__(error)
        self.status, self.error, self.errors = status, error, errors


def refusal(status: int, error: str, errors: list[str]) -> web.Response:
    return web.json_response({"error": error, "errors": errors}, status=status,
                             headers={"Cache-Control": "no-store"})


def no_store_json(body: Any) -> web.Response:
    return web.json_response(body, headers={"Cache-Control": "no-store"})


async def read_body(request: web.Request) -> bytes:
    """The request body, at most :data:`MAX_BODY_BYTES`, within :data:`BODY_TIMEOUT_S`."""
    too_big = Refused(413, "request body too large", [f"body: larger than {MAX_BODY_BYTES} bytes"])
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
        raise Refused(408, "request body too slow", [f"body: not received within {BODY_TIMEOUT_S:g}s"]) from None
    return bytes(body)


def json_body(raw: bytes, *, optional: bool = False) -> Any:
    if optional and not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Refused(400, "invalid request body", [f"body: not JSON ({str(exc)[:200]})"]) from None
