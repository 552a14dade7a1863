"""Queue scenarios, run against every system: throughput (a), enqueue-to-start latency (b); the noisy
neighbour (f) is in ``bench/neighbour.py``, fairness inside one shard in ``bench/fair_scenarios.py``.

Every run starts from an empty Redis and its own worker processes, and is bounded: a system that cannot
finish within the time budget is measured on what it finished (and the row says so).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psutil

from bench.redis_server import PrivateRedis
from bench.report import Metric, Target, summary
from bench.systems import AgentWorker, System, wait_until


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

    # -- fairness inside one shard (bench/fair_scenarios.py)

    shard_neighbour_interval_s: float = 0.05

    @property
    def shard_neighbour_prefill(self) -> int:
        """Tenant A's backlog before B starts sending, in the same-shard noisy neighbour."""
        return 300 if self.quick else 5000

    weights: tuple[float, ...] = (1.0, 2.0, 4.0)
    weights_job_s: float = 0.05

    @property
    def weights_warmup_s(self) -> float:
        return 0.3 if self.quick else 2.0

    @property
    def weights_window_s(self) -> float:
        return 1.5 if self.quick else 10.0

    fair_tenants: int = 100
    fair_job_s: float = 0.02
    fair_window_s: float = 2.0

    @property
    def fair_warmup_s(self) -> float:
        return 0.3 if self.quick else 1.0

    @property
    def fair_windows(self) -> int:
        return 1 if self.quick else 4

    claim_cap: int = 2

    @property
    def claim_backlogs(self) -> tuple[int, int]:
        """Tenant A's backlogs (jobs queued beyond its cap) in the claim-cost scenario."""
        return (100, 10_000) if self.quick else (1_000, 100_000)

    @property
    def claim_b_jobs(self) -> int:
        return 10 if self.quick else 100


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
    targets = [Target("ratio_min", 1.0, against="saq"), Target("ratio_min", 1.2, against="saq"),
               Target("ratio_min", 4.0, against="arq-default")]
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
    p50 = bench.metric("latency_p50", "enqueue-to-start latency p50, low load", "ms", "lower", Target("max", 5.0),
                       Target("max", 2.0))
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
