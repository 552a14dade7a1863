"""The zygote: a pre-imported parent that forks worker processes (Linux only).

    python -m agentworker.pools.zygote_process --fds REQUEST,REPLY [--title-room=...]

Worker-side code (it imports the worker process and the job side, and each worker it forks runs on from
here), so it lives in ``pools/``. The supervisor starts one zygote by module name and talks to it only
through pipes and its exit code (its end is :mod:`agentworker.supervisor.zygote`, which keeps its own
copies of :data:`WORKER_MODULE` and :data:`EXIT_UNSAFE`; ``tests/test_architecture.py`` checks that they
agree). The zygote imports the worker stack and the agent stack once (:data:`PRELOAD`, plus
``AGENTWORKER_ZYGOTE_PRELOAD``), checks that importing left it fork-safe — one thread, no socket — says
``ready`` on the reply pipe, then serves spawn requests: one JSON line per worker in, one JSON line
(``{"pid": N}`` or ``{"error": ...}``) out.

Each worker is double-forked: the zygote forks an intermediate process that forks the worker and exits at
once, so the worker is re-parented to the nearest subreaper — the supervisor, which set
``PR_SET_CHILD_SUBREAPER`` — and the supervisor reaps it with its ``waitpid(-1)`` loop like any worker.
Only once re-parented does the worker ask for ``PR_SET_PDEATHSIG`` (the signal follows the parent at the
time of the call), so it still dies with the supervisor.

The traps of forking without exec, and what is done about each:

* the zygote never opens a socket, starts a thread or creates an event loop, and checks it after every
  preloaded module; the worker makes its own event loop (uvloop), Redis client and database pools after
  the fork, exactly as a worker started afresh does. The supervisor's HTTP socket is never inherited
  (it is not inheritable, and the zygote is started with posix_spawn, not forked from the supervisor);
* the worker closes the zygote's pipes first thing and waits on a "go" pipe that the zygote writes only
  after telling the supervisor the worker's pid, so no worker runs that the supervisor does not know;
* ``random`` is re-seeded in the child (CPython's at-fork hook, and once more here), logging is set up
  again with the worker's own pid, and stdio buffers are flushed before every fork so no line is
  written twice;
* the garbage collector is disabled while preloading and everything is frozen (``gc.freeze``) before the
  first fork, so collections in workers do not write to the zygote's pages and they stay shared.

User task modules (``AGENTWORKER_TASK_MODULES``) are imported by each worker after the fork, as without
the zygote: their import-time code runs in every worker and never in the zygote. Modules named in
``AGENTWORKER_ZYGOTE_PRELOAD`` (their heavy dependencies, or the task modules themselves when importing
them opens no connection and starts no thread) are imported once in the zygote.

Exit codes: 0 (the request pipe closed: the supervisor is done with it), 2 (bad arguments),
78 (preloading left it unsafe to fork: the supervisor stops using a zygote).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import importlib
import json
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from typing import Any, BinaryIO, NoReturn

#: What the zygote imports, in this order, before it forks anything:
#:
#: 1. the worker process: ``agentworker.pools.worker`` and what it imports (ARQ, redis, uvloop, aiohttp,
#:    prometheus_client, structlog, psutil, pydantic, PyYAML);
#: 2. the built-in task modules (``agentworker.tasks.registry.BUILTIN_TASK_MODULES``, read at run time:
#:    diagnostic, workflow and agent tasks, with asyncpg);
#: 3. the agent stack those tasks import on their first job (:data:`PRELOAD`): psycopg and LangGraph's
#:    PostgreSQL checkpointer, LangGraph, LangChain's model factory and agents, the MCP client, and our
#:    graphs built on them;
#: 4. :data:`PRELOAD_OPTIONAL`, where installed (chat model providers);
#: 5. the modules named in ``AGENTWORKER_ZYGOTE_PRELOAD``.
PRELOAD: tuple[str, ...] = (
    "psycopg",
    "psycopg_pool",
    "langgraph.graph",
    "langgraph.types",
    "langgraph.checkpoint.postgres.aio",
    "langchain_core.messages",
    "langchain_core.language_models",
    "langchain.chat_models",
    "langchain.agents",
    "mcp",
    "langchain_mcp_adapters.client",
)
#: Imported where installed (a missing one is no error): providers, and our graph modules (the workflow
#: and agent runtimes, imported by the tasks on their first job).
PRELOAD_OPTIONAL: tuple[str, ...] = (
    "langchain_openai",
    "langchain_anthropic",
    "langchain_ollama",
    "agentworker.graphs.checkpoints",
    "agentworker.graphs.workflow_agent",
    "agentworker.graphs.agent_runtime",
    "agentworker.graphs.chat_agent",
    "agentworker.graphs.tool_agent",
    "agentworker.graphs.router",
)

WORKER_MODULE = "agentworker.pools.worker"
#: 78 (EX_CONFIG): preloading left the zygote unsafe to fork; the supervisor then runs without a zygote
EXIT_OK, EXIT_USAGE, EXIT_UNSAFE = 0, 2, 78
#: exit code of a forked worker that could not take its place (zygote gone, supervisor gone)
EXIT_ORPHANED = 70
#: seconds a forked worker waits to be re-parented to the supervisor
REPARENT_TIMEOUT_S = 10.0
_PR_SET_PDEATHSIG = 1


def fork_hazards() -> list[str]:
    """What would make forking unsafe right now: threads, sockets, an event loop."""
    hazards = []
    threads = threading.active_count()
    try:
        native = len(os.listdir("/proc/self/task"))
    except OSError:
        native = threads
    if threads > 1 or native > 1:
        hazards.append(f"{max(threads, native)} threads")
    sockets = 0
    try:
        for fd in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                    sockets += 1
            except OSError:
                continue
    except OSError:
        pass
    if sockets:
        hazards.append(f"{sockets} open sockets")
    if asyncio.events._get_running_loop() is not None:
        hazards.append("a running event loop")
    return hazards


def preload(modules: Sequence[str], optional: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Import ``modules`` in order. A failure is reported and skipped (a worker that needs the module
    imports it itself and fails the usual way); one of ``optional`` that is not installed is skipped
    silently. Raise :class:`UnsafeToFork` naming the module after which the process holds a thread or
    a socket."""
    loaded: list[str] = []
    skipped: dict[str, str] = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            missing = getattr(exc, "name", None) or ""
            if name in optional and missing and (name == missing or name.startswith(missing + ".")):
                continue  # not installed
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        except BaseException as exc:  # a module may even call sys.exit at import
            skipped[name] = f"{type(exc).__name__}: {exc}"
            continue
        hazards = fork_hazards()
        if hazards:
            raise UnsafeToFork(f"after importing {name}: {', '.join(hazards)}")
        loaded.append(name)
    return loaded, skipped


