"""What the supervisor tells about itself: pool health, the /status document and its own metrics."""

from __future__ import annotations

import os
import platform
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentworker.supervisor.observer import RedisObserver
from agentworker.supervisor.process import WorkerHandle
from agentworker.supervisor.reconcile import RESTART_REASONS, Supervisor
from agentworker.supervisor.slots import PoolState, WorkerSlot


def _version() -> str:
    try:
        return metadata.version("agentworker")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


_VERSION = _version()

PROCESS_STATES = ("starting", "serving", "draining", "hung", "killed", "stopped")


@dataclass(frozen=True, slots=True)
class PoolHealth:
    name: str
    status: str  # ok, degraded (fewer serving than configured), starting (none yet), failing
    serving: int
    wanted: int
    reason: str | None

    @property
    def ready(self) -> bool:
        return self.serving > 0 and self.status != "failing"


def pool_health(pool: PoolState) -> PoolHealth:
    serving, wanted = pool.serving, len(pool.slots)
    failing = pool.failing_slots
    if failing:
        slot = failing[0]
        last = slot.last_exit.description if slot.last_exit else "failed"
        wait = max(0.0, slot.next_start_at - time.monotonic())
        reason = (f"slot {slot.index}: {last}, {slot.backoff.failures} failures in a row; "
                  f"retrying in {wait:.1f}s (backoff {slot.backoff.last_delay:.1f}s)")
        return PoolHealth(pool.name, "failing", serving, wanted, reason)
    if serving == 0:
        return PoolHealth(pool.name, "starting", serving, wanted, "no worker process serving yet")
    if serving < wanted:
        return PoolHealth(pool.name, "degraded", serving, wanted, f"{serving} of {wanted} processes serving")
    return PoolHealth(pool.name, "ok", serving, wanted, None)


def _process_row(slot: WorkerSlot, handle: WorkerHandle | None, role: str) -> dict[str, Any]:
    row: dict[str, Any] = {"pool": slot.pool, "slot": slot.index, "role": role}
    if handle is None:
        row.update(pid=None, state="backoff" if slot.backoff.failures else "waiting")
    else:
        hb = handle.heartbeat
        age = handle.heartbeat_age()
        row.update(pid=handle.pid, state=handle.state, uptime_s=round(handle.uptime, 1), rss_bytes=handle.rss,
                   jobs_served=hb.jobs_served if hb else 0, running=hb.running if hb else 0,
                   redis_ok=hb.redis_ok if hb else None,
                   heartbeat_age_s=None if age is None else round(age, 1))
    if role == "current":
        row.update(restarts=slot.restarts, failures_in_a_row=slot.backoff.failures,
                   backoff_s=round(slot.backoff.last_delay, 2),
                   memory_backoff_s=round(slot.memory_backoff.last_delay, 2),
                   next_start_in_s=round(max(0.0, slot.next_start_at - time.monotonic()), 2) if handle is None
                   else None,
                   last_exit=slot.last_exit.as_dict() if slot.last_exit else None)
    return row


def _tenant_limits(supervisor: Supervisor, observer: RedisObserver, tenant_id: str) -> dict[str, Any]:
    """The limits an operator compares in-flight and pending with: the quota file's, under the tenant's
    stored entry as far as the observer's cache holds it (no Redis round trip while building /status)."""
    try:
        limits = supervisor.config.limits_of(tenant_id, observer.tenants.cached(tenant_id, stale=True))
    except (KeyError, ValueError):  # a tenant routed by an older config: no limits to show
        return {}
    return {"max_concurrency": limits.max_concurrency, "max_pending": limits.max_pending,
            "rate_limit": limits.rate_limit}


def status_document(supervisor: Supervisor, observer: RedisObserver) -> dict[str, Any]:
    """The JSON of ``GET /status``."""
    now_wall = time.time()
    rows: list[dict[str, Any]] = []
    for slot in supervisor.slots():
        if not slot.removed:
            rows.append(_process_row(slot, slot.current, "current"))
            if slot.incoming is not None:
                rows.append(_process_row(slot, slot.incoming, "incoming"))
        rows.extend(_process_row(slot, h, "retiring") for h in slot.retiring)
    pools: dict[str, Any] = {}
    for name, pool in sorted(supervisor.pools.items()):
        health = pool_health(pool)
        pools[name] = {"status": health.status, "reason": health.reason, "serving": health.serving,
                       "processes": pool.quota.processes, "shards": pool.quota.shards,
                       "concurrency": pool.quota.concurrency, "job_timeout": pool.quota.job_timeout,
                       "max_tries": pool.quota.max_tries, "memory_limit_mb": pool.quota.memory_limit_mb,
                       "max_jobs_per_process": pool.quota.max_jobs_per_process,
                       "restarts": sum(s.restarts for s in pool.slots)}
    snap = observer.snapshot
    queues: dict[str, dict[str, Any]] = {}
    for (pool_name, shard), depth in sorted(snap.queues.items()):
        queues.setdefault(pool_name, {})[str(shard)] = {"ready": depth.ready, "total": depth.total,
                                                        "runnable": depth.runnable,
                                                        "deferred": depth.total - depth.ready}
    last_reload = supervisor.last_reload
    return {
        "supervisor": {
            "pid": os.getpid(), "state": "draining" if supervisor.draining else "running",
            "started_at": supervisor.started_at, "uptime_s": round(now_wall - supervisor.started_at, 1),
            "config": str(supervisor.config_path), "config_version": supervisor.config_version,
            "last_reload": last_reload.as_dict() if last_reload else None,
            "redis_ok": observer.ok, "redis_error": observer.error,
        },
        "pools": pools,
        "processes": rows,
        "queues": queues,
        "tenants": {t: {"in_flight": c.in_flight, "pending": c.pending, **_tenant_limits(supervisor, observer, t)}
                    for t, c in sorted(snap.tenants.items())},
        "dead_letters": dict(sorted(snap.dead_letters.items())),
        "observed_at": snap.at,
        "restarts": {f"{pool}/{reason}": n for (pool, reason), n in sorted(supervisor.restart_counts.items())},
    }


