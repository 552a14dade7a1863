"""Queue scenarios, run against every system: throughput (a), enqueue-to-start latency (b), noisy neighbour (f).

Every run starts from an empty Redis and its own worker processes, and is bounded: a system that cannot
finish within the time budget is measured on what it finished (and the row says so).
"""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from bench.redis_server import PrivateRedis
from bench.report import Metric, Target, summary
from bench.systems import CONCURRENCY, AgentWorker, System, wait_until


@dataclass(frozen=True)
class Options:
    quick: bool = False

    @property
    def noop_jobs(self) -> int:
        return 200 if self.quick else 5000

    @property
    def sleep_jobs(self) -> int:
        return 60 if self.quick else 2000

    sleep_s: float = 0.02

    @property
    def budget_s(self) -> float:
        """Seconds a throughput run may take after its first job started."""
        return 3.0 if self.quick else 30.0

    @property
    def latency_jobs(self) -> int:
        return 20 if self.quick else 200

    latency_interval_s: float = 0.02

    @property
    def restart_samples(self) -> int:
        return 2 if self.quick else 10

    @property
    def default_backoff_samples(self) -> int:
        return 0 if self.quick else 3

    @property
    def metrics_restarts(self) -> int:
        return 3 if self.quick else 200

    @property
    def neighbour_jobs(self) -> int:
        return 5 if self.quick else 100

    @property
    def crash_samples(self) -> int:
        """agentworker: kills in a row; ARQ: jobs running on the one worker killed."""
        return 3 if self.quick else 40

    @property
    def crash_arq_job_timeout_s(self) -> float:
        """ARQ's job_timeout in the crash scenario: its killed job's in-progress key lives this + 10 s."""
        return 1.0 if self.quick else 5.0

    neighbour_interval_s: float = 0.1
    flood_job_s: float = 0.1
    flood_factor: float = 10.0

    @property
    def neighbour_wait_s(self) -> float:
        """How long B's last jobs may still take after B stopped sending; slower ones count as censored."""
        return 1.5 if self.quick else 10.0


@dataclass
class Bench:
    options: Options
    redis: PrivateRedis
    workdir: Path
    systems: tuple[str, ...]
    make: Callable[[str], System]
    metrics: dict[str, Metric]
    log: Callable[[str], None]

    def metric(self, key: str, label: str, unit: str, better: str, *targets: Target) -> Metric:
        if key not in self.metrics:
            self.metrics[key] = Metric(key=key, label=label, unit=unit, better=better, targets=list(targets))
        return self.metrics[key]


def memory_of(pid: int) -> dict[str, float]:
    """RSS, USS and PSS of a process, in MiB."""
    info = psutil.Process(pid).memory_full_info()
    return {"rss": info.rss / 2**20, "uss": info.uss / 2**20, "pss": getattr(info, "pss", 0) / 2**20}


async def fill(system: System, kind: str, n: int, seconds: float = 0.0, tenants: int = 16) -> list[str]:
    """Enqueue ``n`` jobs, 100 at a time, spread over ``tenants`` tenants."""
    refs: list[str] = []
    for start in range(0, n, 100):
        batch = range(start, min(n, start + 100))
        refs += await asyncio.gather(*(system.enqueue(kind, f"tenant{i % tenants}", f"{kind}-{i}", seconds)
                                       for i in batch))
    return refs


# -- (a) throughput, and (d) memory after it ----------------------------------------------------------------


async def throughput(bench: Bench, kind: str) -> None:
    opts = bench.options
    n = opts.noop_jobs if kind == "noop" else opts.sleep_jobs
    label = (f"throughput, {n:,} no-op jobs" if kind == "noop"
             else f"throughput, {n:,} jobs of {opts.sleep_s * 1000:g} ms")
    targets = [Target("ratio_min", 1.0, against="saq"), Target("ratio_min", 4.0, against="arq-default")]
    metric = bench.metric(f"throughput_{kind}", label, "jobs/s", "higher", *(targets if kind == "noop" else []))
    for key in bench.systems:
        bench.redis.flush()
        system = bench.make(key)
        try:
            refs = await fill(system, kind, n, opts.sleep_s)
            await system.start_workers(warm=False)
            await wait_until(lambda s=system: _started(s, n), 90, f"{system.title} to start a job", interval=0.01)
            timed_out = False
            try:
                await wait_until(lambda s=system: _drained(s), opts.budget_s, "the queue to drain", interval=0.02)
            except TimeoutError:
                timed_out = True  # measured on what it finished within the budget
            stopped_at = time.time()
            if kind == "noop":
                _record_memory(bench, system)
            timings = await system.timings(refs)
        finally:
            await system.close()
        first = min(t.started for t in timings.values())
        if timed_out:
            metric.values[key] = len(timings) / (stopped_at - first)
            metric.notes[key] = f"{len(timings):,}/{n:,} done in {opts.budget_s:g} s"
        else:
            metric.values[key] = len(timings) / (max(t.finished for t in timings.values()) - first)
            if len(timings) < n:  # e.g. SAQ's sweeper aborts a job now and then ("swept")
                metric.notes[key] = f"{n - len(timings):,} job(s) lost"
        metric.details[key] = {"jobs": n, "done": len(timings)}
        bench.log(f"  {label}: {system.title} {metric.values[key]:.0f} jobs/s")


