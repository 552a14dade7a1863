"""One worker process as the supervisor sees it: spawning, signalling, reaping, heartbeat and memory.

Workers are started with ``os.posix_spawn`` rather than ``subprocess.Popen``: the supervisor reaps every
child itself with ``waitpid(-1, WNOHANG)`` (as PID 1 it must reap orphans too), and Popen objects would
race it for their own exit statuses.

On Linux each worker is started through a tiny exec wrapper that asks the kernel to send it SIGTERM when
the supervisor dies (``PR_SET_PDEATHSIG``), so no worker outlives a supervisor that crashed or was
killed with SIGKILL: the worker drains as on any SIGTERM. The setting survives the ``execv`` into the
real worker. (It fires when the spawning *thread* ends: the supervisor spawns from its main thread.)
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from agentworker.config import PoolQuota

#: the worker process, started by name (the supervisor never imports it: see agentworker.supervisor)
WORKER_MODULE = "agentworker.pools.worker"

# argv: [python, -I, -S, -c, CODE, parent_pid, program, *args]
_PDEATHSIG_EXEC = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None,use_errno=True).prctl(1,int(signal.SIGTERM),0,0,0)\n"  # 1 = PR_SET_PDEATHSIG
    # The parent may have died before prctl took effect: then nobody would ever signal us.
    "if os.getppid()!=int(sys.argv[1]): os._exit(70)\n"
    "os.execv(sys.argv[2],sys.argv[2:])\n"
)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """The status file a worker rewrites every second from its event loop."""

    pid: int
    state: str
    ts: float
    started_at: float
    jobs_served: int
    running: int
    redis_ok: bool

    @classmethod
    def read(cls, path: Path) -> Heartbeat | None:
        try:
            data: Any = json.loads(path.read_text())
            return cls(pid=int(data["pid"]), state=str(data["state"]), ts=float(data["ts"]),
                       started_at=float(data["started_at"]), jobs_served=int(data["jobs_served"]),
                       running=int(data["running"]), redis_ok=bool(data["redis_ok"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None


@dataclass(frozen=True, slots=True)
class ExitRecord:
    """How a process ended."""

    pid: int
    code: int  # exit code, or minus the signal number that killed it
    reason: str  # the restart reason it was counted as (exit, crash, hung, memory, recycle, reload, stop)
    at: float  # wall clock
    uptime: float

    @property
    def description(self) -> str:
        if self.code < 0:
            try:
                return f"killed by {signal.Signals(-self.code).name}"
            except ValueError:
                return f"killed by signal {-self.code}"
        return f"exited with code {self.code}"

    def as_dict(self) -> dict[str, Any]:
        return {"pid": self.pid, "code": self.code, "reason": self.reason, "at": self.at,
                "uptime_s": round(self.uptime, 3), "description": self.description}


@dataclass(kw_only=True)
class WorkerHandle:
    """A worker process the supervisor started and has not reaped yet."""

    pid: int
    pool: str
    slot: int
    status_path: Path
    quota: PoolQuota  # the pool's settings when it was started (a reload may change them)
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    heartbeat: Heartbeat | None = None
    #: monotonic time at which the heartbeat was last seen to change. Staleness is measured on this
    #: clock, not by comparing the worker's wall-clock ``ts`` with ours, so a clock step (NTP) cannot
    #: make every worker look hung at once.
    heartbeat_changed_at: float | None = None
    rss: int | None = None
    #: why the supervisor asked it to stop (drain, hung...), None while it is wanted
    stop_reason: str | None = None
    term_sent_at: float | None = None  # monotonic
    kill_at: float | None = None  # monotonic deadline for SIGKILL
    killed: bool = False

    @property
    def uptime(self) -> float:
        return time.monotonic() - self.started_mono

    @property
    def serving(self) -> bool:
        hb = self.heartbeat
        return hb is not None and hb.pid == self.pid and hb.state == "serving" and self.stop_reason is None

    @property
    def state(self) -> str:
        """starting, serving, draining, hung or killed: what /status and the metrics show."""
        if self.killed:
            return "killed"
        if self.stop_reason == "hung":
            return "hung"
        if self.stop_reason is not None:
            return "draining"
        hb = self.heartbeat
        if hb is None or hb.pid != self.pid:
            return "starting"
        return hb.state

    def refresh(self) -> None:
        """Read the heartbeat file and the resident memory."""
        hb = Heartbeat.read(self.status_path)
        if hb is not None and hb.pid == self.pid:
            if self.heartbeat is None or hb.ts != self.heartbeat.ts:
                self.heartbeat_changed_at = time.monotonic()
            self.heartbeat = hb
        try:
            self.rss = psutil.Process(self.pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            self.rss = None

    def heartbeat_age(self) -> float | None:
        """Seconds since the worker's event loop was last seen writing its heartbeat (None: not yet)."""
        if self.heartbeat_changed_at is None:
            return None
        return max(0.0, time.monotonic() - self.heartbeat_changed_at)

    def send(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, sig)

    def terminate(self, reason: str, kill_after: float) -> None:
        """SIGTERM (the worker drains), and SIGKILL once ``kill_after`` seconds have passed."""
        if self.stop_reason is None:
            self.stop_reason = reason
        if self.term_sent_at is None:
            self.term_sent_at = time.monotonic()
            self.kill_at = self.term_sent_at + kill_after
            self.send(signal.SIGTERM)

    def kill(self) -> None:
        self.killed = True
        self.send(signal.SIGKILL)

    def cleanup_files(self) -> None:
        for path in (self.status_path, self.status_path.with_name(self.status_path.name + ".tmp")):
            with contextlib.suppress(OSError):
                path.unlink()


def worker_argv(config_path: Path, pool: str, slot: int, status_path: Path) -> list[str]:
    """The command line of a worker process (without the PDEATHSIG wrapper)."""
    return [sys.executable, "-m", WORKER_MODULE, "--config", str(config_path), "--pool", pool,
            "--slot", str(slot), "--status-file", str(status_path)]


def spawn(argv: list[str], env: dict[str, str]) -> int:
    """Start ``argv`` with ``env``; return its pid. The child gets default signal dispositions and its
    own process group (a terminal's Ctrl-C reaches the supervisor, which decides what workers do)."""
    if sys.platform.startswith("linux"):
        argv = [sys.executable, "-I", "-S", "-c", _PDEATHSIG_EXEC, str(os.getpid()), *argv]
    return os.posix_spawn(argv[0], argv, env, setpgroup=0, setsigmask=(),
                          setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT, signal.SIGTERM,
                                     signal.SIGHUP, signal.SIGCHLD))


def reap() -> list[tuple[int, int]]:
    """Collect every exited child: ``(pid, exit code or -signal)``. As PID 1 in a container this also
    reaps orphans re-parented to us; the caller ignores pids it does not know."""
    exited: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            break
        if pid == 0:
            break
        exited.append((pid, os.waitstatus_to_exitcode(status)))
    return exited
