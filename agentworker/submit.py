"""The internal job submitter: route a tenant's job, check it, and admit it in one Redis call.

Everything that enqueues goes through :class:`JobSubmitter`: the backend's client
(:class:`agentworker.client.AgentWorkerClient` is built on it), the schedule dispatcher, and the tasks that
start workflow runs (polling sources, webhooks). So one code path makes the job id
(``{tenant_id}:{task}:{idempotency_key}``, :mod:`agentworker.jobs`), picks the tenant's shard queue
(:mod:`agentworker.routing`), checks the payload, and admits the job against ``max_pending`` and
``rate_limit`` in the same atomic script that enqueues it (:mod:`agentworker.admission`).

.. code-block:: python

    submitter = JobSubmitter(redis, config, max_payload_bytes=settings.max_payload_bytes)
    submitted = await submitter.submit("execute_workflow", "acme", {"workflow_id": "w"}, idempotency_key="k1")
    submitted.job_id, submitted.route.queue, submitted.created

**Who closes the Redis client**: whoever made it. A submitter borrows the client it is given and has no
``close()``; a worker process closes its own client at shutdown, and
:meth:`AgentWorkerClient.close <agentworker.client.AgentWorkerClient.close>` closes only the client
:meth:`~agentworker.client.AgentWorkerClient.from_settings` made for it.

The submitter reads the quota file's routing and limits from :attr:`JobSubmitter.config`, laid under
each tenant's tenant-store entry (:attr:`JobSubmitter.tenants`, a cache of at most half a second without
a change listener: :mod:`agentworker.tenants`), and its owner replaces the config when the file
changes (the client does on its own checks; a worker builds a submitter on its current config where it
needs one: they are cheap).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from agentworker import jobs
from agentworker.admission import Admission, Enqueuer
from agentworker.config import QuotaConfig
from agentworker.errors import AgentWorkerError
from agentworker.routing import Route, route_tenant, validate_tenant_id
from agentworker.tenants import TenantDirectory

#: ARQ's margin after a job's due time before its record expires unclaimed (1 day).
JOB_EXPIRY_MS = 86_400_000


class QuotaExceeded(AgentWorkerError):
    """The tenant is over one of its limits; nothing was enqueued."""

    def __init__(self, tenant_id: str, limit: str, message: str, retry_after: float | None = None) -> None:
        self.tenant_id = tenant_id
        self.limit = limit
        self.retry_after = retry_after
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class Submitted:
    """A job that was enqueued (``created``) or already existed under the same job id."""

    job_id: str
    route: Route
    created: bool


class JobSubmitter:
    """Routes, checks and admits jobs on a borrowed Redis client (see the module's docstring)."""

    def __init__(self, redis: Redis, config: QuotaConfig, *,
                 max_payload_bytes: int = jobs.DEFAULT_MAX_PAYLOAD_BYTES,
                 tenants: TenantDirectory | None = None) -> None:
        self.redis = redis
        #: routing and tenant limits; replaced by the owner when the quota file changes
        self.config = config
        #: tenants' stored entries (plans, overrides), which lay over the file's (agentworker.tenants)
        self.tenants = tenants if tenants is not None else TenantDirectory(redis)
        self.max_payload_bytes = max_payload_bytes
        self._enqueuer = Enqueuer(redis)

    async def submit(
        self,
        task: str,
        tenant_id: str,
        payload: dict[str, Any] | None = None,
        *,
        idempotency_key: str | None = None,
        defer: float | timedelta | datetime | None = None,
    ) -> Submitted:
        """Enqueue ``task`` for ``tenant_id`` with keyword arguments ``payload`` (``tenant_id`` is added).

        The job id is ``{tenant_id}:{task}:{idempotency_key}`` (a random key when none is given); if that
        job still exists (queued, running, or its result kept), nothing is enqueued and ``created`` is
        False. ``defer`` delays the start by seconds / a timedelta, or until a datetime.

        Raises :class:`QuotaExceeded` when the tenant is over ``max_pending`` or ``rate_limit``,
        :class:`~agentworker.routing.InvalidTenantId` or :class:`~agentworker.jobs.InvalidJob` for bad
        input; nothing is written to Redis then.
        """
        job_id = str(jobs.make_job_id(tenant_id, task, idempotency_key))
        if payload is not None and not isinstance(payload, dict):
            raise jobs.InvalidJob(f"payload must be a dict of the task's keyword arguments (a JSON object), "
                                  f"not {type(payload).__name__}")
        config = self.config  # one config for the whole call, even if the owner swaps it meanwhile
        validate_tenant_id(tenant_id)
        stored = await self.tenants.get(tenant_id)
        route = route_tenant(config, tenant_id, stored)
        body = dict(payload or {})
        body.setdefault("tenant_id", tenant_id)
        jobs.check_payload(body, tenant_id, self.max_payload_bytes)

        now_ms = int(time.time() * 1000)
        score_ms = now_ms + defer_ms(defer, now_ms)
        limits = config.limits_of(tenant_id, stored)
        admitted = await self._enqueuer.enqueue(
            job_id=job_id, tenant_id=tenant_id, pool=route.pool, shard=route.shard,
            job_bytes=jobs.encode_job(task, body, now_ms), score_ms=score_ms,
            expires_ms=score_ms - now_ms + JOB_EXPIRY_MS,
            max_pending=limits.max_pending, rate=limits.rate,
        )
        if admitted.outcome is Admission.OVER_MAX_PENDING:
            raise QuotaExceeded(
                tenant_id, "max_pending",
                f"tenant {tenant_id!r} has {admitted.detail} jobs pending, at its max_pending of "
                f"{limits.max_pending}; nothing was enqueued")
        if admitted.outcome is Admission.OVER_RATE_LIMIT:
            raise QuotaExceeded(
                tenant_id, "rate_limit",
                f"tenant {tenant_id!r} is over its rate_limit of {limits.rate}; retry in "
                f"{admitted.detail / 1000:.3f}s; nothing was enqueued",
                retry_after=admitted.detail / 1000)
        return Submitted(job_id, route, created=admitted.outcome is Admission.ENQUEUED)


def defer_ms(defer: float | timedelta | datetime | None, now_ms: int) -> int:
    """Milliseconds from ``now_ms`` until a job deferred by ``defer`` is due (0: at once)."""
    if defer is None:
        return 0
    if isinstance(defer, datetime):
        return max(0, int(defer.timestamp() * 1000) - now_ms)
    if isinstance(defer, bool) or not isinstance(defer, (int, float, timedelta)):
        raise jobs.InvalidJob(f"defer must be seconds (a number), a timedelta or a datetime, "
                              f"not {type(defer).__name__}")
    seconds = defer.total_seconds() if isinstance(defer, timedelta) else float(defer)
    if not math.isfinite(seconds):
        raise jobs.InvalidJob(f"defer must be a finite number of seconds (got {seconds})")
    if seconds < 0:
        raise jobs.InvalidJob(f"defer must not be negative (got {seconds:g}s)")
    return int(seconds * 1000)
