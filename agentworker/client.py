"""What the backend imports to hand jobs to agentworker and hear back from it.

.. code-block:: python

    from agentworker.client import AgentWorkerClient

    async with AgentWorkerClient.from_settings() as client:       # AGENTWORKER_* env + the quota file
        job = await client.enqueue("execute_workflow", tenant_id="acme", payload={...}, idempotency_key="k1")
        result = await job.result(timeout=30)                       # the task's return value, or raises
        async for event in client.events("acme", since="0"):        # catch up, then live
            ...
        await client.cancel(job.job_id)     # queued: removed at once; running: its worker cancels it
        await client.retry(job.job_id)      # a failed or cancelled job runs again (same id, same payload)

The client routes each tenant itself (see :mod:`agentworker.routing`), checks admission (``max_pending``,
``rate_limit``) and enqueues in one atomic Redis call, through the service's own submitter
(:mod:`agentworker.submit`, :mod:`agentworker.admission`).

The client closes what it opened and nothing else: :meth:`AgentWorkerClient.from_settings` makes its Redis
client (closed by :meth:`~AgentWorkerClient.close`); a Redis client or a database handed to
``AgentWorkerClient(redis, ..., database=...)`` stays the caller's, open after ``close()``.

Workflows (PostgreSQL, ``AGENTWORKER_DATABASE_URL``, connected on first use) — no SQL needed by the backend:

.. code-block:: python

        saved = await client.save_workflow("acme", yaml_or_json_or_dict)   # validated; a new version
        job = await client.enqueue("execute_workflow", tenant_id="acme",
                                   payload={"workflow_id": saved.workflow_id, "input_data": {...}})
        run = await client.get_run("acme", (await job.result(timeout=60))["run_id"])
        recent = await client.list_runs("acme", workflow_id=saved.workflow_id, status="failed")

Agents' tenant settings (validated; secrets masked in everything returned):

.. code-block:: python

        await client.save_integration("acme", "smtp", {"host": ..., "from_address": ..., "password": ...})
        await client.save_integration("acme", "mcp", {"url": ..., "headers": {...}}, name="extras")
        print(await client.list_integrations("acme"))

Schedules (cron, polling sources; validated, refused with one sentence when the cron expression or the
time zone is not usable):

.. code-block:: python

        await client.save_schedule("acme", {"id": "nightly", "cron": "0 2 * * *", "timezone": "Europe/Paris",
                                            "workflow_id": "cleanup"})
        await client.disable_schedule("acme", "nightly")
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any, Self

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import catalog, job_control, jobs, keys
from agentworker.config import ConfigError, QuotaConfig, QuotaFileWatch, load_config, resolve_config_path
from agentworker.db import Database, definitions, open_database, runs
from agentworker.db import integrations as integration_rows
from agentworker.db import schedules as schedule_rows
from agentworker.db.definitions import StoredWorkflow
from agentworker.db.runs import RunRecord
from agentworker.errors import AgentWorkerError
from agentworker.events import Event, EventPublisher, read_events, stable_event_id
from agentworker.integrations import DEFAULT_NAME, SETTINGS_BY_KIND, check_kind_and_name, parse_integration
from agentworker.job_control import JobNotCancellable as JobNotCancellable  # re-exported, with JobView
from agentworker.job_control import JobNotFound as JobNotFound
from agentworker.job_control import JobNotRetryable as JobNotRetryable
from agentworker.job_control import JobView as JobView
from agentworker.jobs import JobCancelled
from agentworker.llm_budget import LlmUsage, read_usage
from agentworker.routing import Route, route_tenant, validate_tenant_id
from agentworker.schedules.spec import InvalidSchedule, ScheduleSpec, parse_schedule, schedule_view
from agentworker.settings import Settings
from agentworker.submit import JOB_EXPIRY_MS as JOB_EXPIRY_MS  # re-exported, as QuotaExceeded
from agentworker.submit import JobSubmitter
from agentworker.submit import QuotaExceeded as QuotaExceeded  # re-exported: the backend catches it from here
from agentworker.tenants import UNSET, TenantChange, TenantStore, TenantView
from agentworker.workflows import InvalidWorkflow, WorkflowDefinition, parse_workflow
from agentworker.workflows.definition import ToolStep

#: a standard-library logger: the client runs in the backend's process and configures no logging of its
#: own there; the backend's logging setup decides where (and whether) its lines go
log = logging.getLogger("agentworker.client")
# What a library does (the logging HOWTO): without the backend's own handlers, not even Python's
# last-resort handler prints our warnings; lines still propagate to whatever the backend configures.
logging.getLogger("agentworker").addHandler(logging.NullHandler())


class JobFailed(AgentWorkerError):
    """The job ran and failed (or was rejected, or timed out); ``error`` is the exception class name."""

    def __init__(self, job_id: str, error: str, message: str) -> None:
        self.job_id = job_id
        self.error = error
        self.message = message
        super().__init__(f"job {job_id} failed: {error}: {message}")


class ResultTimeout(AgentWorkerError, TimeoutError):
    """No result arrived within the time given to :meth:`JobHandle.result`."""


class JobStatus(StrEnum):
    """Where a job stands (:meth:`JobHandle.status`); :meth:`AgentWorkerClient.get_job` tells more."""

    DEFERRED = "deferred"
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    #: finished: completed or failed (its result says which)
    COMPLETE = "complete"
    #: finished as cancelled on request (its result's error is ``JobCancelled``)
    CANCELLED = "cancelled"
    NOT_FOUND = "not_found"


@dataclass(frozen=True, slots=True)
class JobResult:
    job_id: str
    success: bool
    result: Any
    job_try: int
    queue: str
    enqueue_time_ms: int
    start_time_ms: int
    finish_time_ms: int


class JobHandle:
    """A job that was enqueued (``created``) or already existed under the same idempotency key."""

    def __init__(self, redis: Redis, job_id: str, route: Route, created: bool, *,
                 client: AgentWorkerClient | None = None) -> None:
        self._redis = redis
        self.job_id = job_id
        self.route = route
        self.created = created
        self._client = client

    def __repr__(self) -> str:
        return f"<JobHandle {self.job_id} queue={self.route.queue} created={self.created}>"

    async def info(self) -> JobResult | None:
        """The stored result record, or None while the job has not finished."""
        raw = await self._redis.get(jobs.result_key(self.job_id))
        if raw is None:
            return None
        record = jobs.loads(raw)
        return JobResult(
            job_id=self.job_id, success=bool(record["s"]), result=record["r"], job_try=record.get("t") or 1,
            queue=record.get("q", ""), enqueue_time_ms=record.get("et", 0),
            start_time_ms=record.get("st", 0), finish_time_ms=record.get("ft", 0),
        )

    async def status(self) -> JobStatus:
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.get(jobs.result_key(self.job_id))
            pipe.exists(jobs.in_progress_key(self.job_id))
            pipe.zscore(keys.tenant_queue(self.route.pool, self.route.shard, self.route.tenant_id), self.job_id)
            result, in_progress, score = await pipe.execute()
        if result is not None:
            cancelled = job_control.finished_status(result) == "cancelled"
            return JobStatus.CANCELLED if cancelled else JobStatus.COMPLETE
        if in_progress:
            return JobStatus.IN_PROGRESS
        if score is None:
            return JobStatus.NOT_FOUND
        return JobStatus.DEFERRED if score > time.time() * 1000 else JobStatus.QUEUED

    async def cancel(self, *, by: str = "") -> JobView:
        """Cancel this job: :meth:`AgentWorkerClient.cancel`."""
        return await self._job_control().cancel(self.job_id, by=by)

    async def retry(self, *, by: str = "") -> JobView:
        """Run this failed or cancelled job again: :meth:`AgentWorkerClient.retry`."""
        return await self._job_control().retry(self.job_id, by=by)

    async def view(self) -> JobView:
        """This job as operators see it: :meth:`AgentWorkerClient.get_job`."""
        return await self._job_control().get_job(self.job_id)

    def _job_control(self) -> AgentWorkerClient:
        if self._client is None:
            raise RuntimeError("this JobHandle was made without a client; use AgentWorkerClient.job(job_id)")
        return self._client

    async def result(self, timeout: float | None = None, *, poll_interval: float = 0.25) -> Any:
        """Wait for the job to finish; return its result or raise :class:`JobFailed`.

        Raises :class:`ResultTimeout` if ``timeout`` seconds pass first. Polls the result key with a
        delay growing from 5 ms to ``poll_interval``, so short jobs are seen quickly.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            info = await self.info()
            if info is not None:
                if info.success:
                    return info.result
                error = info.result if isinstance(info.result, dict) else {"message": str(info.result)}
                raise JobFailed(self.job_id, str(error.get("error", "Error")), str(error.get("message", "")))
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeout(f"job {self.job_id} has no result after {timeout:g}s")
            wait = delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic()))
            await asyncio.sleep(wait)
            delay = min(delay * 2, poll_interval)


