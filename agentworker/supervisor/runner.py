"""``agentworker run``: wire the reconcile loop, the Redis observer and the HTTP port together.

Start order: lock the metrics directory (a second supervisor on the same directory is refused before
it touches a file), bind the HTTP port (a port in use fails fast, before any worker starts), empty the
metrics directory, start the zygote (the workers' pre-imported parent), then start the loop, which
starts the workers. Signals only set flags on the supervisor: SIGTERM/SIGINT drain and exit
0 (a second one kills the workers at once), SIGHUP reloads the quota file, SIGCHLD wakes the loop to
reap.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import struct
import tempfile
import time
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from redis.asyncio import Redis

from agentworker import job_control
from agentworker.config import TENANT_KEYS, ConfigError
from agentworker.db import Database, LazyDatabase
from agentworker.errors import AgentWorkerError
from agentworker.health.app import create_app
from agentworker.health.checks import FAIL, PASS, WARN, Check, check_postgres, check_redis
from agentworker.health.server import HttpServer
from agentworker.logs import get_logger
from agentworker.routing import validate_tenant_id
from agentworker.settings import Settings
from agentworker.supervisor.directory_lock import DirectoryInUse, DirectoryLock
from agentworker.supervisor.metrics_archive import MetricsArchive
from agentworker.supervisor.observer import RedisObserver
from agentworker.supervisor.operator_views import OperatorViews, parse_decision
from agentworker.supervisor.reconcile import TICK_S, Supervisor
from agentworker.supervisor.reload import QuotaFileWatch
from agentworker.supervisor.report import SupervisorCollector, pool_health, status_document
from agentworker.supervisor.zygote import Zygote
from agentworker.tenants import UNSET, TenantStore, valid_by

log = get_logger("agentworker.supervisor")

#: /health fails when the reconcile loop has not turned for this long (it turns every TICK_S)
LIVENESS_MAX_AGE_S = 30.0
RELOAD_ANSWER_TIMEOUT_S = 30.0
#: connections of the supervisor's own database pool (the admin tenant endpoints only)
ADMIN_DATABASE_CONNECTIONS = 2
EXIT_OK, EXIT_FAILED = 0, 1


class StartupError(AgentWorkerError):
    """The supervisor cannot start (port in use, unusable or locked directory): one line, exit 1."""


class SupervisorBackend:
    """The supervisor as the HTTP app sees it (:class:`agentworker.health.common.HealthBackend`)."""

    def __init__(self, supervisor: Supervisor, observer: RedisObserver, redis: Redis, settings: Settings,
                 registry: CollectorRegistry) -> None:
        self.supervisor = supervisor
        self.observer = observer
        self.redis = redis
        self.settings = settings
        self.registry = registry
        self.admin_token = settings.admin_token
        self.status_token = settings.status_token
        #: opened on the first request that needs PostgreSQL (the tenant store, the console's runs and
        #: schedules; the supervisor needs no database otherwise); closed by close()
        self._database = LazyDatabase(lambda: self.settings.database_url, max_size=ADMIN_DATABASE_CONNECTIONS)
        self.views = OperatorViews(redis, self.database, lambda: self.supervisor.config, observer.tenants,
                                   max_payload_bytes=settings.max_payload_bytes)

    def liveness_checks(self) -> list[Check]:
        age = time.monotonic() - self.supervisor.last_turn
        status = FAIL if age > LIVENESS_MAX_AGE_S else WARN if age > 10 * TICK_S else PASS
        output = None if status == PASS else f"the reconcile loop last turned {age:.1f}s ago"
        return [Check("supervisor:loop", status, output, round(age, 3), "s")]

    async def readiness_checks(self) -> list[Check]:
        timeout = self.settings.ready_timeout
        checks = list(await asyncio.gather(check_redis(self.redis, timeout),
                                           check_postgres(self.settings.database_url, timeout)))
        sup = self.supervisor
        if sup.draining:
            checks.append(Check("supervisor:draining", FAIL, "stopping: draining worker processes"))
        for name, pool in sorted(sup.pools.items()):
            health = pool_health(pool)
            checks.append(Check(f"pool:{name}", PASS if health.ready else FAIL,
                                None if health.status == "ok" else f"{health.status}: {health.reason}",
                                health.serving, "processes"))
        return checks

    def status(self) -> dict[str, Any]:
        return status_document(self.supervisor, self.observer)

    def metrics(self) -> bytes:
        try:
            return generate_latest(self.registry)
        except (struct.error, RuntimeError):
            # A worker creating its metric file at this instant can leave it briefly unreadable: once more.
            return generate_latest(self.registry)

    async def reload(self, trigger: str) -> tuple[int, dict[str, Any]]:
        try:
            result = await asyncio.wait_for(self.supervisor.request_reload(trigger), RELOAD_ANSWER_TIMEOUT_S)
        except TimeoutError:
            return 503, {"ok": False, "trigger": trigger, "errors": ["the reconcile loop did not answer"]}
        return (200 if result.ok else 422), result.as_dict()

    # -- the tenant store (/admin/tenants) --------------------------------------------------------------

    async def database(self) -> Database:
        """The supervisor's own database pool, opened on first use (:class:`DatabaseError` while it cannot
        be; the next request tries again)."""
        return await self._database()

    async def tenant_store(self) -> TenantStore:
        """The tenant store on the supervisor's Redis, database and current quota file."""
        return TenantStore(await self.database(), self.redis, lambda: self.supervisor.config)

    async def list_tenants(self, *, after: str, limit: int) -> list[dict[str, Any]]:
        store = await self.tenant_store()
        return [view.as_json() for view in await store.list(after=after, limit=limit)]

    async def get_tenant(self, tenant_id: str) -> dict[str, Any]:
        validate_tenant_id(tenant_id)
        return (await (await self.tenant_store()).get(tenant_id)).as_json()

    async def set_tenant(self, tenant_id: str, *, by: str, change: dict[str, Any]) -> dict[str, Any]:
        validate_tenant_id(tenant_id)
        store = await self.tenant_store()
        unset = change.get("unset") or ()
        only_unset = "plan" not in change and not change.get("overrides")
        if only_unset and valid_by(by) and all(key == "plan" or key in TENANT_KEYS for key in unset):
            view = await store.get(tenant_id)
            if not view.stored:  # nothing to remove (the store would record an empty entry)
                return view.as_json()
        view = await store.set(tenant_id, by=by, plan=change.get("plan", UNSET), overrides=change.get("overrides"),
                               unset=unset)
        self.observer.tenants.invalidate(tenant_id)  # the stray sweep routes it afresh
        return view.as_json()

    async def remove_tenant(self, tenant_id: str, *, by: str) -> dict[str, Any] | None:
        validate_tenant_id(tenant_id)
        store = await self.tenant_store()
        removed = await store.remove(tenant_id, by=by)
        self.observer.tenants.invalidate(tenant_id)
        return (await store.get(tenant_id)).as_json() if removed else None

    async def tenant_history(self, tenant_id: str, *, limit: int) -> list[dict[str, Any]]:
        validate_tenant_id(tenant_id)
        return [change.as_json() for change in await (await self.tenant_store()).history(tenant_id, limit=limit)]

    # -- the console (/status/..., /admin/jobs, decisions) --------------------------------------------------

    async def job(self, job_id: str) -> dict[str, Any]:
        view = await job_control.get_job(self.redis, job_id, config=self.supervisor.config)
        answer = view.as_json()
        answer["events"] = [] if view.status == "not_found" else await self.views.job_events(view.tenant_id, job_id)
        return answer

    async def cancel_job(self, job_id: str, *, by: str) -> dict[str, Any]:
        view = await job_control.cancel_job(self.redis, job_id, by=by, config=self.supervisor.config,
                                            keep_result_s=self.settings.keep_result)
        log.info("job cancel requested over HTTP", job_id=job_id, by=by, status=view.status)
        return view.as_json()

    async def retry_job(self, job_id: str, *, by: str) -> dict[str, Any]:
        view = await job_control.retry_job(self.redis, self.supervisor.config, job_id, by=by,
                                           max_payload_bytes=self.settings.max_payload_bytes)
        log.info("job retried over HTTP", job_id=job_id, by=by, status=view.status)
        return view.as_json()

    async def dead_letters(self, pool: str | None, *, limit: int) -> dict[str, Any]:
        return await self.views.dead_letters(pool, limit=limit)

    async def tenant_runs(self, tenant_id: str, *, status: str | None, limit: int) -> list[dict[str, Any]]:
        return await self.views.runs(tenant_id, status=status, limit=limit)

    async def tenant_run(self, tenant_id: str, run_id: str) -> dict[str, Any]:
        return await self.views.run(tenant_id, run_id)

    async def tenant_schedules(self, tenant_id: str) -> dict[str, Any]:
        return await self.views.schedules(tenant_id)

    async def tenant_failures(self, tenant_id: str, *, limit: int) -> list[dict[str, Any]]:
        return await self.views.failures(tenant_id, limit=limit)

    async def decide(self, tenant_id: str, run_id: str, body: Any) -> dict[str, Any]:
        decision = parse_decision(body)
        answer = await self.views.decide(tenant_id, run_id, decision)
        log.info("approval decision enqueued over HTTP" if answer["created"] else
                 "approval decision already enqueued (same run and step)", tenant_id=tenant_id, run_id=run_id,
                 step_id=answer["step_id"], decision=decision.decision, by=decision.by, job_id=answer["job_id"])
        return answer

    async def close(self) -> None:
        """Close what the backend opened (its database pool, if a tenant request opened it)."""
        await self._database.close()


