"""One supervisor per metrics directory: an exclusive ``flock`` held for the supervisor's whole life.

The supervisor empties its metrics directory when it starts (the files of an earlier lifetime mean
nothing now). A second supervisor pointed at the same directory (the same ``AGENTWORKER_METRICS_DIR``,
say a second ``agentworker run`` started by mistake in the same container) would empty the live
service's files and zero its counters. So the directory is locked first, before anything in it is
touched, and a supervisor that cannot take the lock refuses to start.

``flock`` rather than a pid file: the kernel drops the lock when its holder exits, kill -9 included, so
a crashed supervisor never leaves a stale lock behind. The descriptor is not inheritable and workers
are started with an exec, so no child keeps the lock after its supervisor is gone.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

#: the lock file inside the directory (not ``*.db``: prometheus_client's collector reads only those)
LOCK_NAME = ".supervisor.lock"


class DirectoryInUse(Exception):
    """Another live process holds the directory's lock: the message is one sentence."""


class DirectoryLock:
    """An exclusive, non-blocking ``flock`` on ``directory / LOCK_NAME``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DirectoryInUse` (the directory's files untouched); the lock
        file is left with this process's pid in it, for the refusal message of the next one."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_pid(fd)
            os.close(fd)
            by = f" (pid {holder})" if holder else ""
            raise DirectoryInUse(f"metrics directory {self.directory} is in use by another running "
                                 f"supervisor{by}: give each supervisor its own AGENTWORKER_METRICS_DIR") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it would let two processes lock different files)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
