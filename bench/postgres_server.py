"""A private PostgreSQL server on a free loopback port, for benchmarks and tests that restart or break it.

``initdb`` and ``pg_ctl`` come from ``/usr/lib/postgresql/*/bin`` (the newest) or the PATH. PostgreSQL
refuses to run as root, so under root the server runs as the ``postgres`` user (``runuser``) in a
temporary directory it owns. Logins are trusted on loopback: ``postgresql://postgres@127.0.0.1:PORT/``.
(The tests use it through ``tests/pg_server.py``, which turns :class:`PostgresUnavailable` into a skip.)
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from bench.redis_server import free_port


class PostgresUnavailable(RuntimeError):
    """This machine cannot run a private PostgreSQL (no binaries, or root without a ``postgres`` user)."""


def postgres_bin_dir() -> Path | None:
    """Where ``initdb`` and ``pg_ctl`` are: the newest ``/usr/lib/postgresql/N/bin``, else the PATH's."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                   key=lambda path: int(Path(path).parent.parent.name) if Path(path).parent.parent.name.isdigit()
                   else 0)
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    return Path(on_path).parent if on_path else None


class PrivatePostgres:
    """``start()``, ``restart(mode="fast")``, ``stop()``, ``cleanup()``; ``url(database)`` to connect."""

    def __init__(self, *, prefix: str = "aw-pg-") -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None or not (bin_dir / "pg_ctl").exists():
            raise PostgresUnavailable("PostgreSQL's initdb/pg_ctl not found (/usr/lib/postgresql/*/bin or the PATH)")
        self.bin_dir = bin_dir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        self.data = self.dir / "data"
        self.log_path = self.dir / "server.log"
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                shutil.rmtree(self.dir, ignore_errors=True)
                raise PostgresUnavailable("running as root and there is no 'postgres' user to run a private "
                                          "PostgreSQL as") from None
            os.chown(self.dir, user.pw_uid, user.pw_gid)
            self._as_user = ["runuser", "-u", "postgres", "--"]
        self._initialised = False

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        done = subprocess.run([*self._as_user, *args], capture_output=True, text=True, timeout=timeout,
                              check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}): {done.stdout}{done.stderr}\n"
                               f"{self.server_log()}")

    def _pg_ctl(self, *args: str) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.dir} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log_path), "-o", options,
                  "-w", "-t", "60", *args, timeout=90)

    def start(self) -> None:
        if not self._initialised:
            self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
                      "-E", "UTF8", "--no-sync", "--no-instructions")
            self._initialised = True
        self._pg_ctl("start")
        self.wait_ready()

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart -m fast``: every session is terminated (57P01), then the server starts again."""
        self._pg_ctl("-m", mode, "restart")
        self.wait_ready()

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("-m", mode, "stop")

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while subprocess.run([str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                             check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL on port {self.port} not ready after {timeout}s\n{self.server_log()}")
            time.sleep(0.05)

    def server_log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def cleanup(self) -> None:
        if self._initialised and (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                self._pg_ctl("-m", "immediate", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


async def migrated_database(server: PrivatePostgres, name: str = "agentworker") -> str:
    """Create ``name`` on the private server and migrate it (our SQL and LangGraph's checkpoint tables);
    return its URL."""
    import asyncpg

    from agentworker.db.migrate import migrate

    conn = await asyncpg.connect(server.url(), timeout=10)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    url = server.url(name)
    await migrate(url)
    return url


def create_migrated_database(server: PrivatePostgres, name: str = "agentworker") -> str:
    """:func:`migrated_database` from synchronous code (outside an event loop)."""
    return asyncio.run(migrated_database(server, name))