def _directory(configured: str | None, prefix: str) -> tuple[Path, bool]:
    """The configured directory (created if missing), else a new temporary one; and whether it is ours."""
    try:
        if configured:
            path = Path(configured)
            path.mkdir(parents=True, exist_ok=True)
            return path, False
        return Path(tempfile.mkdtemp(prefix=prefix)), True
    except OSError as exc:
        raise StartupError(f"cannot create directory {configured or tempfile.gettempdir()}: "
                           f"{exc.strerror or exc}") from None


def child_environment(metrics_dir: Path, port: int | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k.lower() != "prometheus_multiproc_dir"}
    # Read by prometheus_client when the worker imports it: every worker writes its own files here.
    env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    if port is not None:  # `run --port N`: the workers' egress guard must know the supervisor's own port
        env["AGENTWORKER_PORT"] = str(port)
    return env


async def serve(settings: Settings, config_path: Path) -> int:
    watch = QuotaFileWatch(config_path)
    try:
        config = watch.load()
    except ConfigError as exc:
        raise StartupError(f"bad quota file {exc}") from None
    run_dir, own_run_dir = _directory(settings.run_dir, "agentworker-run-")
    metrics_dir, own_metrics_dir = _directory(settings.metrics_dir, "agentworker-metrics-")
    archive = MetricsArchive(metrics_dir)
    metrics_lock = DirectoryLock(metrics_dir)
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=settings.ready_timeout, socket_timeout=5)
    http: HttpServer | None = None
    backend: SupervisorBackend | None = None
    observer_task: asyncio.Task[None] | None = None
    supervisor: Supervisor | None = None
    zygote: Zygote | None = None
    try:
        try:
            metrics_lock.acquire()  # held until this function returns; the kernel drops it if we die
        except DirectoryInUse as exc:
            raise StartupError(str(exc)) from None
        except OSError as exc:
            raise StartupError(f"cannot use metrics directory {metrics_dir}: {exc.strerror or exc}") from None
        supervisor = Supervisor(settings=settings, watch=watch, config=config, run_dir=run_dir,
                                metrics=archive, child_env=child_environment(metrics_dir, settings.port))
        observer = RedisObserver(redis, lambda: (supervisor.config_version, supervisor.config), config_path)
        supervisor.on_worker_gone = observer.release_dead_worker
        supervisor.on_reload, observer.on_rerouted = observer.wake, supervisor.rerouted
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=str(metrics_dir))  # type: ignore[no-untyped-call]
        registry.register(SupervisorCollector(supervisor, observer))
        backend = SupervisorBackend(supervisor, observer, redis, settings, registry)

        # A deadline on request heads and one-line logs for malformed requests (health/server.py).
        http = HttpServer(create_app(backend), settings.http_host, settings.port)
        try:
            await http.start()
        except OSError as exc:
            raise StartupError(f"cannot listen on {settings.http_host}:{settings.port}: "
                               f"{exc.strerror or exc}") from None
        # No await between the bind and here: no scrape can see the files of an earlier lifetime.
        try:
            archive.reset()
        except OSError as exc:
            raise StartupError(f"cannot use metrics directory {metrics_dir}: {exc.strerror or exc}") from None

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.request_stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: supervisor.request_reload("SIGHUP"))
        loop.add_signal_handler(signal.SIGCHLD, supervisor.wake)
        # After the port is bound (a port in use fails before anything starts); before the first turn.
        zygote = supervisor.zygote = Zygote.create(settings, supervisor.child_env, supervisor.wake)

        log.info("supervisor started", port=settings.port, host=settings.http_host, config=str(config_path),
                 pools={name: pool.processes for name, pool in config.pools.items()},
                 run_dir=str(run_dir), metrics_dir=str(metrics_dir))
        observer_task = asyncio.create_task(observer.run_forever(), name="redis-observer")
        await supervisor.run()
        log.info("supervisor stopped: every worker has exited")
        return EXIT_OK
    finally:
        if supervisor is not None:
            _terminate_leftovers(supervisor)
        if zygote is not None:
            zygote.close()
        if observer_task is not None:
            observer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await observer_task
        if http is not None:
            await http.close()
        if backend is not None:  # after the port: no request uses its database any more
            with contextlib.suppress(Exception):
                await backend.close()
        with contextlib.suppress(Exception):
            await redis.aclose()
        if own_run_dir:
            shutil.rmtree(run_dir, ignore_errors=True)
        metrics_lock.release()
        if own_metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)


def _terminate_leftovers(supervisor: Supervisor) -> None:
    """Leaving with workers alive can only mean the supervisor failed: let them drain on their own
    rather than be orphaned (PR_SET_PDEATHSIG would signal them too, on Linux)."""
    for handle in supervisor.handles():
        log.error("supervisor exiting with a worker still running; sending it SIGTERM", pool=handle.pool,
                  slot=handle.slot, worker_pid=handle.pid)
        handle.send(signal.SIGTERM)
