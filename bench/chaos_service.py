"""The chaos scenario's service and its faults: ``agentworker run`` on a fixed port, and what is done to it.

:class:`Service` starts the real supervisor (with its worker processes) and starts it again on the same
port after a SIGTERM. :class:`FaultInjector` kills -9 a random serving worker every
:data:`KILL_EVERY_S` and injects the :data:`ONE_OFF_FAULTS` once each, in order, at their fraction of the
expected duration: a Redis restart, a supervisor restart, a PostgreSQL restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench.postgres_server import PrivatePostgres
from bench.redis_server import PrivateRedis, free_port
from bench.systems import ROOT, Subprocess

KILL_EVERY_S = 2.0
#: the one-off faults, in order, at these fractions of the expected (fault-free) wall time
ONE_OFF_FAULTS = (("redis restart", 0.25), ("supervisor restart", 0.50), ("postgres restart", 0.75))


def log(message: str) -> None:
    print(message, flush=True)


class Service:
    """``agentworker run`` on a fixed port (``AGENTWORKER_PORT``), one log file per start."""

    def __init__(self, workdir: Path, name: str, config_path: Path, env: dict[str, str], *, processes: int) -> None:
        self.workdir = workdir
        self.name = name
        self.processes = processes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = config_path
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("AGENTWORKER_")},
                    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
                    **env, "AGENTWORKER_PORT": str(self.port),
                    "AGENTWORKER_RUN_DIR": str(workdir / f"{name}-run"),
                    "AGENTWORKER_METRICS_DIR": str(workdir / f"{name}-metrics")}
        self.process: Subprocess | None = None
        self.logs: list[Path] = []
        self.http: aiohttp.ClientSession | None = None

    def start(self) -> None:
        path = self.workdir / f"{self.name}-supervisor-{len(self.logs) + 1}.log"
        self.logs.append(path)
        self.process = Subprocess([sys.executable, "-m", "agentworker", "run", "--config", str(self.config_path)],
                                  self.env, path)

    async def status(self) -> dict[str, Any] | None:
        """``GET /status``, or None while the supervisor does not answer."""
        if self.http is None:
            self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3))
        try:
            async with self.http.get(self.url + "/status") as response:
                if response.status != 200:
                    return None
                return dict(await response.json())
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
            return None

    async def serving_pids(self) -> list[int]:
        status = await self.status()
        if status is None:
            return []
        return [int(r["pid"]) for r in status.get("processes", [])
                if r.get("role") == "current" and r.get("state") == "serving" and r.get("pid")]

    async def wait_serving(self, timeout: float) -> bool:
        """Wait until every worker process serves; False after ``timeout``. Raises if the supervisor exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is None or not self.process.alive():
                raise RuntimeError(f"agentworker run exited; see {self.logs[-1]}")
            if len(await self.serving_pids()) >= self.processes:
                return True
            await asyncio.sleep(0.2)
        return False

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (its workers drain); SIGKILL after ``timeout``; then any process of it left over."""
        if self.process is None:
            return
        descendants = _descendants(self.process.pid)
        await self.process.stop(timeout)
        for proc in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    log(f"  {proc.pid} ({' '.join(proc.cmdline()[:4])}) outlived its supervisor: killed")
                    proc.kill()
        self.process = None

    async def close(self) -> None:
        await self.stop()
        if self.http is not None:
            await self.http.close()
            self.http = None


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return list(psutil.Process(pid).children(recursive=True))
    except psutil.NoSuchProcess:
        return []


@dataclass
class Fault:
    name: str
    at_s: float = 0.0        # since the first enqueue
    took_s: float = 0.0
    unsettled: int | None = None  # runs not settled when it began (as of the last tally)
    error: str | None = None


@dataclass
class FaultInjector:
    """The faults of one phase, from :meth:`kill_workers` and :meth:`one_offs`, both ending once ``done``."""

    service: Service
    redis: PrivateRedis
    postgres: PrivatePostgres
    rng: random.Random
    kills: list[dict[str, Any]] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # no kill while the supervisor restarts

    async def kill_workers(self, began: float, done: asyncio.Event) -> None:
        """Every :data:`KILL_EVERY_S`, SIGKILL one of the workers ``/status`` lists as serving."""
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), KILL_EVERY_S)
                return
            async with self.lock:
                pids = await self.service.serving_pids()
                if not pids:
                    continue
                victim = self.rng.choice(pids)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
                    self.kills.append({"pid": victim, "at_s": round(time.monotonic() - began, 2)})

    async def one_offs(self, began: float, expected_s: float, done: asyncio.Event,
                       unsettled: Callable[[], int]) -> None:
        """Each of :data:`ONE_OFF_FAULTS` once, in order, at its fraction of ``expected_s`` (or right after the
        one before it, if that took longer); those not yet due when ``done`` is set are skipped."""
        actions: dict[str, Callable[[], Awaitable[None]]] = {
            "redis restart": lambda: asyncio.to_thread(self.redis.restart),
            "supervisor restart": self._restart_supervisor,
            "postgres restart": lambda: asyncio.to_thread(self.postgres.restart, "fast"),
        }
        for name, fraction in ONE_OFF_FAULTS:
            wait = began + fraction * expected_s - time.monotonic()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), wait)
            fault = Fault(name, at_s=round(time.monotonic() - began, 2), unsettled=unsettled())
            self.faults.append(fault)
            if done.is_set():
                fault.error = "not injected: every run had settled"
                continue
            log(f"  fault at {fault.at_s:.0f} s: {name} ({fault.unsettled} runs unsettled)")
            started = time.monotonic()
            try:
                await actions[name]()
            except Exception as exc:  # reported, and the run goes on: the next faults still matter
                fault.error = f"{type(exc).__name__}: {exc}"
                log(f"  fault {name} went wrong: {fault.error}")
            fault.took_s = round(time.monotonic() - started, 2)

    async def _restart_supervisor(self) -> None:
        async with self.lock:
            await self.service.stop(timeout=60)
            self.service.start()
            if not await self.service.wait_serving(90):
                raise RuntimeError(f"the restarted supervisor had not {self.service.processes} workers serving "
                                   "after 90 s")
