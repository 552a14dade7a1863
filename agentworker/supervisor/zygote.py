"""Fast worker starts: the supervisor's side of the zygote (Linux; ``AGENTWORKER_ZYGOTE=on``, the default).

A worker started afresh spends seconds importing its stack before it serves. The supervisor therefore
keeps one **zygote** (:mod:`agentworker.pools.zygote_process`): a process started like a worker
(``posix_spawn`` through the ``PR_SET_PDEATHSIG`` wrapper, so it dies with the supervisor) that imports
everything once and then forks workers on request, in milliseconds, sharing its memory with them.

The supervisor stays the parent of every worker: it marks itself ``PR_SET_CHILD_SUBREAPER``, and the
zygote double-forks, so each worker is re-parented to the supervisor at once and reaped by its usual
``waitpid(-1)`` loop. The zygote itself is reaped there too and reported to :meth:`Zygote.exited`.

Never a dead end: while the zygote is not ready (it died, it does not answer within
:data:`REPLY_TIMEOUT_S`, it is being restarted after a backoff), workers are started with
``posix_spawn`` as without it. Only the first start of the supervisor holds the first workers until the
zygote is ready (at most ``min(WARMUP_TIMEOUT_S, AGENTWORKER_WORKER_START_TIMEOUT)``), so that they
share its memory too.

Protocol (pipes, one JSON object per line): the zygote says ``{"ready": true, ...}`` (or ``{"unsafe":
reason}``: then the zygote is off for this run); each request ``{"args", "title", "supervisor_pid"}``
gets ``{"pid": N}`` or ``{"error": text}``.

The zygote's code is worker-side (``pools/``: it imports the job side), so the supervisor never imports
it: it starts it by module name (:data:`ZYGOTE_MODULE`) and keeps its own copy of the two values both
ends must agree on, :data:`process.WORKER_MODULE` and :data:`ZYGOTE_EXIT_UNSAFE`
(``tests/test_architecture.py`` checks that they do).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import select
import signal
import sys
import time
from collections.abc import Callable

from agentworker.logs import get_logger
from agentworker.settings import Settings
from agentworker.supervisor import process
from agentworker.supervisor.backoff import RestartBackoff
from agentworker.supervisor.process import WORKER_MODULE

log = get_logger("agentworker.supervisor")

ZYGOTE_MODULE = "agentworker.pools.zygote_process"
#: the zygote's exit code when preloading left it unsafe to fork (its ``EXIT_UNSAFE``): no zygote this run
ZYGOTE_EXIT_UNSAFE = 78
#: length of the ``--title-room`` argument passed to the zygote: room to rewrite the command line shown
#: by ps for each worker (it must fit in the zygote's own argv memory)
TITLE_ROOM = 2048
#: seconds the zygote has to fork a worker and answer before it is killed and replaced
REPLY_TIMEOUT_S = 5.0
#: the first workers wait at most this long for the first zygote to be ready
WARMUP_TIMEOUT_S = 30.0
_PR_SET_CHILD_SUBREAPER = 36


class ZygoteError(Exception):
    """The zygote did not start a worker (it died, did not answer, or could not fork)."""


def become_subreaper() -> bool:
    """Make orphaned descendants (the zygote's workers) children of this process. Linux only."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


class Zygote:
    """Starts workers from the zygote process, restarting it when it dies and falling back meanwhile."""

    def __init__(self, env: dict[str, str], *, wake: Callable[[], None] = lambda: None,
                 warmup_timeout: float = WARMUP_TIMEOUT_S, reply_timeout: float = REPLY_TIMEOUT_S) -> None:
        self.env = env
        self.wake = wake
        self.warmup_timeout = warmup_timeout
        self.reply_timeout = reply_timeout
        self.backoff = RestartBackoff(initial=1.0, maximum=60.0)
        self.pid: int | None = None
        self.state = "down"  # starting, ready, down (restart pending), off (not used for the rest of the run)
        self.generation = 0
        self.started_mono = 0.0
        self.restart_at = 0.0
        self._first_started = time.monotonic()
        self._request_fd: int | None = None
        self._reply_fd: int | None = None
        self._buffer = b""
        self._reader_loop: asyncio.AbstractEventLoop | None = None

    @classmethod
    def create(cls, settings: Settings, env: dict[str, str], wake: Callable[[], None]) -> Zygote | None:
        """The zygote of a supervisor, started; None when it is off or cannot work on this platform."""
        if settings.zygote == "off":
            log.info("zygote off (AGENTWORKER_ZYGOTE=off): every worker starts afresh")
            return None
        if not become_subreaper():
            log.info("zygote unavailable (needs Linux and PR_SET_CHILD_SUBREAPER): every worker starts afresh")
            return None
        zygote = cls(env, wake=wake, warmup_timeout=min(WARMUP_TIMEOUT_S, settings.worker_start_timeout))
        zygote.start()
        return zygote

    # -- the zygote process ----------------------------------------------------------------------------

    def start(self) -> None:
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        os.set_inheritable(request_r, True)
        os.set_inheritable(reply_w, True)
        argv = [sys.executable, "-m", ZYGOTE_MODULE, "--fds", f"{request_r},{reply_w}",
                "--title-room=" + "." * TITLE_ROOM]
        try:
            pid = process.spawn(argv, self.env)
        except OSError as exc:
            os.close(request_w)
            os.close(reply_r)
            self._schedule_restart(0.0, f"cannot start the zygote: {exc}")
            return
        finally:
            # The child's ends are closed here whatever happened: then EOF on the reply pipe means the
            # zygote is gone, and no later child can inherit them.
            os.close(request_r)
            os.close(reply_w)
        self.pid = pid
        self.generation += 1
        self.started_mono = time.monotonic()
        self.state = "starting"
        self._request_fd, self._reply_fd, self._buffer = request_w, reply_r, b""
        os.set_blocking(reply_r, False)
        with contextlib.suppress(RuntimeError):
            self._reader_loop = asyncio.get_running_loop()
            self._reader_loop.add_reader(reply_r, self._on_readable)
        log.info("zygote starting", zygote_pid=pid, generation=self.generation)

    def _on_readable(self) -> None:
        """The reply pipe has data outside a request: the ready message, or EOF (the zygote died)."""
        try:
            data = os.read(self._reply_fd, 65536) if self._reply_fd is not None else b""
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close_pipes()
            if self.pid is not None:  # it closed its pipe: it is exiting; the reap loop reports it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            self._on_message(line)

    def _on_message(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            log.error("zygote said something unreadable", line=line[:200].decode(errors="replace"))
            return
        if message.get("ready"):
            self.state = "ready"
            log.info("zygote ready", zygote_pid=self.pid, modules=message.get("modules"),
                     preload_s=message.get("preload_s"))
            self.wake()
        elif "unsafe" in message:
            self.state = "off"
            log.error("zygote unsafe to fork; workers start afresh for the rest of this run",
                      reason=message["unsafe"])
            self.wake()

    def owns(self, pid: int) -> bool:
        return pid == self.pid

    def exited(self, pid: int, code: int) -> None:
        """The supervisor reaped the zygote."""
        if pid != self.pid:
            return
        uptime = time.monotonic() - self.started_mono
        self.pid = None
        self._close_pipes()
        if code == ZYGOTE_EXIT_UNSAFE or self.state == "off":
            self.state = "off"
            return
        self._schedule_restart(uptime, f"zygote exited (code {code})")

    def _schedule_restart(self, uptime: float, why: str) -> None:
        delay = self.backoff.failed(uptime)
        self.state = "down"
        self.restart_at = time.monotonic() + delay
        log.warning(f"{why}; workers start without it until it is back", restart_in_s=round(delay, 2))

    def maintain(self, now: float) -> None:
        """Restart a dead zygote once its backoff has passed (called by every reconcile turn)."""
        if self.state == "down" and self.pid is None and now >= self.restart_at:
            self.start()

    @property
    def warming(self) -> bool:
        """True while the supervisor's first zygote is importing: hold the first workers for it."""
        return (self.state == "starting" and self.generation == 1
                and time.monotonic() - self._first_started < self.warmup_timeout)

    def next_deadline(self) -> float | None:
        """Monotonic time at which :meth:`maintain` has something to do."""
        if self.state == "down" and self.pid is None:
            return self.restart_at
        return None

    # -- workers ---------------------------------------------------------------------------------------

    def spawn(self, argv: list[str], env: dict[str, str]) -> tuple[int, str]:
        """Start a worker: ``(pid, "zygote")`` when forked, else ``(pid, "spawn")`` by ``posix_spawn``."""
        if (self.state == "ready" and env == self.env
                and argv[:3] == [sys.executable, "-m", WORKER_MODULE]):
            try:
                pid = self._request(argv[3:], " ".join(argv))
            except ZygoteError as exc:
                log.error("zygote failed to start a worker; killing it and starting the worker afresh",
                          zygote_pid=self.pid, error=str(exc))
                self._kill()
            else:
                return pid, "zygote"
        return process.spawn(argv, env), "spawn"

    def _request(self, args: list[str], title: str) -> int:
        assert self._request_fd is not None and self._reply_fd is not None
        request = json.dumps({"args": args, "title": title, "supervisor_pid": os.getpid()}) + "\n"
        try:
            os.write(self._request_fd, request.encode())
        except OSError as exc:
            raise ZygoteError(f"cannot write to the zygote: {exc}") from None
        deadline = time.monotonic() + self.reply_timeout
        poller = select.poll()
        poller.register(self._reply_fd, select.POLLIN)
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ZygoteError(f"no answer within {self.reply_timeout:g}s")
            if not poller.poll(remaining * 1000):
                continue
            try:
                data = os.read(self._reply_fd, 65536)
            except BlockingIOError:
                continue
            if not data:
                raise ZygoteError("the zygote closed its pipe")
            self._buffer += data
        line, self._buffer = self._buffer.split(b"\n", 1)
        try:
            reply = json.loads(line)
            return int(reply["pid"])
        except (ValueError, KeyError, TypeError):
            raise ZygoteError(f"the zygote answered {line[:200]!r}") from None

    # -- stopping --------------------------------------------------------------------------------------

    def _kill(self) -> None:
        self._close_pipes()
        self.state = "down"
        if self.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)

    def _close_pipes(self) -> None:
        if self._reply_fd is not None:
            if self._reader_loop is not None:
                with contextlib.suppress(Exception):
                    self._reader_loop.remove_reader(self._reply_fd)
            with contextlib.suppress(OSError):
                os.close(self._reply_fd)
        if self._request_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._request_fd)
        self._reply_fd = self._request_fd = None
        self._reader_loop = None
        if self.state in ("starting", "ready"):
            self.state = "down"

    def close(self, timeout: float = 3.0) -> None:
        """Stop the zygote (closing its request pipe makes it exit) and reap it."""
        pid = self.pid
        self._close_pipes()
        self.state = "off"
        if pid is None:
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                break  # already reaped
            if done:
                break
            if time.monotonic() >= deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, 0)
                break
            time.sleep(0.01)
        self.pid = None