async def _drained(system: System) -> bool:
    return not await system.remaining()


async def _started(system: System, n: int) -> bool:
    if system.process is not None and not system.process.alive():
        raise RuntimeError(f"{system.title} exited; see {system.process.log_path}")
    return await system.remaining() < n


def _record_memory(bench: Bench, system: System) -> None:
    rss = bench.metric("memory_rss", "memory per worker process, RSS", "MiB", "lower")
    uss = bench.metric("memory_uss", "memory per worker process, USS", "MiB", "lower")
    pss = bench.metric("memory_pss", "memory per worker process, PSS", "MiB", "lower")
    pids = system.worker_pids()
    if not pids:
        return
    measured = memory_of(pids[0])
    rss.values[system.key], uss.values[system.key], pss.values[system.key] = (
        measured["rss"], measured["uss"], measured["pss"])
    if isinstance(system, AgentWorker) and (zygote := system.zygote_pid()) is not None:
        rss.details["agentworker zygote"] = memory_of(zygote)


# -- (b) enqueue-to-start latency at low load -----------------------------------------------------------------


async def paced(system: System, n: int, interval: float, tenant: str, prefix: str) -> list[tuple[str, float]]:
    """Send ``n`` no-op jobs, one every ``interval`` s; return (ref, wall clock just before enqueue)."""
    sent: list[tuple[str, float]] = []
    start = time.monotonic()
    for i in range(n):
        delay = start + i * interval - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        before = time.time()
        sent.append((await system.enqueue("noop", tenant, f"{prefix}-{i}"), before))
    return sent


async def latencies(system: System, sent: list[tuple[str, float]], wait: float) -> tuple[list[float], int]:
    """Enqueue-to-start latencies (s) of the jobs in ``sent`` that started within ``wait`` s, and how many did not."""
    refs = [ref for ref, _ in sent]
    deadline = time.monotonic() + wait
    timings = await system.timings(refs)
    while len(timings) < len(refs) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        timings = await system.timings(refs)
    found = [timings[ref].started - before for ref, before in sent if ref in timings]
    return found, len(refs) - len(found)


async def latency(bench: Bench) -> None:
    opts = bench.options
    p50 = bench.metric("latency_p50", "enqueue-to-start latency p50, low load", "ms", "lower", Target("max", 5.0))
    p99 = bench.metric("latency_p99", "enqueue-to-start latency p99, low load", "ms", "lower", Target("max", 25.0))
    for key in bench.systems:
        bench.redis.flush()
        system = bench.make(key)
        try:
            await system.start_workers()
            sent = await paced(system, opts.latency_jobs, opts.latency_interval_s, "latency", "lat")
            found, missing = await latencies(system, sent, 30)
        finally:
            await system.close()
        stats = summary([x * 1000 for x in found])
        p50.values[key], p99.values[key] = stats["p50"], stats["p99"]
        p50.details[key] = {**stats, "missing": missing, "interval_ms": opts.latency_interval_s * 1000}
        bench.log(f"  latency: {system.title} p50 {stats['p50']:.1f} ms, p99 {stats['p99']:.1f} ms")


# -- (f) noisy neighbour ------------------------------------------------------------------------------------


def neighbour_tenants(system: System) -> tuple[str, str]:
    """Tenant A and tenant B. For agentworker, B is the first candidate routed to another shard than A:
    shards are the unit of fairness (a tenant always maps to one shard of its pool)."""
    a = "tenant-a"
    if not isinstance(system, AgentWorker):
        return a, "tenant-b"
    for i in range(100):
        b = f"tenant-b{i}" if i else "tenant-b"
        if system.route_shard(b) != system.route_shard(a):
            return a, b
    raise RuntimeError("no tenant on another shard")


async def flood(system: System, tenant: str, rate: float, seconds: float, job_s: float) -> int:
    """Enqueue sleep jobs of ``tenant`` at ``rate`` per second, in batches every 10 ms."""
    sent = 0
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        due = int((time.monotonic() - start) * rate) - sent
        if due > 0:
            await asyncio.gather(*(system.enqueue("sleep", tenant, f"flood-{sent + i}", job_s) for i in range(due)))
            sent += due
        await asyncio.sleep(0.01)
    return sent


def _flood_process(make: Callable[[str], System], key: str, tenant: str, rate: float, seconds: float,
                   job_s: float) -> int:
    async def run() -> int:
        system = make(key)
        try:
            return await flood(system, tenant, rate, seconds, job_s)
        finally:
            await system.redis.aclose()

    return asyncio.run(run())


