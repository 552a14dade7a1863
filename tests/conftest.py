"""Shared fixtures: a private Redis server per test session, quota files, worker subprocesses.

Each test session starts its own ``redis-server`` on a free loopback port (ARQ's job keys are global
per database, so sharing the machine's Redis would let runs collide), and every test starts from an
empty database. ``AGENTWORKER_TEST_REDIS_URL`` points the tests at an existing server instead.

Under pytest-xdist (``pytest -n 4``) every worker is a session of its own, so each has its own
redis-server (or database number on an external one) and its own scratch PostgreSQL database.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis
import yaml
from redis.asyncio import Redis

from agentworker.client import AgentWorkerClient
from agentworker.config import load_config
from agentworker.settings import Settings
from bench.redis_server import PrivateRedis, free_port

ROOT = Path(__file__).resolve().parent.parent


class RedisServer(PrivateRedis):
    """A private redis-server (the bench's) that can be stopped and started again on the same port, to
    simulate outages: stop() keeps its directory, cleanup() removes it."""

    def __init__(self, port: int | None = None) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server binary not found")
        super().__init__()
        if port is not None:
            self.port = port

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def per_worker_database(url: str) -> str:
    """Under pytest-xdist each worker is a test session of its own: on a shared server, each gets its own
    database number (1 + the worker's index), since every test flushes its database."""
    from urllib.parse import urlsplit, urlunsplit

    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    if not worker.startswith("gw"):
        return url
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{1 + int(worker[2:])}", parts.query, parts.fragment))


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    external = os.environ.get("AGENTWORKER_TEST_REDIS_URL")
    if external:
        yield per_worker_database(external)
        return
    server = RedisServer()
    server.start()
    try:
        yield server.url
    finally:
        server.cleanup()


@pytest.fixture
def redis_url(redis_server: str) -> str:
    client = sync_redis.Redis.from_url(redis_server)
    client.flushdb()
    client.close()
    return redis_server


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def arq_redis(redis_url: str) -> AsyncIterator[Any]:
    """An ARQ Redis client (what workers use) on the test's empty database."""
    from arq.connections import ArqRedis

    client = ArqRedis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


BASIC_QUOTAS: dict[str, Any] = {
    "default_pool": "standard",
    "pools": {
        "standard": {"shards": 4, "processes": 1, "concurrency": 10, "job_timeout": 30},
        "premium": {"shards": 2, "processes": 1, "concurrency": 10, "job_timeout": 60},
    },
    "tenants": {},
}


@pytest.fixture
def write_quotas(tmp_path: Path) -> Callable[[dict[str, Any]], Path]:
    def write(data: dict[str, Any], name: str = "quotas.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data))
        return path

    return write


@pytest.fixture
def quota_file(write_quotas: Callable[[dict[str, Any]], Path]) -> Path:
    return write_quotas(BASIC_QUOTAS)


def make_client(redis_url: str, config_path: Path, **settings: Any) -> AgentWorkerClient:
    return AgentWorkerClient.from_settings(Settings(redis_url=redis_url, config=str(config_path), **settings),
                                           config=load_config(config_path))


def worker_env(redis_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTWORKER_", "PROMETHEUS_"))}
    env.update({
        "AGENTWORKER_REDIS_URL": redis_url,
        "AGENTWORKER_TASK_MODULES": "tests.probe_tasks",
        "AGENTWORKER_POLL_INTERVAL": "0.2",
        "AGENTWORKER_LOG_LEVEL": "info",
        # Only the schedule tests dispatch schedules (they turn it on): other tests' workers must not
        # touch whatever database they can reach.
        "AGENTWORKER_SCHEDULER": "off",
        "PYTHONPATH": os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    })
    env.update(extra)
    return env


class WorkerProcess:
    """A real ``python -m agentworker.pools.worker`` subprocess with its log captured to a file."""

    def __init__(self, config: Path, pool: str, slot: int, env: dict[str, str], log_dir: Path) -> None:
        self.log_path = log_dir / f"worker-{pool}-{slot}-{time.monotonic_ns()}.log"
        self.status_path = log_dir / f"status-{pool}-{slot}-{time.monotonic_ns()}.json"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agentworker.pools.worker", "--config", str(config), "--pool", pool,
             "--slot", str(slot), "--status-file", str(self.status_path)],
            env=env, stdout=self._log, stderr=subprocess.STDOUT, cwd=ROOT,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def state(self) -> str | None:
        """The state the worker's status file (its heartbeat) says it is in, None before the first one."""
        try:
            status = json.loads(self.status_path.read_text())
        except (OSError, ValueError):
            return None
        return str(status["state"]) if status.get("pid") == self.pid else None

    async def wait_serving(self, timeout: float = 30) -> None:
        await wait_for(lambda: self.state() == "serving" or self.proc.poll() is not None, timeout,
                       what=f"worker {self.pid} to serve")
        if self.proc.poll() is not None:
            raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.log()}")

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, sig)

    async def wait_exit(self, timeout: float = 30) -> int:
        await wait_for(lambda: self.proc.poll() is not None, timeout, what=f"worker {self.pid} to exit")
        return int(self.proc.returncode)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()


@pytest.fixture
def spawn_worker(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    started: list[WorkerProcess] = []

    def spawn(config: Path, pool: str = "standard", slot: int = 0, **env: str) -> WorkerProcess:
        proc = WorkerProcess(config, pool, slot, worker_env(redis_url, **env), tmp_path)
        started.append(proc)
        return proc

    yield spawn
    for proc in started:
        proc.stop()


async def wait_for(condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10, *,
                   what: str = "condition", interval: float = 0.02) -> None:
    """Wait until ``condition()`` is true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if not isinstance(value, bool):
            value = await value
        if value:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


# -- PostgreSQL ------------------------------------------------------------------------------------------
#
# One database with a random name per test session, migrated once (our SQL and LangGraph's checkpoint
# tables) and dropped at the end. Tests isolate themselves inside it with their own tenant ids.
# AGENTWORKER_TEST_DATABASE_URL names the server (any database on it; default the machine's).

TEST_DATABASE_SERVER = "postgresql://postgres@127.0.0.1:5432/postgres"


def database_url_for(server_url: str, name: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(server_url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{name}", parts.query, parts.fragment))


@contextlib.contextmanager
def scratch_database(prefix: str, *, checkpoints: bool = False) -> Iterator[str]:
    """A migrated database with a random name on the test server, dropped afterwards (skips the test when
    PostgreSQL is unreachable). ``checkpoints``: also LangGraph's checkpoint tables."""
    import uuid

    import asyncpg

    from agentworker.db.migrate import migrate

    server = os.environ.get("AGENTWORKER_TEST_DATABASE_URL", TEST_DATABASE_SERVER)
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(server, timeout=10)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.skip(f"PostgreSQL is not reachable for the tests: {exc}")
    url = database_url_for(server, name)
    try:
        asyncio.run(migrate(url, checkpoints=checkpoints))
        yield url
    finally:
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with scratch_database("aw_test", checkpoints=True) as url:
        yield url


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Any]:
    from agentworker.db import open_database

    db = await open_database(database_url)
    try:
        yield db
    finally:
        await db.close()


def new_tenant(prefix: str = "t") -> str:
    """A tenant id no other test uses (tests share the session's database)."""
    import uuid

    return f"{prefix}-{uuid.uuid4().hex[:12]}"


# -- agents and tools: real local peers (SMTP, a CRM API, an OpenAI-compatible endpoint) ------------------

CRM_TOKENS = ["crm-token-a", "crm-token-b"]
#: the egress guard refuses loopback by default; the local peers of the tests live on 127.0.0.1 (the
#: service's own Redis, PostgreSQL and HTTP port stay refused all the same)
LOOPBACK_PEERS_ALLOWED = {"AGENTWORKER_EGRESS_ALLOW": "127.0.0.1/32"}


@pytest.fixture
def loopback_peers_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this process's egress guard reach the local peers (worker subprocesses: their env helpers)."""
    for name, value in LOOPBACK_PEERS_ALLOWED.items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def smtp_server(loopback_peers_allowed: None) -> Iterator[Callable[..., Any]]:
    """Start real aiosmtpd servers on loopback: ``smtp_server(hold_first=0.0)``."""
    from tests.fake_smtp import SmtpServer

    started: list[SmtpServer] = []

    def start(hold_first: float = 0.0) -> SmtpServer:
        server = SmtpServer(free_port(), hold_first=hold_first)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
async def fake_openai(loopback_peers_allowed: None) -> AsyncIterator[Any]:
    from tests.fake_openai import FakeOpenAI

    endpoint = FakeOpenAI()
    await endpoint.start()
    try:
        yield endpoint
    finally:
        await endpoint.stop()


@pytest.fixture
async def fake_crm(loopback_peers_allowed: None) -> AsyncIterator[Any]:
    from tests.fake_crm import FakeCrm

    crm = FakeCrm(CRM_TOKENS)
    await crm.start()
    try:
        yield crm
    finally:
        await crm.stop()


# -- schedules: tenants whose schedules are deleted after the test (the session's database is shared, and
# every worker process of later tests dispatches whatever schedules it finds due there) -----------------------


@pytest.fixture
async def schedule_tenant(database_url: str) -> AsyncIterator[Callable[[str], str]]:
    from agentworker.db import open_database

    made: list[str] = []

    def make(prefix: str = "sched") -> str:
        made.append(new_tenant(prefix))
        return made[-1]

    yield make
    db = await open_database(database_url)
    try:
        for tenant in made:
            async with db.tenant(tenant) as tx:
                await tx.execute("DELETE FROM agentworker.schedules")
    finally:
        await db.close()
