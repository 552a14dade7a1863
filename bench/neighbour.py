"""Noisy neighbour (f), run against every system: tenant B's enqueue-to-start latency alone, then beside
tenant A flooding the same pool at 10x its capacity from another process."""

from __future__ import annotations

import asyncio
import functools
import math
import multiprocessing
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.report import Metric, Target, summary
from bench.scenarios import Bench, latencies, paced
from bench.systems import CONCURRENCY, AgentWorker, System, wait_until


@dataclass(frozen=True)
class NeighbourCase:
    """One noisy-neighbour setting: where B is, how often it sends, how far A is ahead when it starts."""

    suffix: str  # of the metric keys ("" for the first rows, which the README and the smoke test name)
    what: str  # added to the row labels
    interval_s: float  # B sends a no-op this often
    prefill: int = 0  # A enqueues this many jobs as fast as it can before its flood at 10x
    shards: int | None = None  # agentworker's shards; None: 8, and B on another shard than A
    caps: dict[str, Any] | None = None  # agentworker's tenant_defaults


def neighbour_tenants(system: System, same_shard: bool = False) -> tuple[str, str]:
    """Tenant A and tenant B. For agentworker, B is the first candidate routed to another shard than A
    (unless ``same_shard``): shards are the unit of isolation (a tenant always maps to one shard of its pool)."""
    a = "tenant-a"
    if not isinstance(system, AgentWorker) or same_shard:
        return a, "tenant-b"
    for i in range(100):
        b = f"tenant-b{i}" if i else "tenant-b"
        if system.route_shard(b) != system.route_shard(a):
            return a, b
    raise RuntimeError("no tenant on another shard")


async def flood(system: System, tenant: str, rate: float, seconds: float, job_s: float, prefill: int = 0) -> int:
    """Enqueue ``prefill`` sleep jobs of ``tenant`` at once (100 at a time), then more at ``rate`` per
    second for ``seconds``, in batches every 10 ms."""
    for first in range(0, prefill, 100):
        batch = range(first, min(prefill, first + 100))
        await asyncio.gather(*(system.enqueue("sleep", tenant, f"flood-{i}", job_s) for i in batch))
    sent = prefill
    start = time.monotonic()
    while time.monotonic() - start < seconds:
        due = prefill + int((time.monotonic() - start) * rate) - sent
        if due > 0:
            await asyncio.gather(*(system.enqueue("sleep", tenant, f"flood-{sent + i}", job_s) for i in range(due)))
            sent += due
        await asyncio.sleep(0.01)
    return sent


def _flood_process(make: Callable[[], System], tenant: str, rate: float, seconds: float, job_s: float,
                   prefill: int) -> int:
    async def run() -> int:
        system = make()
        try:
            return await flood(system, tenant, rate, seconds, job_s, prefill)
        finally:
            await system.redis.aclose()

    return asyncio.run(run())