class SupervisorCollector(Collector):
    """The supervisor's own metrics, computed from its state at scrape time.

    A collector rather than Counter/Gauge objects: the values already live in the supervisor, and
    nothing of the supervisor's ends up in the workers' multiprocess directory whatever the environment.
    """

    def __init__(self, supervisor: Supervisor, observer: RedisObserver) -> None:
        self.supervisor = supervisor
        self.observer = observer

    def collect(self) -> Iterator[Metric]:
        sup = self.supervisor
        restarts = CounterMetricFamily("agentworker_worker_restarts_total",
                                       "Worker processes replaced, by reason (exit, crash, hung, memory, "
                                       "recycle, reload).", labels=["pool", "reason"])
        for name in sorted(set(sup.pools) | {pool for pool, _ in sup.restart_counts}):
            for reason in RESTART_REASONS:
                restarts.add_metric([name, reason], sup.restart_counts.get((name, reason), 0))
        yield restarts

        states = GaugeMetricFamily("agentworker_worker_processes", "Worker processes by state.",
                                   labels=["pool", "state"])
        counts: Counter[tuple[str, str]] = Counter((h.pool, h.state) for h in sup.handles())
        for name in sorted(sup.pools):
            for process_state in PROCESS_STATES:
                states.add_metric([name, process_state], counts.get((name, process_state), 0))
        yield states

        rss = GaugeMetricFamily("agentworker_worker_resident_memory_bytes",
                                "Resident memory of each serving worker process.", labels=["pool", "slot"])
        for slot in sup.slots():
            if slot.current is not None and slot.current.rss is not None and not slot.removed:
                rss.add_metric([slot.pool, str(slot.index)], slot.current.rss)
        yield rss

        failing = GaugeMetricFamily("agentworker_pool_failing",
                                    "1 while a slot of the pool keeps failing to start.", labels=["pool"])
        for name, pool_state in sorted(sup.pools.items()):
            failing.add_metric([name], 1 if pool_state.failing_slots else 0)
        yield failing

        depth = GaugeMetricFamily("agentworker_queue_depth", "Jobs due and waiting in each shard queue.",
                                  labels=["pool", "shard"])
        deferred = GaugeMetricFamily("agentworker_queue_deferred",
                                     "Jobs in each shard queue scheduled for later.", labels=["pool", "shard"])
        runnable = GaugeMetricFamily(
            "agentworker_queue_runnable", "Jobs of each pool that could start now: due, and not held back by "
            "their tenant's max_concurrency (what KEDA scales on).", labels=["pool"])
        per_pool: dict[str, int] = {}
        for (pool_name, shard), d in sorted(self.observer.snapshot.queues.items()):
            depth.add_metric([pool_name, str(shard)], d.ready)
            deferred.add_metric([pool_name, str(shard)], d.total - d.ready)
            per_pool[pool_name] = per_pool.get(pool_name, 0) + d.runnable
        for pool_name, count in sorted(per_pool.items()):
            runnable.add_metric([pool_name], count)
        yield depth
        yield deferred
        yield runnable

        tenant_flight = GaugeMetricFamily("agentworker_tenant_in_flight",
                                          "Running jobs per tenant named in the quota file (leases).",
                                          labels=["tenant"])
        tenant_pending = GaugeMetricFamily("agentworker_tenant_pending",
                                           "Jobs waiting per tenant named in the quota file.", labels=["tenant"])
        for tenant, counts_ in sorted(self.observer.snapshot.tenants.items()):
            tenant_flight.add_metric([tenant], counts_.in_flight)
            tenant_pending.add_metric([tenant], counts_.pending)
        yield tenant_flight
        yield tenant_pending

        dead = GaugeMetricFamily("agentworker_dead_letter_entries",
                                 "Entries in each pool's dead letters (agentworker:dead:{pool}) now.", labels=["pool"])
        for pool_name, n in sorted(self.observer.snapshot.dead_letters.items()):
            dead.add_metric([pool_name], n)
        yield dead

        refusals = CounterMetricFamily(
            "agentworker_admission_refusals_total", "Jobs refused at admission (nothing enqueued), by the limit "
            "they were over (max_pending, rate_limit), counted in Redis by the enqueue script for every producer.",
            labels=["pool", "limit"])
        known = self.observer.snapshot.refusals
        for name in sorted(sup.pools):
            for limit in ("max_pending", "rate_limit"):
                refusals.add_metric([name, limit], known.get((name, limit), 0))
        yield refusals

        build = GaugeMetricFamily("agentworker_build_info", "Always 1: the agentworker version and the Python "
                                  "running the supervisor.", labels=["version", "python"])
        build.add_metric([_VERSION, platform.python_version()], 1)
        yield build

        up = GaugeMetricFamily("agentworker_redis_up", "1 if the supervisor's last Redis pass succeeded.")
        up.add_metric([], 1 if self.observer.ok else 0)
        yield up
        loop_age = GaugeMetricFamily("agentworker_supervisor_loop_age_seconds",
                                     "Seconds since the reconcile loop last turned.")
        loop_age.add_metric([], time.monotonic() - sup.last_turn)
        yield loop_age
