"""Run the real ``agentworker run`` in a subprocess and talk to it as users do: HTTP, Redis, signals."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, free_port, wait_for, worker_env

#: fast settings for tests: short drains, short backoff ceiling, quick quota file polling
FAST_ENV = {
    "AGENTWORKER_SHUTDOWN_GRACE": "3",
    "AGENTWORKER_RESTART_BACKOFF_INITIAL": "0.5",
    "AGENTWORKER_RESTART_BACKOFF_MAX": "4",
    "AGENTWORKER_CONFIG_POLL_INTERVAL": "0.5",
    "AGENTWORKER_HTTP_HOST": "127.0.0.1",
    "AGENTWORKER_READY_TIMEOUT": "1",
}

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


class SupervisorProcess:
    """``python -m agentworker run`` with its own port, run and metrics directories and a log file."""

    def __init__(self, config: Path, redis_url: str, workdir: Path, name: str = "sup",
                 wrapper: Sequence[str] = (), **env: str) -> None:
        """``wrapper``: a command to run the supervisor under (e.g. ``unshare ... --fork``)."""
        self.name = name
        self.wrapper = list(wrapper)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.metrics_dir = workdir / f"{name}-metrics"
        self.run_dir = workdir / f"{name}-run"
        self.log_path = workdir / f"{name}-{time.monotonic_ns()}.log"
        self.env = worker_env(redis_url, **{**FAST_ENV, "AGENTWORKER_METRICS_DIR": str(self.metrics_dir),
                                            "AGENTWORKER_RUN_DIR": str(self.run_dir), **env})
        self.worker_pids: set[int] = set()
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*wrapper, sys.executable, "-m", "agentworker", "run", "--config", str(config), "--port", str(self.port)],
            env=self.env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def supervisor_pid(self) -> int:
        """The supervisor's own pid (under a wrapper such as unshare --fork, the wrapper's child)."""
        if not self.wrapper:
            return self.proc.pid
        try:
            children = psutil.Process(self.proc.pid).children()
        except psutil.NoSuchProcess:
            children = []
        return children[0].pid if children else self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- HTTP ----------------------------------------------------------------------------------------------

    def _request(self, path: str, method: str, token: str | None) -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(self.url + path, method=method, data=b"" if method == "POST" else None)
        if token is not None:
            request.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    async def request(self, path: str, method: str = "GET", token: str | None = None
                      ) -> tuple[int, dict[str, str], bytes]:
        return await asyncio.to_thread(self._request, path, method, token)

    async def get_json(self, path: str, method: str = "GET", token: str | None = None) -> tuple[int, Any]:
        code, _headers, body = await self.request(path, method, token)
        return code, json.loads(body)

    async def status(self) -> dict[str, Any]:
        code, document = await self.get_json("/status")
        assert code == 200
        for row in document["processes"]:
            if row["pid"] is not None:
                self.worker_pids.add(row["pid"])
        return document  # type: ignore[no-any-return]

    async def metrics(self) -> Samples:
        code, _headers, body = await self.request("/metrics")
        assert code == 200
        samples: Samples = {}
        for family in text_string_to_metric_families(body.decode()):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return samples

    async def restarts(self, pool: str, reason: str) -> float:
        return (await self.metrics()).get(
            ("agentworker_worker_restarts_total", frozenset({("pool", pool), ("reason", reason)})), 0.0)

    # -- waiting -------------------------------------------------------------------------------------------

    async def _alive_or_fail(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"supervisor exited with {self.proc.returncode}:\n{self.log()[-5000:]}")

    async def wait_up(self, timeout: float = 30) -> None:
        async def listening() -> bool:
            await self._alive_or_fail()
            try:
                code, _h, _b = await self.request("/health")
            except OSError:
                return False
            return code == 200

        await wait_for(listening, timeout, what=f"{self.name} to listen", interval=0.1)

    async def wait_ready(self, timeout: float = 45) -> dict[str, Any]:
        await self.wait_up(timeout)

        async def ready() -> bool:
            await self._alive_or_fail()
            code, _h, _b = await self.request("/ready")
            return code == 200

        await wait_for(ready, timeout, what=f"{self.name} to be ready", interval=0.1)
        return await self.status()

    async def wait_all_serving(self, pool: str = "standard", timeout: float = 45) -> dict[str, Any]:
        """:meth:`wait_ready`, then until every process of ``pool`` serves (ready needs only one)."""
        await self.wait_ready(timeout)
        return await self.wait_status(
            lambda s: len(serving_pids(s, pool)) == s["pools"][pool]["processes"], timeout,
            what=f"every process of pool {pool} to serve")

    async def wait_status(self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30,
                          what: str = "status condition") -> dict[str, Any]:
        found: dict[str, Any] = {}

        async def check() -> bool:
            await self._alive_or_fail()
            document = await self.status()
            if predicate(document):
                found.update(document)
                return True
            return False

        await wait_for(check, timeout, what=what, interval=0.1)
        return found

    # -- stopping ------------------------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.supervisor_pid(), sig)

    async def wait_exit(self, timeout: float = 40) -> int:
        await wait_for(lambda: self.proc.poll() is not None, timeout, what=f"{self.name} to exit", interval=0.05)
        return int(self.proc.returncode)

    def stop(self) -> None:
        """Teardown: SIGTERM, then SIGKILL the supervisor and any worker it left (it should leave none)."""
        if self.proc.poll() is None:
            supervisor_pid = self.supervisor_pid()
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                # Under unshare, killing the wrapper would leave the namespace's PID 1 running.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(supervisor_pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(10)
        for pid in live_workers(self.worker_pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self._log.close()


def live_workers(pids: set[int]) -> list[int]:
    """The pids among ``pids`` that are still worker processes (not reaped, not reused by others)."""
    alive = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            if proc.status() != psutil.STATUS_ZOMBIE and "agentworker.pools.worker" in " ".join(proc.cmdline()):
                alive.append(pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return alive


def slot_rows(status: dict[str, Any], pool: str, role: str = "current") -> list[dict[str, Any]]:
    return sorted((r for r in status["processes"] if r["pool"] == pool and r["role"] == role),
                  key=lambda r: int(r["slot"]))


def serving_pids(status: dict[str, Any], pool: str) -> list[int]:
    return [r["pid"] for r in slot_rows(status, pool) if r["state"] == "serving"]


def supervisor_factory(redis_url: str, workdir: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    started: list[SupervisorProcess] = []

    def start(config: Path, name: str = "sup", redis: str | None = None, wrapper: Sequence[str] = (),
              **env: str) -> SupervisorProcess:
        sup = SupervisorProcess(config, redis or redis_url, workdir, name=name, wrapper=wrapper, **env)
        started.append(sup)
        return sup

    yield start
    for sup in started:
        sup.stop()


def in_process_backend(redis: Any, quotas: Path, tmp_path: Path, **settings: Any) -> Any:
    """A :class:`SupervisorBackend` over a supervisor that is never started (no workers): the HTTP app's
    backend for tests of its endpoints, with ``settings`` over the defaults."""
    from prometheus_client import CollectorRegistry

    from agentworker.config import QuotaFileWatch
    from agentworker.settings import Settings
    from agentworker.supervisor.metrics_archive import MetricsArchive
    from agentworker.supervisor.observer import RedisObserver
    from agentworker.supervisor.reconcile import Supervisor
    from agentworker.supervisor.runner import SupervisorBackend

    watch = QuotaFileWatch(quotas)
    resolved = Settings.from_env({}, config=str(quotas), **settings)
    for name in ("run", "metrics"):
        (tmp_path / name).mkdir(exist_ok=True)
    supervisor = Supervisor(settings=resolved, watch=watch, config=watch.load(), run_dir=tmp_path / "run",
                            metrics=MetricsArchive(tmp_path / "metrics"), child_env={})
    observer = RedisObserver(redis, lambda: (supervisor.config_version, supervisor.config), quotas)
    return SupervisorBackend(supervisor, observer, redis, resolved, CollectorRegistry())