async def flood_elsewhere(bench: Bench, key: str, tenant: str, rate: float, seconds: float, job_s: float) -> int:
    """:func:`flood` from another process: tenant A is another backend, and its enqueue loop must not
    slow down tenant B's client in this process."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await loop.run_in_executor(pool, _flood_process, bench.make, key, tenant, rate, seconds, job_s)


#: tenant A's max_concurrency in the capped run, out of the pool's 10 slots: room is left for the others
NEIGHBOUR_CAP = 8


async def noisy_neighbour(bench: Bench) -> None:
    """Tenant B's latency alone, then beside tenant A flooding the same pool. agentworker runs twice:
    without tenant caps (like ARQ and SAQ, which have none) and with ``max_concurrency`` for every tenant."""
    opts = bench.options
    factor = f"{opts.flood_factor:g}x"
    runs: list[tuple[str, str, dict[str, Any] | None]] = [(key, "", None) for key in bench.systems]
    if "agentworker" in bench.systems:
        runs.append(("agentworker", "_capped", {"max_concurrency": NEIGHBOUR_CAP}))
    for key, suffix, caps in runs:
        what = f", tenants capped at max_concurrency {NEIGHBOUR_CAP}" if suffix else ""
        alone_p50 = bench.metric(f"neighbour_alone_p50{suffix}", f"tenant B alone, latency p50{what}", "ms",
                                 "lower")
        alone_p99 = bench.metric(f"neighbour_alone_p99{suffix}", f"tenant B alone, latency p99{what}", "ms",
                                 "lower")
        with_p50 = bench.metric(f"neighbour_p50{suffix}", f"tenant B beside A flooding at {factor}, p50{what}",
                                "ms", "lower")
        with_p99 = bench.metric(f"neighbour_p99{suffix}", f"tenant B beside A flooding at {factor}, p99{what}",
                                "ms", "lower",
                                Target("ratio_max", 2.0, against_metric=f"neighbour_alone_p99{suffix}"))
        system = AgentWorker(bench.redis.url, bench.workdir, tenant_defaults=caps) if caps else bench.make(key)
        result = await _neighbour_run(bench, system, key)
        alone = [x * 1000 for x in result["alone"]]
        alone_p50.values[key], alone_p99.values[key] = summary(alone)["p50"], summary(alone)["p99"]
        _censored(with_p50, key, result["beside"], result["censored"], 50, opts.neighbour_wait_s)
        _censored(with_p99, key, result["beside"], result["censored"], 99, opts.neighbour_wait_s)
        with_p99.details[key] = {k: v for k, v in result.items() if k not in ("alone", "beside")}
        shown = with_p99.notes.get(key) or f"{with_p99.values[key]:.1f} ms"
        bench.log(f"  noisy neighbour{what}: {system.title} B alone p99 {alone_p99.values[key]:.1f} ms, "
                  f"beside A p99 {shown}")


async def _neighbour_run(bench: Bench, system: System, key: str) -> dict[str, Any]:
    opts = bench.options
    capacity = CONCURRENCY / opts.flood_job_s
    rate = opts.flood_factor * capacity
    run_s = opts.neighbour_jobs * opts.neighbour_interval_s
    bench.redis.flush()
    a, b = neighbour_tenants(system)
    try:
        await system.start_workers()
        sent = await paced(system, opts.neighbour_jobs, opts.neighbour_interval_s, b, "alone")
        alone, _ = await latencies(system, sent, opts.neighbour_wait_s)
        flooding = asyncio.create_task(flood_elsewhere(bench, key, a, rate, run_s + 2.0, opts.flood_job_s))
        await wait_until(lambda s=system: _backlog(s), 30, "tenant A's flood to start", interval=0.01)
        await asyncio.sleep(0.5)  # let A's backlog build up first
        sent = await paced(system, opts.neighbour_jobs, opts.neighbour_interval_s, b, "beside")
        flooded = await flooding
        beside, censored = await latencies(system, sent, opts.neighbour_wait_s)
    finally:
        await system.close()
    return {"alone": alone, "beside": beside, "censored": censored, "flood_jobs": flooded, "flood_rate": rate,
            "capacity": capacity, "b_jobs": len(sent), "tenants": [a, b]}


async def _backlog(system: System) -> bool:
    return await system.remaining() > 0


def _censored(metric: Metric, key: str, found: list[float], missing: int, q: float, wait: float) -> None:
    """A percentile where ``missing`` samples never started: if the percentile falls among them it is only
    known to be above the last time waited."""
    total = len(found) + missing
    rank = max(1, math.ceil(q / 100 * total))
    if rank > len(found):
        metric.values[key] = None
        metric.notes[key] = f"> {wait:g} s after the last send ({missing}/{total} not started)"
        return
    metric.values[key] = sorted(found)[rank - 1] * 1000