class UnsafeToFork(RuntimeError):
    """Preloading left the zygote with threads or sockets a forked worker would inherit."""


def set_process_title(title: str) -> None:
    """Show ``title`` as this process's command line (ps, /proc/PID/cmdline), within the room of the
    original argv. Linux only; does nothing where that memory cannot be found."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # proc(5): field 48 is arg_start, 49 arg_end; the list starts at field 3 (state)
        start, end = int(fields[45]), int(fields[46])
    except (OSError, IndexError, ValueError):
        return
    room = end - start
    if room < 2:
        return
    data = title.encode()[: room - 2] + b"\0"
    # A non-NUL last byte tells the kernel the area was rewritten (setproctitle style): /proc/PID/cmdline
    # then shows the text up to the first NUL, with spaces between the words.
    data += b"\0" * (room - 1 - len(data)) + b" "
    ctypes.memmove(start, data, room)


def _exit_code(exc: SystemExit) -> int:
    if exc.code is None:
        return 0
    if isinstance(exc.code, int):
        return exc.code
    print(exc.code, file=sys.stderr)
    return 1


def _flush_stdio() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()


class Zygote:
    """The zygote's loop: read a request, double-fork a worker, answer."""

    def __init__(self, requests: BinaryIO, reply_fd: int) -> None:
        self.requests = requests
        self.reply_fd = reply_fd
        self.log: Any = None

    def answer(self, message: dict[str, Any]) -> None:
        data = (json.dumps(message) + "\n").encode()
        # Replies are small: one write() on a pipe is atomic below PIPE_BUF.
        os.write(self.reply_fd, data)

    def serve(self) -> int:
        while True:
            line = self.requests.readline()
            if not line:
                return EXIT_OK  # the supervisor closed the pipe (stopping) or died
            try:
                request = json.loads(line)
                args = [str(a) for a in request["args"]]
                title = str(request.get("title") or "")
                supervisor_pid = int(request["supervisor_pid"])
            except (ValueError, KeyError, TypeError) as exc:
                self.answer({"error": f"bad request: {exc}"})
                continue
            self.fork_worker(args, title, supervisor_pid)

    def fork_worker(self, args: list[str], title: str, supervisor_pid: int) -> None:
        info_r, info_w = os.pipe()  # intermediate -> zygote: the worker's pid
        go_r, go_w = os.pipe()  # zygote -> worker: "the supervisor knows you, go"
        _flush_stdio()
        try:
            intermediate = os.fork()
        except OSError as exc:
            for fd in (info_r, info_w, go_r, go_w):
                os.close(fd)
            self.answer({"error": f"fork failed: {exc}"})
            return
        if intermediate == 0:
            self._intermediate(info_r, info_w, go_r, go_w, args, title, supervisor_pid)
        os.close(info_w)
        os.close(go_r)
        chunks = []
        while chunk := os.read(info_r, 64):
            chunks.append(chunk)
        os.close(info_r)
        os.waitpid(intermediate, 0)
        try:
            pid = int(b"".join(chunks))
        except ValueError:
            os.close(go_w)  # the worker, if any, reads EOF and exits
            self.answer({"error": "the intermediate process failed to fork the worker"})
            return
        self.answer({"pid": pid})
        with contextlib.suppress(OSError):  # the worker died already: the supervisor reaps it
            os.write(go_w, b"g")
        os.close(go_w)
        if self.log is not None:
            self.log.debug("forked a worker", worker_pid=pid)

    def _intermediate(self, info_r: int, info_w: int, go_r: int, go_w: int, args: list[str], title: str,
                      supervisor_pid: int) -> NoReturn:
        code = 1
        try:
            os.close(info_r)
            os.close(go_w)
            worker = os.fork()
            if worker == 0:
                self._worker(info_w, go_r, args, title, supervisor_pid)
            os.write(info_w, str(worker).encode())
            code = 0
        except BaseException:  # nothing may unwind into the zygote's loop
            code = 1
        os._exit(code)

    def _worker(self, info_w: int, go_r: int, args: list[str], title: str, supervisor_pid: int) -> NoReturn:
        code = EXIT_ORPHANED
        try:
            os.close(info_w)
            self.requests.close()
            os.close(self.reply_fd)
            os.setpgid(0, 0)  # its own process group, like a spawned worker: Ctrl-C reaches the supervisor
            go = os.read(go_r, 1)
            os.close(go_r)
            if go != b"g":
                os._exit(EXIT_ORPHANED)  # the zygote died before the supervisor heard of this worker
            if not _wait_reparented(supervisor_pid):
                os._exit(EXIT_ORPHANED)
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
            if os.getppid() != supervisor_pid:  # the supervisor died before prctl took effect
                os._exit(EXIT_ORPHANED)
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
                signal.signal(sig, signal.SIG_DFL)
            random.seed()
            gc.enable()
            if title:
                set_process_title(title)
            worker_module = importlib.import_module(WORKER_MODULE)
            sys.argv = [worker_module.__file__ or WORKER_MODULE, *args]
            code = int(worker_module.main(args))
        except SystemExit as exc:
            code = _exit_code(exc)
        except BaseException:  # report it like an uncaught exception, never unwind into the zygote
            traceback.print_exc()
            code = 1
        try:
            import atexit

            atexit._run_exitfuncs()
        finally:
            _flush_stdio()
            os._exit(code)