class AgentWorkerClient:
    """Routes, admits and enqueues jobs; reads results and events. Use as an async context manager."""

    def __init__(self, redis: Redis, config: QuotaConfig, settings: Settings | None = None, *,
                 database: Database | None = None, config_path: str | os.PathLike[str] | None = None) -> None:
        """``redis``: the Redis client to use, and leave open: it is the caller's to close (the client of
        :meth:`from_settings` is the client's own, closed by :meth:`close`).

        ``database``: an open :class:`~agentworker.db.Database` to use (and leave open); without it,
        the workflow methods connect to ``settings.database_url`` on first use and :meth:`close` closes it.

        ``config_path``: the quota file ``config`` was read from. The client then re-reads it when its
        content changes (checked at most every :attr:`config_check_interval` seconds, on use), so a
        long-lived client follows quota edits (routing, ``max_pending``, ``rate_limit``) the way the
        workers do, reading it exactly as they do and off the event loop (in a thread); a new file that
        is refused for any reason is ignored, with one log line, and the running config stays."""
        self.redis = redis
        self._owns_redis = False
        self.settings = settings or Settings()
        self._submitter = JobSubmitter(redis, config, max_payload_bytes=self.settings.max_payload_bytes)
        self.config_check_interval = 2.0
        self._config_watch = (QuotaFileWatch(Path(config_path), limits=self.settings.limits)
                              if config_path is not None else None)
        self._config_checked_at = time.monotonic()
        self._config_following: set[asyncio.Future[bool]] = set()
        if self._config_watch is not None:
            with contextlib.suppress(ConfigError):
                self._config_watch.seen_hash = self._config_watch.read()[1]
        self._database = database
        self._owns_database = False
        self._database_lock = asyncio.Lock()

    @classmethod
    def from_settings(cls, settings: Settings | None = None, *, config: QuotaConfig | None = None) -> Self:
        """A client on ``AGENTWORKER_REDIS_URL`` with the quota file of ``AGENTWORKER_CONFIG``."""
        settings = settings or Settings.from_env()
        if config is not None:
            client = cls(Redis.from_url(settings.redis_url), config, settings)
        else:
            path = resolve_config_path(settings.config)
            client = cls(Redis.from_url(settings.redis_url), load_config(path, limits=settings.limits), settings,
                         config_path=path)
        client._owns_redis = True  # made here, so closed by close()
        return client

    @property
    def config(self) -> QuotaConfig:
        """The quota config routing and admitting this client's jobs (replaced when the file changes)."""
        return self._submitter.config

    @config.setter
    def config(self, config: QuotaConfig) -> None:
        self._submitter.config = config

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        for following in list(self._config_following):  # a background check of the quota file
            following.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await following
        if self._owns_redis:
            await self.redis.aclose()
        if self._owns_database and self._database is not None:
            await self._database.close()
            self._database = None

    def refresh_config(self, *, force: bool = False) -> bool:
        """Re-read the quota file if its content changed, in the calling thread; True if a new config
        was taken. Async code awaits :meth:`follow_config` instead, which reads it in a thread."""
        watch = self._config_watch
        if watch is None or not self._config_check_due(force):
            return False
        return self._take_config(watch, _poll_config(watch))

    async def follow_config(self, *, force: bool = False) -> bool:
        """:meth:`refresh_config` off the event loop (what :meth:`enqueue` does before routing)."""
        watch = self._config_watch
        if watch is None or not self._config_check_due(force):
            return False
        return self._take_config(watch, await asyncio.to_thread(_poll_config, watch))

    def _config_check_due(self, force: bool) -> bool:
        now = time.monotonic()
        if not force and now - self._config_checked_at < self.config_check_interval:
            return False
        self._config_checked_at = now
        return True

    def _take_config(self, watch: QuotaFileWatch, loaded: QuotaConfig | ConfigError | None) -> bool:
        if loaded is None:
            return False
        if isinstance(loaded, ConfigError):
            log.warning("quota file %s changed but is refused; keeping the running config: %s", watch.path,
                        "; ".join(loaded.errors))
            return False
        self.config = loaded
        log.info("quota file %s reloaded by the client", watch.path)
        return True

    def route(self, tenant_id: str) -> Route:
        """The tenant's route under the current config. Inside an event loop a due check of the quota
        file runs in the background (what it finds applies from the next call on); outside one, here."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.refresh_config()
        else:
            if self._config_watch is not None and not self._config_following:
                following = asyncio.ensure_future(self.follow_config())
                self._config_following.add(following)
                following.add_done_callback(self._config_following.discard)
        return route_tenant(self.config, tenant_id, self._submitter.tenants.cached(tenant_id, stale=True))

    def job(self, job_id: str) -> JobHandle:
        """A handle on an existing job id (``tenant:task:key``)."""
        parsed = job_control.parse_job_id(job_id)
        return JobHandle(self.redis, job_id, self.route(parsed.tenant_id), created=False, client=self)

    async def enqueue(
        self,
        task: str,
        tenant_id: str,
        payload: dict[str, Any] | None = None,
        idempotency_key: str | None = None,
        defer: float | timedelta | datetime | None = None,
    ) -> JobHandle:
        """Enqueue ``task`` for ``tenant_id`` with keyword arguments ``payload``.

        The job id is ``{tenant_id}:{task}:{idempotency_key}`` (a random key when none is given); if that
        job still exists (queued, running, or its result kept), nothing is enqueued and the handle has
        ``created=False``. ``defer`` delays the start by seconds / a timedelta, or until a datetime.

        Raises :class:`QuotaExceeded` when the tenant is over ``max_pending`` or ``rate_limit``,
        :class:`~agentworker.routing.InvalidTenantId` or :class:`~agentworker.jobs.InvalidJob` for bad input.
        """
        await self.follow_config()
        submitted = await self._submitter.submit(task, tenant_id, payload, idempotency_key=idempotency_key,
                                                 defer=defer)
        return JobHandle(self.redis, submitted.job_id, submitted.route, created=submitted.created, client=self)

    # -- job control (agentworker.job_control) -------------------------------------------------------------

    async def get_job(self, job_id: str) -> JobView:
        """The job as operators see it: status (``queued``, ``deferred``, ``running``, ``completed``,
        ``failed``, ``cancelled``, ``not_found``), tries, times, result or error. Raises
        :class:`~agentworker.jobs.InvalidJob` for a malformed id (nothing is read then)."""
        return await job_control.get_job(self.redis, job_id, config=self.config)

    async def cancel(self, job_id: str, *, by: str = "") -> JobView:
        """Cancel a job. A queued or deferred one is removed at once (view ``cancelled``; its result raises
        :class:`JobFailed` with ``error == "JobCancelled"``); a running one is cancelled by its worker
        within about a second (view ``running`` with ``cancel_requested``), and its workflow run ends
        ``cancelled`` without starting another step. ``by``: who asks (in the event). Raises
        :class:`~agentworker.job_control.JobNotFound`, :class:`~agentworker.job_control.JobNotCancellable`
        (it has finished), :class:`~agentworker.jobs.InvalidJob`."""
        return await job_control.cancel_job(self.redis, job_id, by=by, config=self.config, events=self._events(),
                                            keep_result_s=self.settings.keep_result)

    async def retry(self, job_id: str, *, by: str = "") -> JobView:
        """Run a failed or cancelled job again under the same id and arguments (tries start from one;
        admission applies: :class:`QuotaExceeded`, and the old result stays). Raises
        :class:`~agentworker.job_control.JobNotFound`, :class:`~agentworker.job_control.JobNotRetryable`,
        :class:`~agentworker.jobs.InvalidJob`."""
        await self.follow_config()
        return await job_control.retry_job(self.redis, self.config, job_id, by=by, events=self._events(),
                                           max_payload_bytes=self.settings.max_payload_bytes)

    def _events(self) -> EventPublisher:
        return EventPublisher(self.redis, stream_maxlen=self.settings.event_stream_maxlen)

    async def pending_count(self, tenant_id: str) -> int:
        """Jobs of the tenant enqueued and not yet started (what ``max_pending`` limits)."""
        now_ms = int(time.time() * 1000)
        return int(await self.redis.zcount(keys.pending(tenant_id), now_ms, "+inf"))

    def events(self, tenant_id: str, since: str = "0", *, block_ms: int = 5000) -> AsyncIterator[Event]:
        """The tenant's events after stream id ``since``: caught up from the stream, then live.

        ``since="0"`` replays every event still kept; ``"$"`` only new ones; an :attr:`Event.id` resumes
        after that event.
        """
        route_tenant(self.config, tenant_id)  # validates the id
        return read_events(self.redis, tenant_id, since=since, block_ms=block_ms)


    # -- the tenant store (PostgreSQL, copied to Redis: agentworker.tenants) ---------------------------------

    async def tenant_store(self) -> TenantStore:
        """The tenant store on this client's database, Redis and current quota file."""
        return TenantStore(await self.database(), self.redis, lambda: self.config)

    async def set_tenant(self, tenant_id: str, *, by: str, plan: str | None = UNSET,
                         overrides: dict[str, Any] | None = None,
                         unset: tuple[str, ...] | list[str] = ()) -> TenantView:
        """Change a tenant's plan (None: no plan; not given: unchanged) and overrides (merged over the
        stored ones; ``unset`` removes keys, ``"plan"`` included). ``by`` says who makes the change (the
        audit trail records it). Validated with the quota file's rules: a bad value raises
        :class:`~agentworker.tenants.InvalidTenantChange` naming the key's path, and nothing changes.
        Applies in every worker, client and supervisor within a second (:mod:`agentworker.tenants`)."""
        view = await (await self.tenant_store()).set(tenant_id, by=by, plan=plan, overrides=overrides, unset=unset)
        await self._refresh_tenant(tenant_id)
        return view

    async def _refresh_tenant(self, tenant_id: str) -> None:
        """Read the tenant's record afresh after this client changed it (its routing follows at once)."""
        self._submitter.tenants.invalidate(tenant_id)
        with contextlib.suppress(RedisError, OSError):
            await self._submitter.tenants.get(tenant_id, fresh=True)

    async def unset_tenant(self, tenant_id: str, *keys_: str, by: str) -> bool:
        """Remove override keys (``"plan"`` for the plan) of the tenant's entry, or with no key its whole
        entry (the quota file's limits apply again); False if there was nothing to remove."""
        store = await self.tenant_store()
        try:
            if keys_:
                before = await store.get(tenant_id)
                after = await store.set(tenant_id, by=by, unset=keys_)
                return after.version != before.version
            return await store.remove(tenant_id, by=by)
        finally:
            await self._refresh_tenant(tenant_id)

    async def get_tenant(self, tenant_id: str) -> TenantView:
        """The tenant's stored entry, effective limits and where each comes from (file, plan, override)."""
        return await (await self.tenant_store()).get(tenant_id)

    async def list_tenants(self, *, after: str = "", limit: int = 100) -> list[TenantView]:
        """Tenants with a stored entry, by id: ``limit`` (1-5000) after the id ``after``."""
        return await (await self.tenant_store()).list(after=after, limit=limit)

    async def tenant_history(self, tenant_id: str, *, limit: int = 100) -> list[TenantChange]:
        """The audit trail of the tenant's entry, newest first."""
        return await (await self.tenant_store()).history(tenant_id, limit=limit)

    # -- LLM usage (PostgreSQL: agentworker.llm_budget) --------------------------------------------------

    async def llm_usage(self, tenant_id: str, *, since: date | datetime | None = None,
                        until: date | datetime | None = None) -> list[LlmUsage]:
        """The tenant's model tokens per day (UTC) and model, ``since`` to ``until`` (days included; a
        datetime counts as its UTC day): the provider's reported usage of every call its jobs made, what
        to bill from. Another tenant's usage is never visible (row-level security)."""
        validate_tenant_id(tenant_id)
        return await read_usage(await self.database(), tenant_id, since=_utc_day(since), until=_utc_day(until))

    # -- workflows (PostgreSQL) ---------------------------------------------------------------------------

    async def database(self) -> Database:
        """The workflow database, connected on first use (raises :class:`~agentworker.db.DatabaseError`)."""
        async with self._database_lock:
            if self._database is None:
                self._database = await open_database(self.settings.database_url)
                self._owns_database = True
        return self._database

    async def save_workflow(self, tenant_id: str,
                            definition: str | bytes | dict[str, Any] | WorkflowDefinition) -> StoredWorkflow:
        """Validate a definition (YAML or JSON text, a dict, or a model) and store it as the next version
        of its workflow id. Saving the same definition again returns the existing version
        (``created=False``). Raises :class:`~agentworker.workflows.InvalidWorkflow` listing every problem."""
        parsed = parse_workflow(definition)
        validate_tenant_id(tenant_id)
        problems = []
        for i, step in enumerate(parsed.steps):  # a tool step naming a tool no worker serves the tenant
            if isinstance(step, ToolStep):
                problem = await catalog.tool_problem(self.redis, tenant_id, step.tool)
                if problem is not None:
                    problems.append(f"steps[{i}].tool: {problem}")
        if problems:
            raise InvalidWorkflow(problems)
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            return await definitions.save_definition(tx, parsed.id, parsed.to_json())

    async def get_workflow(self, tenant_id: str, workflow_id: str, version: int | None = None) -> StoredWorkflow | None:
        """A stored definition (the latest version unless ``version``), or None."""
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            return await definitions.get_definition(tx, workflow_id, version)

    async def get_run(self, tenant_id: str, run_id: str, *, steps: bool = True) -> RunRecord | None:
        """A run of the tenant with (unless ``steps=False``) its step records, or None if the tenant has
        no such run. Raises :class:`~agentworker.db.runs.InvalidRunId` when ``run_id`` is not a UUID."""
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            return await runs.get_run(tx, run_id, with_steps=steps)

    async def cancel_run(self, tenant_id: str, run_id: str, *, by: str = "") -> RunRecord | None:
        """Cancel a run that waits for approval (it has no job to cancel): it ends ``cancelled`` with one
        ``workflow_cancelled`` event, and a decision sent later finds it finished. None if the tenant has no
        such run; :class:`RunNotCancellable` if it is not waiting (a running run is cancelled through its
        job: :meth:`cancel`; a finished one stays as it is)."""
        from agentworker.event_outbox import EventOutbox

        by = job_control.check_by(by)
        error = {"error": JobCancelled.__name__, "reason": "cancelled",
                 "message": f"run {run_id} was cancelled while waiting for approval" + (f" by {by}" if by else "")}
        database = await self.database()
        outbox = EventOutbox(self._events(), self.database)
        async with database.tenant(tenant_id) as tx:
            run = await runs.get_run(tx, run_id)
            if run is None:
                return None
            cancelled = await runs.cancel_waiting_run(tx, run.run_id, error=error)
            if cancelled is None:
                raise RunNotCancellable(f"run {run.run_id} is {run.status}, not waiting for approval; cancel a "
                                        f"running run through its job")
            await outbox.promise(tx, "workflow_cancelled",
                                 {"workflow_id": run.workflow_id, "run_id": run.run_id, "step_id": None,
                                  "status": "cancelled", "output": None, "error": error, "by": by},
                                 stable_event_id(tenant_id, "workflow", run.run_id, "workflow_cancelled"))
        return await self.get_run(tenant_id, run.run_id)

    async def list_runs(self, tenant_id: str, *, workflow_id: str | None = None, status: str | None = None,
                        limit: int = 50) -> list[RunRecord]:
        """The tenant's runs, newest first (without step records), optionally filtered."""
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            return await runs.list_runs(tx, workflow_id=workflow_id, status=status, limit=limit)

    # -- agent integrations (PostgreSQL) ------------------------------------------------------------------

    async def save_integration(self, tenant_id: str, kind: str, settings: Any,
                               name: str = DEFAULT_NAME) -> dict[str, Any]:
        """Save the tenant's ``smtp``, ``crm`` or ``model`` settings, or an external ``mcp`` server under
        ``name``, replacing what was there; return them with secrets masked. Raises
        :class:`~agentworker.integrations.IntegrationError` naming each bad key (never its value)."""
        parsed = parse_integration(kind, settings, name)
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            await integration_rows.save_integration(tx, kind, name, parsed.stored())
        return parsed.masked()

    async def get_integration(self, tenant_id: str, kind: str, name: str = DEFAULT_NAME) -> dict[str, Any] | None:
        """The tenant's settings of ``kind`` (and ``name``), secrets masked; None when not saved."""
        check_kind_and_name(kind, name)
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            config = await integration_rows.get_integration(tx, kind, name)
        return None if config is None else SETTINGS_BY_KIND[kind].model_validate(config).masked()

    async def list_integrations(self, tenant_id: str) -> list[dict[str, Any]]:
        """Every integration of the tenant: ``{"kind", "name", "config" (secrets masked), "updated_at"}``."""
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            rows = await integration_rows.list_integrations(tx)
        return [{"kind": row.kind, "name": row.name, "updated_at": row.updated_at.isoformat(),
                 "config": SETTINGS_BY_KIND[row.kind].model_validate(row.config).masked()} for row in rows]

    async def delete_integration(self, tenant_id: str, kind: str, name: str = DEFAULT_NAME) -> bool:
        """Remove the tenant's settings of ``kind`` (and ``name``); False when there were none."""
        check_kind_and_name(kind, name)
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            return await integration_rows.delete_integration(tx, kind, name)

    # -- schedules (PostgreSQL) ---------------------------------------------------------------------------

    async def save_schedule(self, tenant_id: str, spec: dict[str, Any] | ScheduleSpec) -> dict[str, Any]:
        """Create or replace the tenant's schedule ``spec["id"]``; return it as :meth:`get_schedule` does.

        Raises :class:`~agentworker.schedules.InvalidSchedule` (one sentence naming each bad key: a cron
        expression or time zone that cannot be used, a missing target, ...). A new or changed cron
        expression (or time zone) starts at its first due time after now; re-saving it unchanged keeps the
        pending due time; a polling source keeps its cursor while its URL stays.
        """
        parsed = parse_schedule(spec)
        validate_tenant_id(tenant_id)
        next_due = parsed.cron_schedule().next_after(datetime.now(UTC)) if parsed.enabled else None
        database = await self.database()
        problems = []
        if parsed.task is not None:  # a task no worker serves would fail at its every due time
            problem = await catalog.unknown_task(self.redis, parsed.task)
            if problem is not None:
                problems.append(problem)
        workflow_id = parsed.workflow_id or (parsed.poll.workflow_id if parsed.poll is not None else None)
        if workflow_id is not None:
            async with database.tenant(tenant_id) as tx:
                if await definitions.get_definition(tx, workflow_id) is None:
                    where = "workflow_id" if parsed.workflow_id else "poll.workflow_id"
                    problems.append(f"{where}: tenant {tenant_id!r} has no workflow {workflow_id!r} (save it first)")
        if problems:
            raise InvalidSchedule(f"invalid schedule {parsed.id!r}: {'; '.join(problems)}", problems)
        async with database.tenant(tenant_id) as tx:
            row, _created = await schedule_rows.save_schedule(
                tx, schedule_id=parsed.id, kind=parsed.kind, cron=parsed.cron, timezone=parsed.timezone,
                spec=parsed.stored(), enabled=parsed.enabled, missed_policy=parsed.missed_policy,
                misfire_grace_seconds=parsed.misfire_grace_seconds, next_due_at=next_due)
        return schedule_view(row)

    async def get_schedule(self, tenant_id: str, schedule_id: str) -> dict[str, Any] | None:
        """The schedule (secrets masked) with its state: ``next_due_at``, ``last_due_at``, ``last_job_id``,
        ``dispatched_count``, ``missed_count``, ``failures``, ``last_error``, ``backoff_until``,
        ``poll_cursor``; None when the tenant has no such schedule."""
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            row = await schedule_rows.get_schedule(tx, schedule_id)
        return None if row is None else schedule_view(row)

    async def list_schedules(self, tenant_id: str) -> list[dict[str, Any]]:
        """Every schedule of the tenant, by id, as :meth:`get_schedule` returns them."""
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            found = await schedule_rows.list_schedules(tx)
        return [schedule_view(row) for row in found]

    async def enable_schedule(self, tenant_id: str, schedule_id: str) -> dict[str, Any]:
        """Enable a schedule: it fires from its first due time after now (nothing missed while disabled
        runs). Raises :class:`ScheduleNotFound`."""
        return await self._set_enabled(tenant_id, schedule_id, True)

    async def disable_schedule(self, tenant_id: str, schedule_id: str) -> dict[str, Any]:
        """Disable a schedule (nothing is dispatched until it is enabled). Raises :class:`ScheduleNotFound`."""
        return await self._set_enabled(tenant_id, schedule_id, False)

    async def delete_schedule(self, tenant_id: str, schedule_id: str) -> bool:
        """Remove a schedule; False when there was none. Runs already enqueued are not recalled."""
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            return await schedule_rows.delete_schedule(tx, schedule_id)

    async def _set_enabled(self, tenant_id: str, schedule_id: str, enabled: bool) -> dict[str, Any]:
        database = await self.database()
        async with database.tenant(tenant_id) as tx:
            row = await schedule_rows.get_schedule(tx, schedule_id)
            if row is None:
                raise ScheduleNotFound(f"tenant {tenant_id!r} has no schedule {schedule_id!r}")
            cron = ScheduleSpec.model_validate(row.spec).cron_schedule()
            updated = await schedule_rows.set_enabled(tx, schedule_id, enabled, cron.next_after(datetime.now(UTC)))
        assert updated is not None
        return schedule_view(updated)


def _utc_day(value: date | datetime | None) -> date | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value.astimezone(UTC) if value.tzinfo else value).date()
    if isinstance(value, date):
        return value
    raise TypeError(f"since and until are dates or datetimes, not {type(value).__name__}")


class RunNotCancellable(AgentWorkerError, ValueError):
    """:meth:`AgentWorkerClient.cancel_run` for a run that is not waiting for approval."""


class ScheduleNotFound(AgentWorkerError, LookupError):
    """The tenant has no schedule of that id."""


def _poll_config(watch: QuotaFileWatch) -> QuotaConfig | ConfigError | None:
    """The quota file if it changed (None if not), or why it is refused: never raises."""
    try:
        return watch.poll()
    except ConfigError as exc:
        return exc
    except Exception as exc:  # a long-lived client keeps its config whatever the file holds
        return ConfigError(str(watch.path), [f"cannot load the file: {type(exc).__name__}: {exc}"])