async def flood_elsewhere(make: Callable[[], System], tenant: str, rate: float, seconds: float, job_s: float,
                          prefill: int = 0) -> int:
    """:func:`flood` from another process, with the system ``make`` returns there (picklable; the same
    routing as the workers'): tenant A is another backend, and its enqueue loop must not slow down
    tenant B's client in this process."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return await loop.run_in_executor(pool, _flood_process, make, tenant, rate, seconds, job_s, prefill)


#: tenant A's max_concurrency in the capped run, out of the pool's 10 slots: room is left for the others
NEIGHBOUR_CAP = 8


async def noisy_neighbour(bench: Bench) -> None:
    """Tenant B's latency alone, then beside tenant A flooding the same pool, on another shard. agentworker
    runs twice: without tenant caps (like ARQ and SAQ, which have none) and with ``max_concurrency`` for
    every tenant."""
    uncapped = NeighbourCase("", "", bench.options.neighbour_interval_s)
    capped = NeighbourCase("_capped", f", tenants capped at max_concurrency {NEIGHBOUR_CAP}",
                           bench.options.neighbour_interval_s, caps={"max_concurrency": NEIGHBOUR_CAP})
    for key in bench.systems:
        await neighbour_rows(bench, key, uncapped)
    if "agentworker" in bench.systems:
        await neighbour_rows(bench, "agentworker", capped)


async def neighbour_rows(bench: Bench, key: str, case: NeighbourCase, *targets: Target) -> dict[str, Any]:
    """Run one system in one case and fill its rows: B alone p50/p99, B beside A p50/p99 (``targets`` on
    the p99; by default at most 2x alone), and for a case with a prefill, how many of B's jobs started and
    A's backlog while B sent."""
    opts = bench.options
    factor = f"{opts.flood_factor:g}x"
    sfx, what = case.suffix, case.what
    alone_p50 = bench.metric(f"neighbour_alone_p50{sfx}", f"tenant B alone, latency p50{what}", "ms", "lower")
    alone_p99 = bench.metric(f"neighbour_alone_p99{sfx}", f"tenant B alone, latency p99{what}", "ms", "lower")
    with_p50 = bench.metric(f"neighbour_p50{sfx}", f"tenant B beside A flooding at {factor}, p50{what}", "ms",
                            "lower")
    twice_alone = Target("ratio_max", 2.0, against_metric=f"neighbour_alone_p99{sfx}")
    with_p99 = bench.metric(f"neighbour_p99{sfx}", f"tenant B beside A flooding at {factor}, p99{what}", "ms",
                            "lower", *(targets or [twice_alone]))
    system: System
    flooder: Callable[[], System] = functools.partial(bench.make, key)
    if key == "agentworker" and (case.caps or case.shards):
        system = AgentWorker(bench.redis.url, bench.workdir, tenant_defaults=case.caps, shards=case.shards or 8)
        flooder = functools.partial(AgentWorker, bench.redis.url, bench.workdir, shards=case.shards or 8)
    else:
        system = bench.make(key)
    result = await _neighbour_run(bench, system, flooder, case)
    alone = [x * 1000 for x in result["alone"]]
    alone_p50.values[key], alone_p99.values[key] = summary(alone)["p50"], summary(alone)["p99"]
    _censored(with_p50, key, result["beside"], result["censored"], 50, opts.neighbour_wait_s)
    _censored(with_p99, key, result["beside"], result["censored"], 99, opts.neighbour_wait_s)
    with_p99.details[key] = {k: v for k, v in result.items() if k not in ("alone", "beside")}
    if case.prefill:
        started = bench.metric(f"neighbour_started{sfx}", f"tenant B's jobs started beside A, of {result['b_jobs']} "
                               f"(within {opts.neighbour_wait_s:g} s of its last send){what}", "jobs", "higher")
        started.values[key] = float(result["b_jobs"] - result["censored"])
        backlog = bench.metric(f"neighbour_backlog{sfx}", f"tenant A's backlog while B sent (fewest queued or "
                               f"running){what}", "jobs", "higher")
        backlog.values[key] = float(min(result["backlog"]))
    shown = with_p99.notes.get(key) or f"{with_p99.values[key]:.1f} ms"
    bench.log(f"  noisy neighbour{what}: {system.title} B alone p99 {alone_p99.values[key]:.1f} ms, "
              f"beside A p99 {shown}" + (f"; A's backlog {result['backlog']}" if case.prefill else ""))
    return result


async def _neighbour_run(bench: Bench, system: System, flooder: Callable[[], System],
                         case: NeighbourCase) -> dict[str, Any]:
    opts = bench.options
    capacity = CONCURRENCY / opts.flood_job_s
    rate = opts.flood_factor * capacity
    run_s = opts.neighbour_jobs * case.interval_s
    bench.redis.flush()
    a, b = neighbour_tenants(system, same_shard=case.shards == 1)
    backlog: list[int] = []
    try:
        await system.start_workers()
        sent = await paced(system, opts.neighbour_jobs, case.interval_s, b, "alone")
        alone, _ = await latencies(system, sent, opts.neighbour_wait_s)
        # A floods until after B's last send: B starts once A's backlog is there (at once with a prefill)
        slack_s = 1.0 if case.prefill else 2.0
        flooding = asyncio.create_task(flood_elsewhere(flooder, a, rate, run_s + slack_s, opts.flood_job_s,
                                                       case.prefill))
        await wait_until(lambda s=system: _backlog(s, case.prefill), 60, "tenant A's flood to start", interval=0.01)
        if not case.prefill:
            await asyncio.sleep(0.5)  # let A's backlog build up first
        backlog.append(await system.remaining())
        sent = await paced(system, opts.neighbour_jobs, case.interval_s, b, "beside")
        backlog.append(await system.remaining())
        flooded = await flooding
        beside, censored = await latencies(system, sent, opts.neighbour_wait_s)
    finally:
        await system.close()
    return {"alone": alone, "beside": beside, "censored": censored, "flood_jobs": flooded, "flood_rate": rate,
            "capacity": capacity, "b_jobs": len(sent), "tenants": [a, b], "prefill": case.prefill,
            "interval_ms": case.interval_s * 1000, "backlog": backlog}


async def _backlog(system: System, at_least: int = 0) -> bool:
    return await system.remaining() > at_least


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
