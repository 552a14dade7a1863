"""The reconcile loop: the one place that starts, stops and replaces worker processes.

Signal handlers, the HTTP admin endpoint and the quota-file watcher only set flags or queue requests;
each :meth:`Supervisor.turn` acts on them, then, in order:

1. reaps every exited child (``waitpid(-1, WNOHANG)``; pids that are not ours are orphans, ignored) and
   has the observer release the job leases each dead worker held, so its jobs run again at once;
2. reads each worker's heartbeat file and RSS;
3. per slot: a worker whose heartbeat is older than the pool's ``hang_timeout`` is hung (SIGTERM, then
   SIGKILL after a short grace) and replaced; an empty slot starts a process once its backoff allows;
   a worker over ``memory_limit_mb`` or past ``max_jobs_per_process``, or started with pool settings a
   reload changed, gets a replacement first and drains only once the replacement serves;
4. SIGKILLs whatever outlived its stop deadline.

Workers are forked from the zygote (:mod:`agentworker.supervisor.zygote`) when there is one, else started
with ``posix_spawn``; either way they are the supervisor's children, reaped in step 1. Between ticks the
loop also wakes when a slot's restart backoff ends, so a restart is not late by up to a tick.

Turns are short and never wait on the network: Redis work (routing table, queue depths) happens in
:mod:`agentworker.supervisor.observer`, so a Redis outage cannot stall process supervision.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from agentworker.config import ConfigError, PoolQuota, QuotaConfig
from agentworker.logs import get_logger
from agentworker.settings import Settings
from agentworker.supervisor import process
from agentworker.supervisor.backoff import STABLE_AFTER, RestartBackoff
from agentworker.supervisor.metrics_archive import MetricsArchive
from agentworker.supervisor.process import ExitRecord, WorkerHandle
from agentworker.supervisor.reload import (
    QuotaFileRead,
    QuotaFileWatch,
    ReloadResult,
    plan_reload,
    worker_settings_differ,
)
from agentworker.supervisor.slots import PoolState, WorkerSlot
from agentworker.supervisor.zygote import Zygote

log = get_logger("agentworker.supervisor")

TICK_S = 0.5
#: SIGKILL a draining worker this long after its own shutdown grace has run out
DRAIN_KILL_MARGIN_S = 5.0
#: SIGKILL a hung worker this long after SIGTERM (its loop is blocked: it cannot drain anyway)
HUNG_KILL_GRACE_S = 3.0
RESTART_REASONS = ("exit", "crash", "hung", "memory", "recycle", "reload")
#: most seconds a reload's replacement workers wait for the observer to have moved queued jobs to their new
#: queues (it cannot while Redis is down; then the replacements go ahead)
REROUTE_WAIT_MAX_S = 30.0

Spawner = Callable[[list[str], dict[str, str]], int]


class Supervisor:
    """Keeps ``processes`` workers per pool of the quota file, in numbered slots."""

    def __init__(self, *, settings: Settings, watch: QuotaFileWatch, config: QuotaConfig, run_dir: Path,
                 metrics: MetricsArchive, child_env: dict[str, str], spawner: Spawner = process.spawn,
                 zygote: Zygote | None = None) -> None:
        """``config`` is what ``watch.load()`` returned: the watch compares later content with it.
        ``zygote``: start workers by forking them from it (falling back to ``spawner`` while it is down)."""
        self.settings = settings
        self.config = config
        self.config_path = watch.path
        self.run_dir = run_dir
        self.metrics = metrics
        self.child_env = child_env
        self._spawn = spawner
        self.zygote = zygote
        self.watch = watch
        self.pools: dict[str, PoolState] = {}
        self.leaving: list[WorkerSlot] = []  # slots of removed pools or shrunk pools, draining
        self.by_pid: dict[int, tuple[WorkerSlot, WorkerHandle]] = {}
        self.restart_counts: dict[tuple[str, str], int] = {}
        self.started_at = time.time()
        self.last_turn = time.monotonic()
        self.draining = False
        self.config_version = 1  # bumped on every applied reload (the observer republishes routing)
        #: the config version whose routing the queued jobs in Redis follow (the observer moves them)
        self.rerouted_version = 1
        self._reloaded_at = 0.0
        #: called with (pool, pid) for every worker reaped: the runner releases its job leases in Redis
        self.on_worker_gone: Callable[[str, int], None] | None = None
        #: called after every applied reload: the runner has the observer publish the new routing at once
        self.on_reload: Callable[[], None] | None = None
        self.last_reload: ReloadResult | None = None
        self._stop_requested = False
        self._kill_requested = False
        self._reload_requests: list[tuple[str, asyncio.Future[ReloadResult] | None]] = []
        self._next_file_check = 0.0
        self._wakeup = asyncio.Event()
        #: the quota file is read and validated in a thread: a big file must not stall /health or reaping
        self._file_read = QuotaFileRead(watch, self.wake)
        self.finished = asyncio.Event()
        for name, quota in config.pools.items():
            self._add_pool(name, quota)

    # -- requests (called by signal handlers and HTTP handlers: flags only) -----------------------------

    def request_stop(self) -> None:
        """SIGTERM/SIGINT: drain every worker and exit. A second request kills them at once."""
        if self._stop_requested:
            self._kill_requested = True
        self._stop_requested = True
        self.wake()

    def request_reload(self, trigger: str) -> asyncio.Future[ReloadResult]:
        """Queue a reload of the quota file; the future resolves once the loop has tried it."""
        future: asyncio.Future[ReloadResult] = asyncio.get_running_loop().create_future()
        self._reload_requests.append((trigger, future))
        self.wake()
        return future

    def wake(self) -> None:
        self._wakeup.set()

    def rerouted(self, version: int) -> None:
        """The observer has moved the queued jobs to the queues config ``version`` routes them to."""
        self.rerouted_version = max(self.rerouted_version, version)
        self.wake()

    # -- the loop ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        """Turn until a requested stop has drained every worker."""
        try:
            while True:
                try:
                    self.turn()
                except Exception:
                    # A bug in one turn must not orphan every worker; /health shows a loop that stopped
                    # turning, and the log shows why.
                    log.exception("reconcile turn failed")
                if self.draining and not any(True for _ in self.handles()):
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._sleep_time())
                self._wakeup.clear()
        finally:
            self.finished.set()

    def turn(self) -> None:
        now = time.monotonic()
        if self._stop_requested and not self.draining:
            self._begin_shutdown()
        if self._kill_requested:
            self._kill_requested = False
            for handle in self.handles():
                if not handle.killed:
                    log.warning("second stop request: killing worker", worker_pid=handle.pid, pool=handle.pool)
                    handle.kill()
        self._handle_reloads(now)
        for pid, code in process.reap():
            self._on_exit(pid, code)
        if self.zygote is not None and not self.draining:
            self.zygote.maintain(now)
        for handle in self.handles():
            handle.refresh()
        # After reaping: a slot whose worker just died with no backoff to wait (it had run stably) is
        # started in this very turn.
        now = time.monotonic()
        if not self.draining:
            for pool in self.pools.values():
                for slot in pool.slots:
                    self._reconcile_slot(pool, slot, now)
        self._enforce_deadlines(time.monotonic())
        self.leaving = [s for s in self.leaving if any(True for _ in s.handles())]
        self.last_turn = time.monotonic()

    # -- processes -------------------------------------------------------------------------------------

    def handles(self) -> Iterator[WorkerHandle]:
        for _slot, handle in list(self.by_pid.values()):
            yield handle

    def slots(self) -> Iterator[WorkerSlot]:
        for pool in self.pools.values():
            yield from pool.slots
        yield from self.leaving

    def _sleep_time(self) -> float:
        """Seconds until the next turn: TICK_S, or less when a restart or a kill is due sooner (a slot's
        backoff ending between two ticks would otherwise wait for the next one)."""
        now = time.monotonic()
        deadlines = [h.kill_at for h in self.handles() if h.kill_at is not None and not h.killed]
        if not self.draining:
            if not self._holding_starts():  # else the zygote's ready message wakes the loop
                deadlines += [s.next_start_at for s in self.slots() if s.current is None and not s.removed]
            if self.zygote is not None and (due := self.zygote.next_deadline()) is not None:
                deadlines.append(due)
        future = [d for d in deadlines if d > now]
        return min(TICK_S, max(0.001, min(future) - now)) if future else TICK_S

    def _holding_starts(self) -> bool:
        """The first workers wait for the first zygote to be ready, so that they share its memory."""
        return self.zygote is not None and self.zygote.warming

    def _start(self, pool: PoolState, slot: WorkerSlot) -> WorkerHandle | None:
        status_path = self.run_dir / f"{pool.name}-{slot.index}-{time.monotonic_ns()}.json"
        argv = process.worker_argv(self.config_path, pool.name, slot.index, status_path)
        try:
            if self.zygote is not None:
                pid, via = self.zygote.spawn(argv, self.child_env)
            else:
                pid, via = self._spawn(argv, self.child_env), "spawn"
        except OSError as exc:
            delay = slot.backoff.failed(0.0)
            slot.next_start_at = slot.replace_not_before = time.monotonic() + delay
            log.error("cannot start worker", pool=pool.name, slot=slot.index, error=str(exc), retry_in_s=delay)
            return None
        handle = WorkerHandle(pid=pid, pool=pool.name, slot=slot.index, status_path=status_path, quota=pool.quota)
        self.by_pid[pid] = (slot, handle)
        log.info("worker started", pool=pool.name, slot=slot.index, worker_pid=pid, via=via)
        return handle

    def _count_restart(self, slot: WorkerSlot, reason: str) -> None:
        key = (slot.pool, reason)
        self.restart_counts[key] = self.restart_counts.get(key, 0) + 1
        slot.restarts += 1

    def _on_exit(self, pid: int, code: int) -> None:
        if self.zygote is not None and self.zygote.owns(pid):
            self.zygote.exited(pid, code)
            return
        entry = self.by_pid.pop(pid, None)
        if entry is None:
            log.debug("reaped a process that is not a worker (orphan)", orphan_pid=pid, code=code)
            return
        slot, handle = entry
        if self.on_worker_gone is not None:
            try:
                self.on_worker_gone(slot.pool, pid)
            except Exception as exc:  # must not stop supervision: its leases lapse by themselves
                log.error("cannot schedule the release of a dead worker's jobs", worker_pid=pid, error=repr(exc))
        try:
            self.metrics.retire(pid)
        except (OSError, RuntimeError, ValueError) as exc:  # a corrupt file must not stop supervision
            log.error("cannot archive the metrics of a dead worker", worker_pid=pid, error=str(exc))
        handle.cleanup_files()
        role = slot.forget(handle)
        reason = handle.stop_reason or ("exit" if code == 0 else "crash")
        record = ExitRecord(pid=pid, code=code, reason=reason, at=time.time(), uptime=handle.uptime)
        slot.last_exit = record
        bound = log.bind(pool=slot.pool, slot=slot.index, worker_pid=pid, code=code, reason=reason, role=role,
                         uptime_s=round(handle.uptime, 2))
        if handle.stop_reason is not None:
            bound.info("worker stopped", description=record.description)
            return
        if self.draining or slot.removed:
            bound.warning("worker exited while stopping", description=record.description)
            return
        self._count_restart(slot, reason)
        delay = slot.backoff.failed(handle.uptime)
        now = time.monotonic()
        if role == "incoming":
            slot.replace_not_before = now + delay
            bound.warning("replacement worker died before serving; will retry", description=record.description,
                          retry_in_s=round(delay, 2))
            return
        slot.next_start_at = now + delay
        bound.warning("worker died; restarting", description=record.description, restart_in_s=round(delay, 2),
                      failures_in_a_row=slot.backoff.failures)
        if slot.incoming is not None:  # its replacement was already starting: it takes over
            slot.promote_incoming()

    def _is_hung(self, handle: WorkerHandle, pool: PoolState) -> str | None:
        age = handle.heartbeat_age()
        if age is None:
            if handle.uptime > self.settings.worker_start_timeout:
                return f"no heartbeat {handle.uptime:.1f}s after start"
            return None
        if age > pool.quota.hang_timeout:
            return f"heartbeat {age:.1f}s old (hang_timeout {pool.quota.hang_timeout:g}s)"
        return None

    def _reconcile_slot(self, pool: PoolState, slot: WorkerSlot, now: float) -> None:
        """One slot's step of a turn: replace a hung worker, fill an empty slot, start a replacement when
        one is due, and hand the slot over to a replacement once it serves."""
        self._stop_hung(pool, slot, now)
        if slot.current is None and slot.incoming is not None:
            slot.promote_incoming()
        current = slot.current
        if current is None:
            self._fill(pool, slot, now)
            return
        reason = self._replacement_reason(pool, current)
        self._note_stable(slot, current, reason)
        if reason is not None and self._may_start_replacement(pool, slot, reason, now):
            self._start_replacement(pool, slot, current, reason)
        incoming = slot.incoming
        if incoming is not None and incoming.serving:
            self._hand_over(pool, slot, current, incoming, now)

    def _stop_hung(self, pool: PoolState, slot: WorkerSlot, now: float) -> None:
        """SIGTERM the slot's workers whose heartbeat stopped; the slot replaces them after its backoff."""
        for handle in (slot.current, slot.incoming):
            if handle is None or handle.stop_reason is not None:
                continue
            why = self._is_hung(handle, pool)
            if why is None:
                continue
            log.warning("worker hung; replacing it", pool=pool.name, slot=slot.index, worker_pid=handle.pid,
                        why=why)
            was_current = handle is slot.current
            handle.terminate("hung", HUNG_KILL_GRACE_S)
            slot.retire(handle)
            self._count_restart(slot, "hung")
            delay = slot.backoff.failed(handle.uptime)
            if was_current:
                slot.next_start_at = now + delay
            else:
                slot.replace_not_before = now + delay

    def _fill(self, pool: PoolState, slot: WorkerSlot, now: float) -> None:
        """Start a process in the empty slot once its restart backoff has passed (and the first zygote is
        ready)."""
        if now >= slot.next_start_at and not self._holding_starts():
            slot.current = self._start(pool, slot)

    @staticmethod
    def _note_stable(slot: WorkerSlot, current: WorkerHandle, replacement_reason: str | None) -> None:
        """A worker that has served long enough ends its slot's run of failures (and of memory recycles,
        unless it is over the limit again)."""
        stable = current.serving and current.uptime >= STABLE_AFTER
        if stable and slot.backoff.failures:
            slot.backoff.succeeded()
        if stable and replacement_reason is None:
            slot.memory_backoff.succeeded()

    def _may_start_replacement(self, pool: PoolState, slot: WorkerSlot, reason: str, now: float) -> bool:
        """One replacement at a time per slot, once its backoff allows and the first zygote is ready; a
        reload's replacements also go one slot of the pool at a time, once queued jobs follow the new
        routing."""
        if slot.incoming is not None or now < slot.replace_not_before or self._holding_starts():
            return False
        return reason != "reload" or (not pool.replacing and self._rerouted(now))

    def _start_replacement(self, pool: PoolState, slot: WorkerSlot, current: WorkerHandle, reason: str) -> None:
        """Start the process that replaces ``current`` (which serves on until the new one does)."""
        log.info("starting a replacement worker", pool=pool.name, slot=slot.index, old_pid=current.pid,
                 reason=reason, rss=current.rss)
        slot.incoming = self._start(pool, slot)
        slot.incoming_reason = reason if slot.incoming is not None else None

    def _hand_over(self, pool: PoolState, slot: WorkerSlot, current: WorkerHandle, incoming: WorkerHandle,
                   now: float) -> None:
        """The slot's replacement serves: it takes the slot, and the old worker drains."""
        handover = slot.incoming_reason or "recycle"
        self._count_restart(slot, handover)
        current.terminate(handover, self.settings.shutdown_grace + DRAIN_KILL_MARGIN_S)
        slot.retire(current)
        slot.promote_incoming()
        if handover == "memory":
            slot.replace_not_before = now + slot.memory_backoff.failed(0.0)
        log.info("replacement serving; old worker drains", pool=pool.name, slot=slot.index,
                 old_pid=current.pid, worker_pid=incoming.pid, reason=handover)

    def _rerouted(self, now: float) -> bool:
        """A reload's replacements start once queued jobs follow the new routing: a fresh worker knows
        only the new file and would refuse a job still where the old one routed it (the old workers,
        which took the new file on SIGHUP, still accept those: see tasks/envelope.misrouting_reason)."""
        return self.rerouted_version >= self.config_version or now - self._reloaded_at >= REROUTE_WAIT_MAX_S

    def _replacement_reason(self, pool: PoolState, handle: WorkerHandle) -> str | None:
        if not handle.serving:
            return None
        if worker_settings_differ(handle.quota, pool.quota):
            return "reload"
        if handle.rss is not None and handle.rss > pool.quota.memory_limit_mb * 1024 * 1024:
            return "memory"
        hb = handle.heartbeat
        if hb is not None and hb.jobs_served >= pool.quota.max_jobs_per_process:
            return "recycle"
        return None

    def _enforce_deadlines(self, now: float) -> None:
        for handle in self.handles():
            if handle.kill_at is not None and now >= handle.kill_at and not handle.killed:
                log.warning("worker did not stop in time; killing it", pool=handle.pool, slot=handle.slot,
                            worker_pid=handle.pid, reason=handle.stop_reason)
                handle.kill()

    def _begin_shutdown(self) -> None:
        self.draining = True
        grace = self.settings.shutdown_grace + DRAIN_KILL_MARGIN_S
        log.info("stopping: draining every worker", workers=len(self.by_pid),
                 shutdown_grace_s=self.settings.shutdown_grace)
        for handle in self.handles():
            handle.terminate("stop", grace)

    # -- pools and reloads -----------------------------------------------------------------------------

    def _new_slot(self, pool: str, index: int) -> WorkerSlot:
        s = self.settings
        return WorkerSlot(
            pool=pool, index=index,
            backoff=RestartBackoff(initial=s.restart_backoff_initial, maximum=s.restart_backoff_max),
            memory_backoff=RestartBackoff(initial=s.restart_backoff_initial, maximum=s.restart_backoff_max))

    def _add_pool(self, name: str, quota: PoolQuota) -> None:
        pool = PoolState(name=name, quota=quota)
        pool.slots = [self._new_slot(name, i) for i in range(quota.processes)]
        self.pools[name] = pool

    def _drop_slot(self, slot: WorkerSlot) -> None:
        slot.removed = True
        for handle in list(slot.handles()):
            handle.terminate("stop", self.settings.shutdown_grace + DRAIN_KILL_MARGIN_S)
            slot.retire(handle)
        self.leaving.append(slot)

    def _handle_reloads(self, now: float) -> None:
        if self._file_read.busy:
            return  # requests made meanwhile get the next read: the file may have changed since this one began
        finished = self._file_read.take()
        if finished is not None:
            trigger, waiting, outcome = finished
            result = (ReloadResult(ok=False, trigger=trigger, errors=("the supervisor is stopping",))
                      if self.draining else None if outcome is None else self.reload(trigger, outcome))
            for future in waiting:
                if future is not None and not future.done() and result is not None:
                    future.set_result(result)
        requests, self._reload_requests = self._reload_requests, []
        if self.draining:
            for trigger, future in requests:
                if future is not None and not future.done():
                    future.set_result(ReloadResult(ok=False, trigger=trigger,
                                                   errors=("the supervisor is stopping",)))
            return
        only_if_changed = False
        if not requests and self.settings.config_poll_interval and now >= self._next_file_check:
            self._next_file_check = now + self.settings.config_poll_interval
            requests.append(("file change", None))
            only_if_changed = True
        if not requests:
            return
        # Several requests in one turn: the file is read once and every requester gets that answer.
        self._file_read.start(", ".join(sorted({trigger for trigger, _ in requests})),
                              [future for _trigger, future in requests], only_if_changed=only_if_changed)

    def reload(self, trigger: str, loaded: QuotaConfig | ConfigError) -> ReloadResult:
        """Apply a quota file read and validated in a thread (see :meth:`_handle_reloads`); a refused
        file (``loaded`` is its :class:`ConfigError`) changes nothing, here or in any worker."""
        if isinstance(loaded, ConfigError):
            log.error("quota file reload refused; keeping the running config", trigger=trigger,
                      errors=loaded.errors)
            self.last_reload = ReloadResult(ok=False, trigger=trigger, errors=tuple(loaded.errors))
            return self.last_reload
        new = loaded
        plan = plan_reload(self.config, new)
        self.config = new
        self.config_version += 1
        self._reloaded_at = time.monotonic()
        for name in plan.removed:
            pool = self.pools.pop(name)
            for slot in pool.slots:
                self._drop_slot(slot)
        for name, quota in new.pools.items():
            pool_state = self.pools.get(name)
            if pool_state is None:
                self._add_pool(name, quota)
                continue
            pool_state.quota = quota
            while len(pool_state.slots) > quota.processes:
                self._drop_slot(pool_state.slots.pop())
            while len(pool_state.slots) < quota.processes:
                pool_state.slots.append(self._new_slot(name, len(pool_state.slots)))
        # Tenant limits apply at once: every worker re-reads the file on SIGHUP. Workers of pools whose
        # settings changed are replaced slot by slot by the turns that follow.
        for handle in self.handles():
            if handle.stop_reason is None:
                handle.send(signal.SIGHUP)
        log.info("quota file reloaded", trigger=trigger, **plan.as_dict())
        if self.on_reload is not None:
            self.on_reload()
        self.last_reload = ReloadResult(ok=True, trigger=trigger, plan=plan)
        return self.last_reload

