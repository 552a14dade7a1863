"""The systems under test behind one small interface: agentworker (its supervisor and client), ARQ, SAQ.

Each runs its workers in subprocesses on the bench's private Redis, with 10 jobs at once per process,
and offers: enqueue a no-op, a sleep or a rerun job (``bench/starts.py``; not SAQ), count unfinished jobs,
read back when each job started and finished. A job's start time is the task's own return value
(``time.time()`` at its first line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import psutil
import yaml
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.client import AgentWorkerClient
from agentworker.config import load_config
from agentworker.job_leases import lua_source
from agentworker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = 10


@dataclass(frozen=True, slots=True)
class JobTiming:
    started: float  # wall clock, seconds
    finished: float


def _base_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTWORKER_", "PROMETHEUS_", "BENCH_"))}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env["BENCH_REDIS_URL"] = redis_url
    env.update(extra)
    return env


class Subprocess:
    """A worker or supervisor process with its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)
        self.started = time.monotonic()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    async def stop(self, timeout: float = 20.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


async def wait_until(condition: Any, timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"bench: timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(interval)


class System(ABC):
    """One queue system under test."""

    key = ""
    title = ""

    def __init__(self, redis_url: str, workdir: Path) -> None:
        self.redis_url = redis_url
        self.workdir = workdir
        self.redis = Redis.from_url(redis_url)
        self.process: Subprocess | None = None

    async def close(self) -> None:
        await self.stop_workers()
        await self.redis.aclose()

    @abstractmethod
    def worker_argv(self) -> tuple[list[str], dict[str, str]]: ...

    async def start_workers(self, *, warm: bool = True) -> None:
        """Start the worker process(es); with ``warm``, return once a job has gone through."""
        argv, env = self.worker_argv()
        self.process = Subprocess(argv, env, self.workdir / f"{self.key}.log")
        if warm:
            ref = await self.enqueue("noop", "warmup", f"warmup-{time.monotonic_ns()}")
            await wait_until(lambda: self._done(ref), 60, f"{self.title} to run a first job", interval=0.02)

    async def _done(self, ref: str) -> bool:
        if self.process is not None and not self.process.alive():
            raise RuntimeError(f"{self.title} exited; see {self.process.log_path}")
        return bool(await self.timings([ref]))

    async def stop_workers(self) -> None:
        if self.process is not None:
            await self.process.stop()
            self.process = None

    def worker_pids(self) -> list[int]:
        return [self.process.pid] if self.process is not None and self.process.alive() else []

    @abstractmethod
    async def enqueue(self, kind: str, tenant: str, key: str, seconds: float = 0.0) -> str:
        """Enqueue a ``noop`` or ``sleep`` job; return a reference for :meth:`timings`."""

    @abstractmethod
    async def remaining(self) -> int:
        """Jobs enqueued and not finished."""

    @abstractmethod
    async def timings(self, refs: list[str]) -> dict[str, JobTiming]:
        """When each finished job started and finished (unfinished ones are left out)."""


# -- agentworker ----------------------------------------------------------------------------------------


class AgentWorker(System):
    """``agentworker run`` with one pool ``bench`` of 10 jobs at once per process, and the real client;
    ``tenant_defaults`` and ``tenants`` go to the quota file as they are (caps, weights)."""

    key = "agentworker"
    title = "agentworker"
    tasks: ClassVar[dict[str, str]] = {"noop": "bench_noop", "sleep": "bench_sleep", "rerun": "bench_rerun"}

    def __init__(self, redis_url: str, workdir: Path, *, processes: int = 1, shards: int = 8,
                 env: dict[str, str] | None = None, title: str | None = None,
                 tenant_defaults: dict[str, Any] | None = None,
                 tenants: dict[str, dict[str, Any]] | None = None) -> None:
        super().__init__(redis_url, workdir)
        self.processes = processes
        self.shards = shards
        self.extra_env = env or {}
        if title:
            self.title = title
        self.config_path = workdir / f"quotas-{id(self)}.yaml"
        self.config_path.write_text(yaml.safe_dump({
            "default_pool": "bench",
            "pools": {"bench": {"shards": shards, "processes": processes, "concurrency": CONCURRENCY,
                                "job_timeout": 60, "max_tries": 3, "memory_limit_mb": 4096,
                                "max_jobs_per_process": 10_000_000}},
            "tenants": tenants or {},
            **({"tenant_defaults": tenant_defaults} if tenant_defaults else {}),
        }))
        self.config = load_config(self.config_path)
        self.client = AgentWorkerClient(self.redis, self.config, Settings(redis_url=redis_url))
        self._depth = self.redis.register_script(lua_source("depth"))
        self.port = 0
        self.metrics_dir = workdir / f"metrics-{id(self)}"
        self.http: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_argv(self) -> tuple[list[str], dict[str, str]]:
        from bench.redis_server import free_port

        self.port = free_port()
        env = _base_env(self.redis_url, **{
            "AGENTWORKER_REDIS_URL": self.redis_url,
            "AGENTWORKER_TASK_MODULES": "bench.tasks",
            "AGENTWORKER_HTTP_HOST": "127.0.0.1",
            "AGENTWORKER_RUN_DIR": str(self.workdir / f"run-{id(self)}"),
            "AGENTWORKER_METRICS_DIR": str(self.metrics_dir),
            "AGENTWORKER_SHUTDOWN_GRACE": "5",
            "AGENTWORKER_CONFIG_POLL_INTERVAL": "0",
            **self.extra_env,
        })
        return [sys.executable, "-m", "agentworker", "run", "--config", str(self.config_path),
                "--port", str(self.port)], env

    async def start_workers(self, *, warm: bool = True) -> None:
        await super().start_workers(warm=False)
        self.http = aiohttp.ClientSession()
        if warm:
            await self.wait_serving()
            ref = await self.enqueue("noop", "warmup", f"warmup-{time.monotonic_ns()}")
            await wait_until(lambda: self._done(ref), 60, "agentworker to run a first job", interval=0.02)

    async def stop_workers(self) -> None:
        if self.http is not None:
            await self.http.close()
            self.http = None
        await super().stop_workers()

    async def status(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(self.url + "/status") as response:
            return dict(await response.json())

    async def serving_pids(self) -> list[int]:
        try:
            status = await self.status()
        except (aiohttp.ClientError, OSError):
            return []
        return [r["pid"] for r in status["processes"] if r["role"] == "current" and r["state"] == "serving"]

    async def wait_serving(self, timeout: float = 60) -> list[int]:
        pids: list[int] = []

        async def serving() -> bool:
            if self.process is not None and not self.process.alive():
                raise RuntimeError(f"agentworker exited; see {self.process.log_path}")
            pids[:] = await self.serving_pids()
            return len(pids) == self.processes

        await wait_until(serving, timeout, "agentworker's workers to serve", interval=0.02)
        return pids

    def worker_pids(self) -> list[int]:
        if self.process is None:
            return []
        try:
            children = psutil.Process(self.process.pid).children()
        except psutil.NoSuchProcess:
            return []
        return [c.pid for c in children if "agentworker.pools.worker" in " ".join(_cmdline(c))]

    def zygote_pid(self) -> int | None:
        if self.process is None:
            return None
        with contextlib.suppress(psutil.NoSuchProcess):
            for child in psutil.Process(self.process.pid).children():
                if "agentworker zygote" in " ".join(_cmdline(child)):
                    return int(child.pid)
        return None

    async def scrape(self) -> tuple[float, int]:
        """One GET /metrics: seconds it took and bytes received."""
        assert self.http is not None
        started = time.perf_counter()
        async with self.http.get(self.url + "/metrics") as response:
            body = await response.read()
        return time.perf_counter() - started, len(body)

    async def enqueue(self, kind: str, tenant: str, key: str, seconds: float = 0.0) -> str:
        payload = {} if kind == "noop" else {"seconds": seconds}
        job = await self.client.enqueue(self.tasks[kind], tenant_id=tenant, payload=payload, idempotency_key=key)
        return job.job_id

    async def remaining(self) -> int:
        """Queued jobs (every tenant queue and the inbox of each shard, read by the supervisor's own depth
        script) plus running ones: a claimed job leaves its tenant queue for the shard's running set."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for shard in range(self.shards):
                await self._depth(keys=[keys.ready_tenants("bench", shard), keys.waiting_tenants("bench", shard),
                                        keys.capped_tenants("bench", shard), keys.queue("bench", shard)],
                                  args=[keys.shard_id("bench", shard), 100_000], client=pipe)
                pipe.zcard(keys.running_jobs("bench", shard))
            replies = await pipe.execute()
        return sum(int(r[1]) if isinstance(r, list) else int(r) for r in replies)

    async def queued(self, tenant: str) -> int:
        """Jobs of ``tenant`` queued (not running) in its shard."""
        return int(await self.redis.zcard(keys.tenant_queue("bench", self.route_shard(tenant), tenant)))

    async def timings(self, refs: list[str]) -> dict[str, JobTiming]:
        found: dict[str, JobTiming] = {}
        for chunk in _chunks(refs, 1000):
            raws = await self.redis.mget([jobs.result_key(ref) for ref in chunk])
            for ref, raw in zip(chunk, raws, strict=True):
                if raw is None:
                    continue
                record = jobs.loads(raw)
                result = record.get("r")
                started = float(result) if isinstance(result, int | float) else record.get("st", 0) / 1000
                found[ref] = JobTiming(started, record.get("ft", 0) / 1000)
        return found

    def route_shard(self, tenant: str) -> int:
        return self.client.route(tenant).shard


# -- ARQ ------------------------------------------------------------------------------------------------


class Arq(System):
    """Plain ARQ 0.28 (``python -m arq``), defaults or tuned (see ``bench/arq_app.py``); ``settings`` names
    another settings class there (by its prefix, e.g. ``Crash``), ``env`` adds to the worker's environment."""

    def __init__(self, redis_url: str, workdir: Path, *, tuned: bool, settings: str = "",
                 env: dict[str, str] | None = None) -> None:
        super().__init__(redis_url, workdir)
        self.tuned = tuned
        self.key = "arq-tuned" if tuned else "arq-default"
        self.title = "ARQ tuned" if tuned else "ARQ default"
        self.settings = f"bench.arq_app.{settings}{'Tuned' if tuned else 'Default'}Settings"
        self.extra_env = env or {}
        self._pool: Any = None

    def worker_argv(self) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-m", "arq", self.settings], _base_env(self.redis_url, **self.extra_env)

    async def pool(self) -> Any:
        if self._pool is None:
            from arq.connections import RedisSettings, create_pool

            self._pool = await create_pool(RedisSettings.from_dsn(self.redis_url))
        return self._pool

    async def close(self) -> None:
        await super().close()
        if self._pool is not None:
            await self._pool.aclose()

    async def enqueue(self, kind: str, tenant: str, key: str, seconds: float = 0.0) -> str:
        pool = await self.pool()
        ref = f"{tenant}:{key}"
        if kind == "noop":
            await pool.enqueue_job("noop", _job_id=ref)
        else:  # "sleep", or "rerun" (bench/arq_app.py with its Crash settings)
            await pool.enqueue_job(kind, seconds, _job_id=ref)
        return ref

    async def remaining(self) -> int:
        from arq.constants import default_queue_name

        return int(await self.redis.zcard(default_queue_name))

    async def timings(self, refs: list[str]) -> dict[str, JobTiming]:
        from arq.constants import result_key_prefix
        from arq.jobs import deserialize_result

        found: dict[str, JobTiming] = {}
        for chunk in _chunks(refs, 1000):
            raws = await self.redis.mget([result_key_prefix + ref for ref in chunk])
            for ref, raw in zip(chunk, raws, strict=True):
                if raw is None:
                    continue
                info = deserialize_result(raw)
                started = float(info.result) if isinstance(info.result, float) else info.start_time.timestamp()
                found[ref] = JobTiming(started, info.finish_time.timestamp())
        return found


# -- SAQ ------------------------------------------------------------------------------------------------


class Saq(System):
    """SAQ (``python -m saq``) with 10 jobs at once (see ``bench/saq_app.py``)."""

    key = "saq"
    title = "SAQ"

    def __init__(self, redis_url: str, workdir: Path) -> None:
        super().__init__(redis_url, workdir)
        from saq import Queue

        self.queue = Queue.from_url(redis_url)

    def worker_argv(self) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, "-m", "saq", "bench.saq_app.settings"], _base_env(self.redis_url)

    async def close(self) -> None:
        await super().close()
        await self.queue.disconnect()

    async def enqueue(self, kind: str, tenant: str, key: str, seconds: float = 0.0) -> str:
        ref = f"{tenant}:{key}"
        if kind == "sleep":
            await self.queue.enqueue("sleep", key=ref, seconds=seconds)
        else:
            await self.queue.enqueue("noop", key=ref)
        return ref

    async def remaining(self) -> int:
        return int(await self.queue.count("incomplete"))

    async def timings(self, refs: list[str]) -> dict[str, JobTiming]:
        found: dict[str, JobTiming] = {}
        for chunk in _chunks(refs, 1000):
            for ref, job in zip(chunk, await self.queue.jobs(chunk), strict=True):
                if job is None or not job.completed:
                    continue
                started = float(job.result) if isinstance(job.result, float) else job.started / 1000
                found[ref] = JobTiming(started, job.completed / 1000)
        return found


@dataclass(frozen=True)
class SystemFactory:
    """Makes a system by key (picklable: the noisy-neighbour flood runs in another process)."""

    redis_url: str
    workdir: Path

    def __call__(self, key: str) -> System:
        if key == "agentworker":
            return AgentWorker(self.redis_url, self.workdir)
        if key in ("arq-default", "arq-tuned"):
            return Arq(self.redis_url, self.workdir, tuned=key == "arq-tuned")
        if key == "saq":
            return Saq(self.redis_url, self.workdir)
        raise ValueError(f"unknown system {key!r}")


def saq_available() -> bool:
    try:
        import saq  # noqa: F401
    except ImportError:
        return False
    return True


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _cmdline(proc: psutil.Process) -> list[str]:
    try:
        return proc.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return []