def _wait_reparented(supervisor_pid: int) -> bool:
    """Wait for the intermediate process to exit, which hands this process to the supervisor."""
    deadline = time.monotonic() + REPARENT_TIMEOUT_S
    while time.monotonic() < deadline:
        parent = os.getppid()
        if parent == supervisor_pid:
            return True
        if parent == 1 and supervisor_pid != 1:
            return False  # adopted by init: the supervisor is gone (or is no subreaper)
        time.sleep(0.0005)
    return False


def _parse_fds(argv: Sequence[str]) -> tuple[int, int] | None:
    for i, arg in enumerate(argv):
        if arg == "--fds" and i + 1 < len(argv):
            request, _, reply = argv[i + 1].partition(",")
            try:
                return int(request), int(reply)
            except ValueError:
                return None
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    fds = _parse_fds(argv)
    if fds is None or not sys.platform.startswith("linux"):
        print("usage: python -m agentworker.pools.zygote_process --fds REQUEST,REPLY (Linux only)",
              file=sys.stderr)
        return EXIT_USAGE
    request_fd, reply_fd = fds
    os.set_inheritable(request_fd, False)
    os.set_inheritable(reply_fd, False)
    gc.disable()  # no collections while importing: fewer holes in pages the workers will share
    started = time.monotonic()
    set_process_title("agentworker zygote")
    from agentworker.logs import configure_logging, get_logger
    from agentworker.settings import Settings, SettingsError

    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"agentworker zygote: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(settings.log_level, settings.log_format, role="zygote")
    log = get_logger("agentworker.zygote")
    zygote = Zygote(os.fdopen(request_fd, "rb"), reply_fd)
    zygote.log = log
    from agentworker.tasks.registry import BUILTIN_TASK_MODULES

    required = (WORKER_MODULE, *BUILTIN_TASK_MODULES, *PRELOAD)
    try:
        loaded, skipped = preload((*required, *PRELOAD_OPTIONAL, *settings.zygote_preload), PRELOAD_OPTIONAL)
    except UnsafeToFork as exc:
        log.error("zygote unsafe to fork; workers will start without it", reason=str(exc))
        zygote.answer({"unsafe": str(exc)})
        return EXIT_UNSAFE
    for name, error in skipped.items():
        log.warning("zygote could not preload a module; workers import it themselves", module=name, error=error)
    gc.freeze()  # what was imported stays put: workers' collections never touch these objects
    seconds = round(time.monotonic() - started, 3)
    log.info("zygote ready", modules=len(loaded), skipped=len(skipped), preload_s=seconds)
    zygote.answer({"ready": True, "pid": os.getpid(), "modules": len(loaded), "preload_s": seconds})
    try:
        return zygote.serve()
    except BrokenPipeError:
        return EXIT_OK  # the supervisor is gone


if __name__ == "__main__":
    sys.exit(main())
