"""The supervisor's reconcile loop in process, as gunicorn tests its arbiter: the processes are fakes.

``Supervisor(..., spawner=...)`` starts them through a :class:`FakeHost`, which also stands in for the
two calls to the kernel the loop makes besides spawning: ``waitpid`` (``process.reap``) and ``kill``
(``os.kill``, for the fake pids only: they are above the kernel's ``pid_max``, so no real process can
ever be signalled by mistake). A fake process writes the heartbeat file named on its command line, as a
worker does, and answers signals as the test tells it to (drain and exit, ignore SIGTERM, die).
Everything else is the real loop: slots, backoff, heartbeats, reloads, drains.

What needs real processes (PDEATHSIG, the zygote, SIGCHLD, kill -9 of a real worker) stays in
``test_supervisor.py``, ``test_supervisor_lifecycle.py``, ``test_crash_recovery.py`` and ``test_zygote.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from agentworker.config import QuotaFileWatch
from agentworker.settings import Settings
from agentworker.supervisor import process, reconcile
from agentworker.supervisor.metrics_archive import MetricsArchive
from agentworker.supervisor.reconcile import Supervisor
from agentworker.supervisor.slots import WorkerSlot

#: above any pid the kernel hands out (pid_max is at most 2**22)
FIRST_FAKE_PID = 10_000_000


class FakeProcess:
    """A worker that exists only in the test: it serves by writing its heartbeat file."""

    def __init__(self, host: FakeHost, pid: int, argv: list[str], env: dict[str, str]) -> None:
        self.host = host
        self.pid = pid
        self.argv = argv
        self.env = env
        self.pool = argv[argv.index("--pool") + 1]
        self.slot = int(argv[argv.index("--slot") + 1])
        self.status_path = Path(argv[argv.index("--status-file") + 1])
        self.signals: list[int] = []
        self.alive = True
        #: what SIGTERM does: "exit" (drains at once and exits 0) or "ignore" (a blocked loop)
        self.on_term = host.on_term
        self.beating = host.serve_at_start
        self.state = "serving"
        self.jobs_served = 0

    def beat(self) -> None:
        """One heartbeat, as the worker's event loop writes it every second."""
        if not (self.alive and self.beating):
            return
        self.status_path.write_text(json.dumps({
            "pid": self.pid, "state": self.state, "ts": time.time(), "started_at": time.time(),
            "jobs_served": self.jobs_served, "running": 0, "redis_ok": True}))

    def exit(self, code: int) -> None:
        if self.alive:
            self.alive = False
            self.host.exited.append((self.pid, code))


class FakeHost:
    """Spawner, ``waitpid`` and ``kill`` of fake worker processes."""

    def __init__(self) -> None:
        self.processes: dict[int, FakeProcess] = {}
        self.exited: list[tuple[int, int]] = []
        self._pids = itertools.count(FIRST_FAKE_PID)
        self.on_term = "exit"
        self.serve_at_start = True
        self.spawn_error: OSError | None = None

    def spawn(self, argv: list[str], env: dict[str, str]) -> int:
        if self.spawn_error is not None:
            raise self.spawn_error
        pid = next(self._pids)
        self.processes[pid] = FakeProcess(self, pid, argv, env)
        return pid

    def reap(self) -> list[tuple[int, int]]:
        exited, self.exited = self.exited, []
        return exited

    def kill(self, pid: int, sig: int) -> None:
        proc = self.processes.get(pid)
        if proc is None or not proc.alive:
            raise ProcessLookupError(pid)
        proc.signals.append(sig)
        if sig == signal.SIGKILL:
            proc.exit(-signal.SIGKILL)
        elif sig == signal.SIGTERM and proc.on_term == "exit":
            proc.exit(0)

    def live(self, pool: str = "standard", slot: int | None = None) -> list[FakeProcess]:
        return [p for p in self.processes.values()
                if p.alive and p.pool == pool and (slot is None or p.slot == slot)]

    def beat(self) -> None:
        for proc in self.processes.values():
            proc.beat()


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    fake = FakeHost()
    real_kill = os.kill

    def kill(pid: int, sig: int) -> None:
        if pid >= FIRST_FAKE_PID:
            fake.kill(pid, sig)
        else:
            real_kill(pid, sig)

    monkeypatch.setattr(process, "reap", fake.reap)
    monkeypatch.setattr(os, "kill", kill)
    return fake


FAST = {"restart_backoff_initial": 0.05, "restart_backoff_max": 0.4, "shutdown_grace": 0.1,
        "config_poll_interval": 0, "worker_start_timeout": 5}


def pool(**settings: Any) -> dict[str, Any]:
    return {"shards": 2, "processes": 2, "concurrency": 4, "job_timeout": 30, "hang_timeout": 30, **settings}


