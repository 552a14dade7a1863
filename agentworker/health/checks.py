"""Health checks in the ``application/health+json`` shape (draft-inadarei-api-health-check).

A check is one named observation with a status of ``pass``, ``warn`` or ``fail``. A document is
``fail`` if any check fails, else ``warn`` if any warns, else ``pass``; it answers HTTP 503 on
``fail`` and 200 otherwise, which is what Kubernetes probes read.
"""

from __future__ import annotations

import asyncio
import importlib
import socket
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from agentworker import __version__

# asyncpg ships no type information; imported this way the check type-checks the same whether or not
# the project's mypy configuration ignores the missing stubs.
asyncpg: Any = importlib.import_module("asyncpg")

HEALTH_JSON = "application/health+json"
PASS, WARN, FAIL = "pass", "warn", "fail"


@dataclass(frozen=True, slots=True)
class Check:
    name: str  # "component:measurement", e.g. "redis:ping" or "pool:standard"
    status: str
    output: str | None = None
    observed_value: Any = None
    observed_unit: str | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"status": self.status, "time": datetime.now(UTC).isoformat()}
        if self.output:
            body["output"] = self.output
        if self.observed_value is not None:
            body["observedValue"] = self.observed_value
        if self.observed_unit:
            body["observedUnit"] = self.observed_unit
        return body


def overall_status(checks: list[Check]) -> str:
    statuses = {c.status for c in checks}
    return FAIL if FAIL in statuses else WARN if WARN in statuses else PASS


#: the draft's ``version``: the public version of the HTTP contract (DESIGN.md), the package's major version;
#: ``releaseId`` is the full package version, which changes with every release
API_VERSION = __version__.split(".", 1)[0]


def service_id(service: str) -> str:
    """The draft's ``serviceId``: which process answered, ``agentworker-<service>/<host name>`` (in Kubernetes
    the host name is the pod's name, so two replicas' documents tell apart)."""
    return f"agentworker-{service}/{socket.gethostname()}"


def health_document(checks: list[Check], description: str, *, service: str = "supervisor") -> dict[str, Any]:
    """The ``application/health+json`` document of ``checks``, with the draft's optional ``version``,
    ``releaseId`` and ``serviceId`` (``service`` names the process: ``supervisor``, ``webhooks``)."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for check in checks:
        grouped.setdefault(check.name, []).append(check.as_dict())
    return {"status": overall_status(checks), "version": API_VERSION, "releaseId": __version__,
            "serviceId": service_id(service), "description": description, "checks": grouped}


async def check_redis(redis: Redis, timeout: float) -> Check:
    try:
        async with asyncio.timeout(timeout):
            await redis.ping()
    except TimeoutError:
        return Check("redis:ping", FAIL, f"no answer within {timeout:g}s")
    except Exception as exc:  # any failure of the dependency is a failed check, never a 500
        return Check("redis:ping", FAIL, _one_line(exc))
    return Check("redis:ping", PASS)


async def check_postgres(dsn: str, timeout: float) -> Check:
    """Connect and disconnect: a readiness probe must not hold connections or need a schema."""
    try:
        async with asyncio.timeout(timeout):
            connection = await asyncpg.connect(dsn, timeout=timeout)
            try:
                await connection.fetchval("SELECT 1")
            finally:
                await connection.close(timeout=timeout)
    except TimeoutError:
        return Check("postgresql:connect", FAIL, f"no connection within {timeout:g}s")
    except Exception as exc:  # asyncpg raises many types; any of them means "not reachable"
        return Check("postgresql:connect", FAIL, _one_line(exc))
    return Check("postgresql:connect", PASS)


def _one_line(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
