"""The worker process: serves every shard queue of one pool.

    python -m agentworker.pools.worker --config FILE --pool NAME --slot N [--status-file PATH]

One event loop (uvloop) runs one job loop per shard queue (:class:`ShardWorker`), all sharing one
Redis client, one process-wide cap of ``concurrency`` jobs (:class:`ConcurrencyGate`, round-robin between
shards with work) and one set of leases (:class:`Leases`: a short lease per running job, renewed, and the
tenant leases of ``max_concurrency``). Its lease holder id is ``{hostname}:{pid}``, which is how the
supervisor releases its jobs the moment it reaps it.

Wake-ups: the enqueue script publishes the queue name on ``agentworker:wakeup:{pool}``; the process
listens and polls that shard at once, so polling (``AGENTWORKER_POLL_INTERVAL``) is only a fallback.

Cancel requests (:mod:`agentworker.job_control`): twice a second, while jobs run, one ``ZMSCORE`` of their
ids in ``arq:abort``; a requested job's task is cancelled and the job ends for good as ``JobCancelled``
(not the re-queue of a drain).

Signals (handlers only set flags; the main loop acts):

* SIGTERM / SIGINT: stop taking jobs, give running jobs ``AGENTWORKER_SHUTDOWN_GRACE`` seconds, cancel the
  rest (each is re-queued at once, without spending a try, and its leases dropped), exit 0.
* SIGHUP: re-read the quota file; tenant limits apply at once. A bad file is logged and ignored. Pool
  settings (shards, concurrency) are the supervisor's to change, by replacing the process.

``--status-file``: every second the event loop rewrites this JSON file (pid, state, jobs served, jobs
running, Redis health, a timestamp). A stale timestamp means the loop is blocked: that is the heartbeat
the supervisor watches.

Exit codes: 0 clean stop, 2 bad configuration or arguments, 3 crashed loop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from arq.connections import ArqRedis
from arq.worker import Function, func
from redis.exceptions import RedisError

from agentworker import catalog, jobs, keys, metrics
from agentworker.config import ConfigError, QuotaConfig, load_config, resolve_config_path
from agentworker.event_outbox import relay_forever
from agentworker.events import EventPublisher
from agentworker.job_control import cancel_requests
from agentworker.job_leases import publish_limits, quota_file_version
from agentworker.logs import configure_logging, get_logger
from agentworker.pools.arq_internals import ShardWorker
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import Leases
from agentworker.schedules.dispatcher import dispatch_forever
from agentworker.settings import Settings, SettingsError
from agentworker.tasks.context import JobRuntime
from agentworker.tasks.envelope import FinalFailure, make_job_function, make_reject_function, report_final_failure
from agentworker.tasks.registry import TaskRegistry, load_task_modules
from agentworker.tasks.run_sweeper import sweep_forever
from agentworker.tenants import sync_forever

log = get_logger("agentworker.worker")

EXIT_OK, EXIT_CONFIG, EXIT_CRASH = 0, 2, 3
STATUS_INTERVAL_S = 1.0
#: how often the cancel requests of running jobs are looked at
CANCEL_CHECK_INTERVAL_S = 0.5


def build_functions(registry: TaskRegistry, job_timeout: float) -> list[Function]:
    """One ARQ function per task, each wrapped in the envelope. ARQ's own timeout is a backstop one
    second above the pool's: the envelope's tighter per-tenant deadline fires first."""
    functions = [func(make_job_function(task), name=task.name, timeout=job_timeout + 1)  # type: ignore[arg-type]
                 for task in registry]
    functions.append(func(make_reject_function(), name=jobs.REJECT_TASK, timeout=job_timeout + 1))  # type: ignore[arg-type]
    return functions


async def dispatch_schedules(runtime: JobRuntime) -> None:
    """This process's schedule dispatcher (:mod:`agentworker.schedules.dispatcher`), on the database pool
    its jobs use and a submitter borrowing its Redis client.

    ``AGENTWORKER_SCHEDULER=off`` turns it off in this process (dispatch stays exactly once however many
    processes run it; turning it off only saves their database queries)."""
    if runtime.settings.scheduler == "off":
        return

    await dispatch_forever(runtime.database, runtime.submitter)


class WorkerProcess:
    """Everything one worker process runs; :meth:`serve` returns the exit code."""

    def __init__(self, *, settings: Settings, config: QuotaConfig, pool: str, slot: int,
                 registry: TaskRegistry, status_file: Path | None = None) -> None:
        self.settings = settings
        self.config = config
        self.pool_name = pool
        self.slot = slot
        self.registry = registry
        self.status_file = status_file
        self.state = "starting"
        self.jobs_served = 0
        self.started_at = time.time()
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._publishing: set[asyncio.Task[None]] = set()

    # -- signals (flags only) --------------------------------------------------------------------------

    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    # -- main ------------------------------------------------------------------------------------------

    async def serve(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

        pool = self.config.pools[self.pool_name]
        redis = ArqRedis.from_url(self.settings.redis_url, socket_connect_timeout=5, socket_timeout=15,
                                  health_check_interval=30)
        self.redis = redis
        self.runtime = JobRuntime(pool=self.pool_name, slot=self.slot, settings=self.settings, redis=redis,
                                  events=EventPublisher(redis, stream_maxlen=self.settings.event_stream_maxlen),
                                  config=self.config)
        self.runtime.task_names = frozenset(self.registry.names())
        metrics.zero_job_series(self.pool_name, self.runtime.task_names, sorted(self.config.tenants))
        self.pool_quota = pool
        self.gate = ConcurrencyGate(pool.concurrency)
        self.leases = Leases(redis, job_ttl_s=self.settings.job_lease_ttl, tenant_ttl_s=self.settings.tenant_lease_ttl)
        decoder = jobs.WorkerJobDecoder(self.registry.names(), self.settings.max_payload_bytes)
        functions = build_functions(self.registry, pool.job_timeout)
        self.workers = [
            ShardWorker(
                functions=functions, queue_name=keys.queue(self.pool_name, shard), pool_name=self.pool_name,
                shard=shard, redis=redis, gate=self.gate, leases=self.leases, pool_quota=lambda: self.pool_quota,
                on_deferred=self._deferred, on_done=self._job_done,
                on_final_failure=self._final_failure, on_dead_letter=self._dead_letter,
                keep_result=self.settings.keep_result, poll_delay=self.settings.poll_interval,
                job_serializer=jobs.dumps, job_deserializer=decoder, ctx={"runtime": self.runtime},
            )
            for shard in range(pool.shards)
        ]
        self._by_queue = {w.queue_name: w for w in self.workers}
        await self._publish_limits()
        background = [
            asyncio.create_task(self.leases.renew_forever(self._leases_lost), name="lease-renewal"),
            asyncio.create_task(self._listen_for_wakeups(), name="wakeups"),
            # Cancel requests of the jobs running here (agentworker.job_control): looked at twice a second.
            asyncio.create_task(self._watch_cancel_requests(), name="cancel-requests"),
            asyncio.create_task(self._write_status_forever(), name="status"),
            # Tenant schedules: every worker process dispatches (see agentworker.schedules.dispatcher).
            asyncio.create_task(dispatch_schedules(self.runtime), name="schedule-dispatcher"),
            # Workflow runs left `running` with no job behind them: one process at a time fails them.
            asyncio.create_task(sweep_forever(self.runtime), name="run-sweeper"),
            # Promised events whose process died (or is still waiting for Redis): one process relays them.
            asyncio.create_task(relay_forever(redis, self.runtime.database, self.runtime.events), name="event-relay"),
            # Tenant-store changes: this process's cache drops what changed; one process copies the store to
            # Redis (what a setter could not, everything after Redis lost it).
            asyncio.create_task(self.runtime.tenants.listen_forever(), name="tenant-changes"),
            # The task and tool names this process serves: saving a schedule or a workflow checks them.
            asyncio.create_task(self._publish_catalog_forever(), name="catalog"),
            asyncio.create_task(sync_forever(redis, self.runtime.database, lambda: self.runtime.config),
                                name="tenant-sync"),
        ]
        mains = [asyncio.create_task(w.main(), name=f"shard-{w.shard}") for w in self.workers]
        self.state = "serving"
        log.info("worker serving", queues=len(self.workers), concurrency=pool.concurrency,
                 tasks=sorted(self.registry.names()))
        exit_code = EXIT_OK
        try:
            exit_code = await self._run_until_stopped(mains)
        finally:
            await self._drain(mains, background)
            await self.runtime.resources.aclose(log)  # the event outbox first: its last publications
            await self.runtime.events.flush(timeout=2.0)  # what the jobs published, before Redis closes
            with contextlib.suppress(RedisError, OSError):
                await redis.aclose()
        log.info("worker stopped", jobs_served=self.jobs_served, exit_code=exit_code)
        return exit_code

    async def _run_until_stopped(self, mains: list[asyncio.Task[None]]) -> int:
        stop_wait = asyncio.ensure_future(self._stop.wait())
        try:
            while True:
                reload_wait = asyncio.ensure_future(self._reload.wait())
                done, _ = await asyncio.wait([stop_wait, reload_wait, *mains],
                                             return_when=asyncio.FIRST_COMPLETED)
                if stop_wait in done:
                    reload_wait.cancel()
                    return EXIT_OK
                crashed = [t for t in mains if t in done]
                if crashed:
                    reload_wait.cancel()
                    for task in crashed:
                        exc = None if task.cancelled() else task.exception()
                        log.error("shard loop crashed", task=task.get_name(), error=repr(exc))
                    return EXIT_CRASH
                self._reload.clear()
                self.reload_config()
        finally:
            stop_wait.cancel()

    def reload_config(self) -> None:
        """SIGHUP: re-read the quota file in a thread (a big file must not stall the shards, the lease
        renewals and the heartbeat) with the very function the supervisor validated it with, and take it.
        A file that is refused for any reason keeps the running config, with one log line: a reload
        never ends the process. A newer SIGHUP supersedes a read still under way."""
        for task in self._publishing:
            if task.get_name() == "quota-file-reload":
                task.cancel()

        async def read_and_take() -> None:
            try:
                new = await asyncio.to_thread(load_config, self.settings.config, limits=self.settings.limits)
            except ConfigError as exc:
                log.error("quota file reload refused; keeping the running config", errors=exc.errors)
                return
            except Exception as exc:  # never a dead worker over a quota file
                log.error("quota file reload refused; keeping the running config",
                          errors=[f"cannot load the file: {type(exc).__name__}: {exc}"])
                return
            if self.pool_name not in new.pools:
                log.warning("reloaded quota file no longer has this pool; keeping it until replaced")
                return
            self.config = new
            self.runtime.config = new
            self.pool_quota = new.pools[self.pool_name]
            log.info("quota file reloaded", tenants=len(new.tenants))
            task = asyncio.create_task(self._publish_limits())
            self._publishing.add(task)
            task.add_done_callback(self._publishing.discard)

        reading = asyncio.create_task(read_and_take(), name="quota-file-reload")
        self._publishing.add(reading)
        reading.add_done_callback(self._publishing.discard)

    async def _publish_limits(self) -> None:
        """Tenant caps and weights as the claim script reads them (the newest quota file wins)."""
        try:
            written = await publish_limits(self.redis, self.config, self.pool_name,
                                           quota_file_version(resolve_config_path(self.settings.config)))
        except (RedisError, OSError) as exc:  # the supervisor publishes them too, and we retry on reload
            log.warning("cannot publish tenant limits", error=str(exc))
            return
        if not written:
            log.warning("a newer quota file's tenant limits are in Redis; keeping them")

    async def _drain(self, mains: list[asyncio.Task[None]], background: list[asyncio.Task[Any]]) -> None:
        self.state = "draining"
        for worker in self.workers:
            worker.stop_picking()
        self.gate.close()
        running = sum(w.running for w in self.workers)
        grace = self.settings.shutdown_grace
        log.info("draining", running=running, grace_s=grace)
        self._write_status()
        idle = asyncio.gather(*(w.wait_idle() for w in self.workers))
        try:
            await asyncio.wait_for(asyncio.shield(idle), grace)
        except TimeoutError:
            cancelled = sum(w.cancel_running() for w in self.workers)
            log.warning("grace period over; cancelled running jobs, they will run again", cancelled=cancelled)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(idle, 10)
        for task in mains + background:
            task.cancel()
        await asyncio.gather(*mains, *background, return_exceptions=True)
        self.state = "stopped"
        self._write_status()

    # -- jobs ------------------------------------------------------------------------------------------

    def _deferred(self, tenant_id: str) -> None:
        metrics.JOBS_DEFERRED.labels(self.pool_name, metrics.tenant_label(self.runtime.config, tenant_id)).inc()
        log.debug("tenant at max_concurrency; job deferred", tenant_id=tenant_id)

    async def _publish_catalog_forever(self) -> None:
        # The tool registry (the built-in tools and those of the task modules) is imported in a thread, a
        # moment after start: importing it on the loop could stall it for seconds on a busy host, past
        # the job leases' renewals.
        await asyncio.sleep(1.0)
        tools_module = await asyncio.to_thread(importlib.import_module, "agentworker.tools")
        TOOLS = tools_module.TOOLS

        while True:
            try:
                await catalog.publish(self.runtime.redis, self.registry.names(),
                                      ((t.name, t.tenants) for t in TOOLS.all()))
            except (RedisError, OSError) as exc:
                log.debug("catalog not published", error=str(exc))
                await asyncio.sleep(5.0)
                continue
            await asyncio.sleep(catalog.REFRESH_S)

    def _job_done(self, job_id: str) -> None:
        self.jobs_served += 1

    async def _final_failure(self, failure: FinalFailure) -> None:
        await report_final_failure(self.runtime, self.registry, failure)

    def _dead_letter(self, reason: str, job_id: str) -> None:
        metrics.DEAD_LETTERS_TOTAL.labels(self.pool_name, reason).inc()

    def _leases_lost(self, job_ids: list[str]) -> None:
        for job_id in job_ids:
            for worker in self.workers:
                if worker.lease_lost(job_id):
                    metrics.JOB_LEASES_LOST.labels(self.pool_name).inc()
                    break
            else:
                self.leases.forget(job_id)

    async def _watch_cancel_requests(self) -> None:
        """Every :data:`CANCEL_CHECK_INTERVAL_S`, while jobs run here: one ``ZMSCORE`` of their ids in the
        cancel requests (``arq:abort``); a requested one is cancelled (:meth:`ShardWorker.request_cancel`).
        Polling rather than pub/sub: a request made while this process was not listening (a Redis blip, a
        restart) is still seen, and the cost is one command per half second, only while jobs run."""
        failing = False
        while True:
            await asyncio.sleep(CANCEL_CHECK_INTERVAL_S)
            running = [job_id for worker in self.workers for job_id in worker.running_job_ids()]
            if not running:
                continue
            try:
                found = await cancel_requests(self.redis, running)
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("cannot read cancel requests; retrying", error=str(exc))
                failing = True
                continue
            failing = False
            for job_id, (requested_at_ms, by) in found.items():
                for worker in self.workers:
                    if worker.request_cancel(job_id, requested_at_ms, by):
                        break

    # -- wake-ups and status ---------------------------------------------------------------------------

    async def _listen_for_wakeups(self) -> None:
        channel = keys.wakeup_channel(self.pool_name)
        backoff = 0.5
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(channel)
                backoff = 0.5
                # A missed wake-up only costs a poll interval; after (re)subscribing, poll everything once.
                for worker in self.workers:
                    worker.wake()
                async for message in pubsub.listen():
                    data = message.get("data")
                    queue = data.decode() if isinstance(data, bytes) else str(data)
                    if queue == "*":  # the supervisor released a dead worker's jobs: any shard may have some
                        for worker in self.workers:
                            worker.wake()
                        continue
                    target = self._by_queue.get(queue)
                    if target is not None:
                        target.wake()
            except (RedisError, OSError):
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "holder": self.leases.holder if hasattr(self, "leases") else None,
            "pool": self.pool_name, "slot": self.slot, "state": self.state,
            "ts": time.time(), "started_at": self.started_at, "jobs_served": self.jobs_served,
            "running": sum(w.running for w in getattr(self, "workers", [])),
            "redis_ok": all(w.redis_healthy for w in getattr(self, "workers", [])),
        }

    def _write_status(self) -> None:
        if self.status_file is None:
            return
        tmp = self.status_file.with_name(self.status_file.name + ".tmp")
        try:
            tmp.write_text(json.dumps(self.status()))
            os.replace(tmp, self.status_file)
        except OSError as exc:
            log.warning("cannot write status file", path=str(self.status_file), error=str(exc))

    async def _write_status_forever(self) -> None:
        while True:
            self._write_status()
            await asyncio.sleep(STATUS_INTERVAL_S)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m agentworker.pools.worker",
                                     description="Serve every shard queue of one pool.")
    parser.add_argument("--config", help="quota file (default: AGENTWORKER_CONFIG, else the packaged one)")
    parser.add_argument("--pool", required=True, help="pool to serve")
    parser.add_argument("--slot", type=int, default=0, help="slot number of this process in its pool")
    parser.add_argument("--status-file", type=Path, help="heartbeat/status JSON file to keep fresh")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        settings = Settings.from_env(config=args.config)
        config = load_config(settings.config)
    except (ConfigError, SettingsError) as exc:
        print(f"agentworker worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.pool not in config.pools:
        print(f"agentworker worker: pool {args.pool!r} is not in the quota file "
              f"(pools: {', '.join(sorted(config.pools))})", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(settings.log_level, settings.log_format, pool=args.pool, slot=args.slot)
    try:
        registry = load_task_modules(settings.task_modules)
    except ImportError as exc:
        print(f"agentworker worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    process = WorkerProcess(settings=settings, config=config, pool=args.pool, slot=args.slot,
                            registry=registry, status_file=args.status_file)
    return run_event_loop(process.serve())


def run_event_loop(main_coro: Any) -> int:
    """Run on uvloop where it is installed."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported platform
        return int(asyncio.run(main_coro))
    return int(uvloop.run(main_coro))


if __name__ == "__main__":
    sys.exit(main())