class Harness:
    def __init__(self, host: FakeHost, tmp_path: Path, pools: dict[str, dict[str, Any]], **settings: Any) -> None:
        self.host = host
        self.path = tmp_path / "quotas.yaml"
        self.write({"default_pool": next(iter(pools)), "pools": pools})
        watch = QuotaFileWatch(self.path)
        (tmp_path / "run").mkdir()
        (tmp_path / "metrics").mkdir()
        self.gone: list[tuple[str, int]] = []
        self.sup = Supervisor(settings=Settings.from_env({}, **{**FAST, **settings}), watch=watch,
                              config=watch.load(), run_dir=tmp_path / "run",
                              metrics=MetricsArchive(tmp_path / "metrics"), child_env={"CHILD": "env"},
                              spawner=host.spawn)
        self.sup.on_worker_gone = lambda pool_name, pid: self.gone.append((pool_name, pid))
        # What the runner's observer answers once it has moved queued jobs to their new queues.
        self.sup.on_reload = lambda: self.sup.rerouted(self.sup.config_version)

    def write(self, data: dict[str, Any]) -> None:
        self.path.write_text(yaml.safe_dump(data))

    def turn(self) -> None:
        self.host.beat()
        self.sup.turn()

    async def until(self, condition: Callable[[], bool], timeout: float = 5, what: str = "condition") -> None:
        """Turn the loop (the fakes beating) until ``condition()``; fail after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.turn()
            if condition():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}")
            await asyncio.sleep(0.01)

    def slot(self, index: int, pool_name: str = "standard") -> WorkerSlot:
        return self.sup.pools[pool_name].slots[index]

    def serving(self, pool_name: str = "standard") -> int:
        return self.sup.pools[pool_name].serving

    def restarts(self, reason: str, pool_name: str = "standard") -> int:
        return self.sup.restart_counts.get((pool_name, reason), 0)


@pytest.fixture
def harness(host: FakeHost, tmp_path: Path) -> Callable[..., Harness]:
    def make(pools: dict[str, dict[str, Any]] | None = None, **settings: Any) -> Harness:
        return Harness(host, tmp_path, pools or {"standard": pool()}, **settings)

    return make


async def test_every_slot_gets_a_worker_that_serves(harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness({"standard": pool(processes=2), "premium": pool(processes=1)})
    await h.until(lambda: h.serving() == 2 and h.serving("premium") == 1, what="three workers serving")
    assert sorted((p.pool, p.slot) for p in host.processes.values()) == [
        ("premium", 0), ("standard", 0), ("standard", 1)], "one process per slot, none more"
    proc = host.live(slot=1)[0]
    assert proc.argv[1:3] == ["-m", "agentworker.pools.worker"] and proc.env == {"CHILD": "env"}
    assert proc.status_path.parent == h.sup.run_dir
    for _ in range(5):
        h.turn()
    assert len(host.processes) == 3, "a steady state starts nothing"


async def test_a_worker_that_dies_is_restarted_after_a_backoff_that_grows(
        harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness({"standard": pool(processes=1)})
    await h.until(lambda: h.serving() == 1, what="a worker serving")
    waits = []
    for crash in range(1, 4):
        [proc] = host.live()
        proc.exit(1)
        died = time.monotonic()
        h.turn()
        slot = h.slot(0)
        assert slot.current is None and slot.last_exit is not None and slot.last_exit.code == 1
        assert h.gone[-1] == ("standard", proc.pid), "its job leases are released at once"
        await h.until(lambda proc=proc: any(p.pid != proc.pid for p in host.live()), what="a restart")
        waits.append(time.monotonic() - died)
        assert slot.backoff.failures == crash and h.restarts("crash") == crash
    # initial 0.05 s, doubling, times a jitter in [0.8, 1]
    assert waits[0] >= 0.04 and waits[1] >= 0.08 and waits[2] >= 0.16, waits
    assert waits[0] < waits[2]
    # A clean exit counts as "exit", not a crash; a process that had stayed up is replaced at once.
    [proc] = host.live()
    await h.until(lambda: h.slot(0).current is not None and h.slot(0).current.serving, what="serving")
    h.slot(0).current.started_mono -= 60  # it has been up for a minute
    proc.exit(0)
    h.turn()
    assert [p.pid for p in host.live()] != [proc.pid] and len(host.live()) == 1, "replaced in the same turn"
    assert h.restarts("exit") == 1 and h.slot(0).backoff.failures == 1


async def test_an_exit_of_a_process_that_is_not_a_worker_is_ignored(
        harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness({"standard": pool(processes=1)})
    await h.until(lambda: h.serving() == 1, what="a worker serving")
    host.exited.append((FIRST_FAKE_PID + 999, 0))  # an orphan re-parented to the supervisor (PID 1)
    h.turn()
    assert h.serving() == 1 and h.gone == [] and sum(h.sup.restart_counts.values()) == 0


async def test_a_worker_that_cannot_be_started_is_tried_again(
        harness: Callable[..., Harness], host: FakeHost) -> None:
    host.spawn_error = OSError(24, "Too many open files")
    h = harness({"standard": pool(processes=1)})
    h.turn()
    assert h.slot(0).current is None and h.slot(0).backoff.failures == 1
    host.spawn_error = None
    await h.until(lambda: h.serving() == 1, what="the next try to start it")


async def test_a_hung_worker_is_terminated_killed_after_a_grace_and_replaced(
        harness: Callable[..., Harness], host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "HUNG_KILL_GRACE_S", 0.2)
    h = harness({"standard": pool(processes=1, hang_timeout=0.2)})
    await h.until(lambda: h.serving() == 1, what="a worker serving")
    [hung] = host.live()
    hung.beating = False  # its event loop is blocked: the heartbeat file goes stale
    hung.on_term = "ignore"  # ... and it cannot drain
    await h.until(lambda: signal.SIGTERM in hung.signals, what="SIGTERM to the hung worker")
    assert h.restarts("hung") == 1 and hung in host.live()
    await h.until(lambda: not hung.alive, what="SIGKILL after the grace")
    assert hung.signals == [signal.SIGTERM, signal.SIGKILL]
    await h.until(lambda: h.serving() == 1, what="a replacement")
    assert h.slot(0).last_exit is not None and h.slot(0).last_exit.reason == "hung"
    assert h.slot(0).last_exit.description == "killed by SIGKILL"


async def test_a_worker_that_never_writes_a_heartbeat_is_replaced_after_the_start_timeout(
        harness: Callable[..., Harness], host: FakeHost) -> None:
    host.serve_at_start = False
    h = harness({"standard": pool(processes=1)}, worker_start_timeout=0.2)
    await h.until(lambda: len(host.processes) == 1, what="a start")
    [silent] = host.live()
    await h.until(lambda: not silent.alive, what="the silent worker to be stopped")
    assert silent.signals == [signal.SIGTERM] and h.restarts("hung") == 1
    host.serve_at_start = True
    await h.until(lambda: h.serving() == 1, what="a replacement that serves")


async def test_a_worker_past_max_jobs_is_recycled_once_its_replacement_serves(
        harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness({"standard": pool(processes=1, max_jobs_per_process=100)})
    await h.until(lambda: h.serving() == 1, what="a worker serving")
    [old] = host.live()
    host.serve_at_start = False  # the replacement takes its time to import
    old.jobs_served = 100
    await h.until(lambda: len(host.live()) == 2, what="a replacement to start")
    [new] = [p for p in host.live() if p is not old]
    for _ in range(5):
        h.turn()
    assert old.signals == [], "the old worker serves until its replacement does"
    assert h.slot(0).incoming is not None and h.slot(0).incoming.pid == new.pid
    new.beating = True
    await h.until(lambda: ("standard", old.pid) in h.gone, what="the old worker to drain and be reaped")
    assert old.signals == [signal.SIGTERM] and h.slot(0).current is not None and h.slot(0).current.pid == new.pid
    assert h.restarts("recycle") == 1 and h.slot(0).last_exit is not None
    assert h.slot(0).last_exit.reason == "recycle"


async def test_a_replacement_that_dies_before_serving_leaves_the_old_worker_serving(
        harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness({"standard": pool(processes=1, max_jobs_per_process=10)})
    await h.until(lambda: h.serving() == 1, what="a worker serving")
    [old] = host.live()
    host.serve_at_start = False
    old.jobs_served = 10
    await h.until(lambda: len(host.live()) == 2, what="a replacement to start")
    [doomed] = [p for p in host.live() if p is not old]
    doomed.exit(1)
    host.serve_at_start = True
    h.turn()
    assert old.alive and old.signals == [] and h.slot(0).current is not None and h.slot(0).current.pid == old.pid
    await h.until(lambda: not old.alive, what="a second replacement to take over")
    assert h.restarts("crash") == 1 and h.restarts("recycle") == 1 and h.serving() == 1


async def test_a_reload_signals_every_worker_and_replaces_changed_pools_one_slot_at_a_time(
        harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness({"standard": pool(processes=2), "premium": pool(processes=1)})
    await h.until(lambda: h.serving() == 2 and h.serving("premium") == 1, what="every worker serving")
    old = {p.pid: p for p in host.live()}
    premium = host.live("premium")[0]
    host.serve_at_start = False  # replacements serve when the test says so
    h.write({"default_pool": "standard", "pools": {"standard": pool(processes=2, concurrency=8),
                                                   "premium": pool(processes=1, hang_timeout=60)}})
    answer = h.sup.request_reload("test")
    await h.until(answer.done, what="the reload to be applied")
    result = answer.result()
    assert result.ok and result.plan is not None and result.plan.replaced == ("standard",)
    assert all(p.signals[:1] == [signal.SIGHUP] for p in [*old.values(), premium]), "tenant limits apply at once"
    for slot in (0, 1):
        await h.until(lambda slot=slot: len(host.live(slot=slot)) == 2, what=f"slot {slot}'s replacement")
        assert len(host.live()) == 3, "one slot at a time"
        [new] = [p for p in host.live(slot=slot) if p.pid not in old]
        new.beating = True
        await h.until(lambda slot=slot: len(host.live(slot=slot)) == 1, what=f"slot {slot}'s old worker to go")
    assert not any(p.alive for p in old.values() if p.pool == "standard")
    assert h.restarts("reload") == 2 and premium.alive, "a supervisor-only setting replaces nothing"
    assert h.sup.pools["standard"].quota.concurrency == 8


async def test_a_reload_adds_and_removes_pools_and_slots(harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness({"standard": pool(processes=2), "premium": pool(processes=1)})
    await h.until(lambda: h.serving() == 2 and h.serving("premium") == 1, what="every worker serving")
    [premium] = host.live("premium")
    [second] = host.live(slot=1)
    h.write({"default_pool": "standard", "pools": {"standard": pool(processes=1), "bulk": pool(processes=2)}})
    answer = h.sup.request_reload("test")
    await h.until(lambda: answer.done() and h.serving("bulk") == 2 and not premium.alive and not second.alive,
                  what="the new shape")
    plan = answer.result().plan
    assert plan is not None and plan.added == ("bulk",) and plan.removed == ("premium",)
    assert plan.resized == {"standard": (2, 1)}
    # Removed slots drain (SIGTERM, no SIGHUP: the new file is not theirs); the slot that stays is told.
    assert premium.signals == [signal.SIGTERM] and second.signals == [signal.SIGTERM]
    assert host.live(slot=0)[0].signals == [signal.SIGHUP]
    assert set(h.sup.pools) == {"standard", "bulk"} and len(host.live()) == 1
    for _ in range(3):
        h.turn()
    assert len(host.live("premium")) == 0 and len(host.live(slot=1)) == 0, "a removed slot is never restarted"
    assert h.sup.leaving == []


async def test_a_refused_quota_file_changes_nothing(harness: Callable[..., Harness], host: FakeHost) -> None:
    h = harness()
    await h.until(lambda: h.serving() == 2, what="two workers serving")
    h.path.write_text("pools: {standard: {concurrency: 0}}")
    answer = h.sup.request_reload("test")
    await h.until(answer.done, what="the reload to be refused")
    assert not answer.result().ok and "concurrency" in " ".join(answer.result().errors)
    assert h.sup.config_version == 1 and all(p.signals == [] for p in host.live())


async def test_a_stop_drains_every_worker_and_kills_those_past_the_deadline(
        harness: Callable[..., Harness], host: FakeHost, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(reconcile, "DRAIN_KILL_MARGIN_S", 0.2)
    h = harness()
    await h.until(lambda: h.serving() == 2, what="two workers serving")
    polite, stuck = host.live()
    stuck.on_term = "ignore"
    beats = asyncio.create_task(_beat_forever(host))
    run = asyncio.create_task(h.sup.run())
    try:
        h.sup.request_stop()
        await asyncio.wait_for(run, 5)
    finally:
        beats.cancel()
    assert polite.signals == [signal.SIGTERM] and not polite.alive
    assert stuck.signals == [signal.SIGTERM, signal.SIGKILL] and not stuck.alive
    assert h.sup.finished.is_set() and len(host.processes) == 2, "nothing is restarted while stopping"
    assert sum(h.sup.restart_counts.values()) == 0
    answer = h.sup.request_reload("late")
    h.turn()
    assert answer.done() and not answer.result().ok, "a reload while stopping is refused"


async def test_a_second_stop_request_kills_at_once(harness: Callable[..., Harness], host: FakeHost) -> None:
    host.on_term = "ignore"
    h = harness()
    await h.until(lambda: h.serving() == 2, what="two workers serving")
    run = asyncio.create_task(h.sup.run())
    h.sup.request_stop()
    await h.until(lambda: all(p.signals == [signal.SIGTERM] for p in host.live()), what="SIGTERM to both")
    h.sup.request_stop()
    await asyncio.wait_for(run, 5)
    assert all(p.signals == [signal.SIGTERM, signal.SIGKILL] for p in host.processes.values())


async def _beat_forever(host: FakeHost) -> None:
    while True:
        host.beat()
        await asyncio.sleep(0.02)


def test_fake_pids_are_beyond_any_real_one() -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        assert int(f.read()) < FIRST_FAKE_PID

