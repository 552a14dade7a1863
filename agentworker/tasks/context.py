"""What a running task sees: its tenant, its job, its deadline, and tenant-scoped services."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar, cast

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import metrics
from agentworker.config import QuotaConfig, TenantLimits
from agentworker.db import Database, open_database
from agentworker.event_outbox import EventOutbox
from agentworker.events import EventPublisher
from agentworker.job_control import cancel_requests
from agentworker.jobs import JobCancelled
from agentworker.llm_budget import LlmBudget
from agentworker.logs import Logger
from agentworker.settings import Settings
from agentworker.submit import JobSubmitter
from agentworker.tenants import TenantDirectory
from agentworker.tools.scope import TenantScope

if TYPE_CHECKING:
    from agentworker.graphs.checkpoints import CheckpointStore

R = TypeVar("R")


class ProcessResources:
    """Process-wide resources (database pools, checkpointers) made on first use and closed at shutdown.

    A factory that fails is not remembered: the next job tries again (PostgreSQL may be back). Each
    resource needs an ``async aclose()``.
    """

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def get(self, name: str, factory: Callable[[], Awaitable[R]]) -> R:
        if name not in self._made:
            async with self._locks.setdefault(name, asyncio.Lock()):
                if name not in self._made:
                    self._made[name] = await factory()
        return cast(R, self._made[name])

    async def aclose(self, log: Logger | None = None) -> None:
        """Close everything made, newest first; never raises (it runs during shutdown)."""
        while self._made:
            name, resource = self._made.popitem()
            try:
                await resource.aclose()
            except Exception as exc:
                if log is not None:
                    log.warning("closing a process resource failed", resource=name, error=repr(exc))


@dataclass
class JobRuntime:
    """Shared by every job of a worker process. ``config`` is swapped in place on reload."""

    pool: str
    slot: int
    settings: Settings
    redis: Redis
    events: EventPublisher
    config: QuotaConfig
    resources: ProcessResources = field(default_factory=ProcessResources)
    #: tenants' stored entries (plans, overrides: agentworker.tenants), cached; the worker listens for changes
    tenants: TenantDirectory = field(init=False)
    #: the tasks this process serves (metrics name any other ``other``)
    task_names: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        self.tenants = TenantDirectory(self.redis)

    def submitter(self) -> JobSubmitter:
        """A submitter borrowing the process's Redis client, on its current quota file and tenant entries
        (a new one per use: ``config`` is swapped in place when the quota file is reloaded)."""
        return JobSubmitter(self.redis, self.config, max_payload_bytes=self.settings.max_payload_bytes,
                            tenants=self.tenants)

    async def database(self) -> Database:
        """The process's PostgreSQL pool, made on first use and shared by its jobs and its schedule
        dispatcher: one connection per job slot, plus a few for the dispatcher and checkpoint setup."""
        url = self.settings.database_url
        size = self.config.pools[self.pool].concurrency + 6
        return await self.resources.get("database", lambda: open_database(url, max_size=size))

    async def event_outbox(self) -> EventOutbox:
        """The process's event outbox (:mod:`agentworker.event_outbox`), made after the database pool, so
        it is closed (flushing what it can) before that pool is."""

        async def make() -> EventOutbox:
            await self.database()
            return EventOutbox(self.events, self.database)

        return await self.resources.get("event-outbox", make)

    async def checkpoints(self) -> CheckpointStore:
        """The process's LangGraph checkpoint store (its own psycopg pool: one connection per job slot and
        two more), made on first use. LangGraph is imported here, on the first job that needs it."""
        from agentworker.graphs.checkpoints import open_checkpoint_store

        url = self.settings.database_url
        size = self.config.pools[self.pool].concurrency + 2
        return await self.resources.get("checkpoints", lambda: open_checkpoint_store(url, max_size=size))


@dataclass
class CancelRequest:
    """Whether the job's cancel was requested (:mod:`agentworker.job_control`), shared by the worker that
    runs the job and the job's envelope: the worker fills it in before it cancels the job's task, or
    :meth:`JobContext.raise_if_cancelled` does when it finds the request itself."""

    #: when the cancel was first requested (ms since the epoch); None while it is not
    requested_at_ms: int | None = None
    #: who asked (as given to cancel_job)
    by: str = ""
    #: set once the envelope has told how the job ended (the ``job_cancelled`` event, the task's hook)
    told: bool = False

    @property
    def requested(self) -> bool:
        return self.requested_at_ms is not None

    def message(self, job_id: str) -> str:
        return f"job {job_id} was cancelled" + (f" by {self.by}" if self.by else "")


@dataclass
class JobContext:
    """Passed as the first argument of every task. Everything on it belongs to ``tenant_id``."""

    tenant_id: str
    job_id: str
    task: str
    job_try: int
    queue: str
    shard: int
    enqueue_time_ms: int
    timeout: float
    runtime: JobRuntime
    log: Logger
    started_monotonic: float = field(default_factory=time.monotonic)
    #: the job's cancel request, as its worker knows it
    cancel: CancelRequest = field(default_factory=CancelRequest)

    @property
    def pool(self) -> str:
        return self.runtime.pool

    @property
    def redis(self) -> Redis:
        return self.runtime.redis

    @property
    def remaining(self) -> float:
        """Seconds left before the job's timeout."""
        return max(0.0, self.timeout - (time.monotonic() - self.started_monotonic))

    async def raise_if_cancelled(self) -> None:
        """Raise :class:`~agentworker.jobs.JobCancelled` if the job's cancel was requested: known to its
        worker already, or found now in Redis (one ``ZMSCORE``, :func:`agentworker.job_control.cancel_requests`).
        For a task between two units of work (a workflow before each step): the worker cancels a running
        job within about a second on its own, this makes the boundary exact. Redis unreachable: not
        cancelled (the worker's own check follows)."""
        if not self.cancel.requested:
            try:
                found = await cancel_requests(self.redis, [self.job_id])
            except (RedisError, OSError) as exc:
                self.log.warning("cannot check for a cancel request", error=str(exc))
                return
            if self.job_id not in found:
                return
            self.cancel.requested_at_ms, self.cancel.by = found[self.job_id]
        raise JobCancelled(self.cancel.message(self.job_id))

    async def scope(self, *, checkpoints: bool = False) -> TenantScope:
        """The tenant's services for this job: its database, its events (best effort, and the outbox for
        promised ones), the job's logger and, with ``checkpoints``, the agents' checkpoint store."""
        return TenantScope(tenant_id=self.tenant_id, database=await self.runtime.database(),
                           emit=self.emit_best_effort, log=self.log, outbox=await self.runtime.event_outbox(),
                           checkpoints=await self.runtime.checkpoints() if checkpoints else None,
                           llm_budget=self.llm_budget())

    def llm_budget(self) -> LlmBudget:
        """The tenant's LLM budget, its limits read at each model call (reloads and tenant-store changes
        apply at the next call)."""
        runtime, tenant = self.runtime, self.tenant_id

        def limits() -> TenantLimits:
            return runtime.config.limits_of(tenant, runtime.tenants.cached(tenant, stale=True))

        return LlmBudget(runtime.redis, tenant, limits, database=runtime.database, emit=self.emit_best_effort,
                         metric_tenant=metrics.tenant_label(runtime.config, tenant))

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        """Publish an event on this job's tenant channel and stream."""
        await self.runtime.events.publish(self.tenant_id, event, data)

    async def emit_best_effort(self, event: str, data: dict[str, Any]) -> None:
        """:meth:`emit`, but a Redis error is logged instead of raised: a lost event must not fail the
        work it reports on (steps and runs are recorded in PostgreSQL)."""
        try:
            await self.emit(event, data)
        except (RedisError, OSError) as exc:
            self.log.warning("event not published", event_name=event, error=str(exc))
