"""A private redis-server on a free loopback port, started and stopped by the bench."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PrivateRedis:
    """No persistence by default; ``appendonly=True`` keeps an AOF (``appendfsync everysec``, what the
    README asks of production) in ``dir``, so :meth:`restart` brings back every key.

    ``dir``: the server's directory (default: a new temporary one, removed by :meth:`stop`; one given
    here is left in place, with the server's log in it)."""

    def __init__(self, binary: str | None = None, *, appendonly: bool = False, dir: Path | None = None) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise SystemExit("bench: redis-server not found on PATH (install Redis, or pass --redis-server)")
        self.binary = found
        self.port = free_port()
        self.appendonly = appendonly
        self._own_dir = dir is None
        if dir is not None:
            dir.mkdir(parents=True, exist_ok=True)
        self.dir = tempfile.mkdtemp(prefix="aw-bench-redis-") if dir is None else str(dir)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if self.appendonly else \
            ["--appendonly", "no"]
        logging = [] if self._own_dir else ["--logfile", str(Path(self.dir) / "redis.log")]
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", *persistence,
             "--dir", self.dir, "--loglevel", "warning" if self._own_dir else "notice", *logging,
             "--maxclients", "2000"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:  # also BusyLoadingError: replaying its AOF
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()

    def restart(self) -> None:
        """Stop the server (SIGTERM: it writes its AOF out and exits) and start it again on the same port and
        directory: with ``appendonly`` every key comes back, without it the server comes back empty."""
        self._terminate()
        self.start()

    def version(self) -> str:
        client = redis.Redis(port=self.port)
        try:
            info: dict[str, object] = client.info("server")  # type: ignore[assignment]
            return str(info.get("redis_version", "?"))
        finally:
            client.close()

    def flush(self) -> None:
        client = redis.Redis(port=self.port)
        try:
            client.flushall()
        finally:
            client.close()

    def _terminate(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            self.proc = None

    def stop(self) -> None:
        self._terminate()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)
