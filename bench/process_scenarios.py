"""Process scenarios: restart-to-serving after kill -9 (c), memory without the zygote (d), and the /metrics
scrape after many worker restarts (e)."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import statistics
import time

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from bench.report import BASELINES, Metric, Target
from bench.scenarios import Bench, memory_of
from bench.systems import AgentWorker, System, wait_until

#: a restart backoff short enough that repeated kills measure the start itself, not the backoff
SHORT_BACKOFF = {"AGENTWORKER_RESTART_BACKOFF_INITIAL": "0.01", "AGENTWORKER_RESTART_BACKOFF_MAX": "0.02"}
#: seconds a worker must stay up for the supervisor to reset its backoff (supervisor/backoff.py)
STABLE_AFTER_S = 10.0


async def _job_started(system: System, ref: str, timeout: float = 60) -> float:
    found: dict[str, float] = {}

    async def done() -> bool:
        timings = await system.timings([ref])
        if ref in timings:
            found["started"] = timings[ref].started
        return bool(found)

    await wait_until(done, timeout, f"{system.title} to run job {ref}", interval=0.002)
    return found["started"]


async def _live_worker(system: AgentWorker) -> int:
    pids: list[int] = []

    def one() -> bool:
        pids[:] = system.worker_pids()
        return len(pids) == 1

    await wait_until(one, 30, "one live worker", interval=0.005)
    return pids[0]


async def kill_and_time(system: AgentWorker, n: int) -> float:
    """Kill -9 the worker, enqueue a job at once; seconds from the kill to that job starting."""
    pid = await _live_worker(system)
    killed_at = time.time()
    os.kill(pid, signal.SIGKILL)
    ref = await system.enqueue("noop", "restart", f"restart-{n}-{time.monotonic_ns()}")
    return await _job_started(system, ref) - killed_at


async def cold_start(system: System, n: int) -> float:
    """Start the worker process with a job waiting; seconds from the start to the job starting."""
    ref = await system.enqueue("noop", "restart", f"cold-{n}")
    before = time.time()
    await system.start_workers(warm=False)
    return await _job_started(system, ref) - before


def _restart_metric(bench: Bench, key: str, label: str, *targets: Target) -> Metric:
    return bench.metric(key, label, "ms", "lower", *targets)


async def restart(bench: Bench) -> None:
    opts = bench.options
    rows: list[tuple[Metric, dict[str, str], int]] = []
    if opts.default_backoff_samples:
        rows.append((_restart_metric(bench, "restart_default", "restart-to-serving after kill -9, default settings",
                                     Target("max", 500.0)), {}, opts.default_backoff_samples))
    rows.append((_restart_metric(bench, "restart_zygote", "same, kills in a row (backoff 0.01 s)",
                                 *([] if opts.default_backoff_samples else [Target("max", 500.0)])),
                 SHORT_BACKOFF, opts.restart_samples))
    rows.append((_restart_metric(bench, "restart_afresh", "same, zygote off (worker imports its stack)"),
                 {**SHORT_BACKOFF, "AGENTWORKER_ZYGOTE": "off"}, opts.restart_samples))
    if "agentworker" in bench.systems:
        for metric, env, samples in rows:
            await _agentworker_restarts(bench, metric, env, samples)
    cold = [b for b in BASELINES if b in bench.systems]
    for key in cold:
        cold_samples: list[float] = []
        for n in range(max(2, opts.restart_samples // 3)):
            bench.redis.flush()
            system = bench.make(key)
            try:
                cold_samples.append(await cold_start(system, n))
            finally:
                await system.close()
        value = statistics.median(cold_samples) * 1000
        for metric, _env, _samples in rows:
            metric.values[key] = value
            metric.notes[key] = "cold start"
            metric.details[key] = {"samples_ms": [round(s * 1000, 1) for s in cold_samples]}
        bench.log(f"  cold start: {bench.make(key).title} {value:.0f} ms")


async def _agentworker_restarts(bench: Bench, metric: Metric, env: dict[str, str], samples: int) -> None:
    bench.redis.flush()
    system = AgentWorker(bench.redis.url, bench.workdir, env=env)
    measured = []
    try:
        await system.start_workers()
        for n in range(samples):
            if not env:  # a worker that has been up STABLE_AFTER: replaced at once, no backoff
                await asyncio.sleep(STABLE_AFTER_S + 0.5)
            measured.append(await kill_and_time(system, n))
        if env.get("AGENTWORKER_ZYGOTE") == "off":
            _record_afresh_memory(bench, await _live_worker(system))
    finally:
        await system.close()
    metric.values["agentworker"] = statistics.median(measured) * 1000
    metric.details["agentworker"] = {"samples_ms": [round(s * 1000, 1) for s in measured],
                                     "max_ms": round(max(measured) * 1000, 1), "env": env}
    bench.log(f"  {metric.label}: median {metric.values['agentworker']:.0f} ms, "
              f"max {max(measured) * 1000:.0f} ms")


def _record_afresh_memory(bench: Bench, pid: int) -> None:
    measured = memory_of(pid)
    for kind in ("rss", "uss", "pss"):
        metric = bench.metric(f"memory_{kind}_afresh", f"memory per worker process, {kind.upper()}, zygote off",
                              "MiB", "lower")
        metric.values["agentworker"] = measured[kind]
        base = bench.metrics.get(f"memory_{kind}")
        if base is not None:
            for key in BASELINES:
                if key in base.values:
                    metric.values[key] = base.values[key]


# -- (e) /metrics after many restarts --------------------------------------------------------------------------


def _merge_seconds(path: str, repeat: int = 5) -> float:
    """Median seconds to merge a multiprocess metrics directory into Prometheus text, in this process."""
    times = []
    for _ in range(repeat):
        registry = CollectorRegistry(auto_describe=False)
        MultiProcessCollector(registry, path=path)  # type: ignore[no-untyped-call]
        started = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _stock_directory(source: str, target: str, live_pid: int, dead: int) -> None:
    """What prometheus_client's stock multiprocess mode would hold after ``dead`` restarts: every dead
    worker's counter and histogram files kept (copies of the live worker's, under other pids)."""
    shutil.copytree(source, target)
    for name in os.listdir(source):
        stem, _, rest = name.rpartition("_")
        if rest != f"{live_pid}.db" or not stem.startswith(("counter", "histogram")):
            continue
        for fake in range(dead):
            shutil.copy(os.path.join(source, name), os.path.join(target, f"{stem}_{10_000_000 + fake}.db"))


async def metrics_after_restarts(bench: Bench) -> None:
    if "agentworker" not in bench.systems:
        return
    restarts = bench.options.metrics_restarts
    scrape = bench.metric("metrics_scrape", f"GET /metrics after {restarts} worker restarts", "ms", "lower")
    ours = bench.metric("metrics_merge", f"merging worker metric files after {restarts} restarts", "ms", "lower")
    stock = bench.metric("metrics_merge_stock", "same, stock multiprocess mode (dead workers' files kept)",
                         "ms", "lower")
    bench.redis.flush()
    system = AgentWorker(bench.redis.url, bench.workdir, env=SHORT_BACKOFF)
    try:
        await system.start_workers()
        before = statistics.median([(await system.scrape())[0] for _ in range(5)])
        for n in range(restarts):
            ref = await system.enqueue("noop", f"tenant{n % 8}", f"m-{n}")
            await _job_started(system, ref)  # every worker leaves metric files behind
            pid = await _live_worker(system)
            os.kill(pid, signal.SIGKILL)
        ref = await system.enqueue("noop", "tenant0", "m-last")
        await _job_started(system, ref)
        await asyncio.sleep(1.0)  # the reconcile loop archives the last dead worker's files
        scrapes = [await system.scrape() for _ in range(20)]
        live = await _live_worker(system)
        files = len(os.listdir(system.metrics_dir))
        snapshot = str(bench.workdir / "metrics-snapshot")
        stock_dir = str(bench.workdir / "metrics-stock")
        shutil.rmtree(snapshot, ignore_errors=True)
        shutil.rmtree(stock_dir, ignore_errors=True)
        shutil.copytree(system.metrics_dir, snapshot)
        _stock_directory(snapshot, stock_dir, live, restarts)
    finally:
        await system.close()
    scrape.values["agentworker"] = statistics.median(s for s, _ in scrapes) * 1000
    scrape.details["agentworker"] = {"before_restarts_ms": round(before * 1000, 2), "files": files,
                                     "bytes": scrapes[0][1]}
    ours.values["agentworker"] = _merge_seconds(snapshot) * 1000
    ours.details["agentworker"] = {"files": files}
    stock.values["agentworker"] = _merge_seconds(stock_dir) * 1000
    stock.details["agentworker"] = {"files": len(os.listdir(stock_dir))}
    for metric in (scrape, ours, stock):
        for key in BASELINES:
            if key in bench.systems:
                metric.notes[key] = "n/a"
    bench.log(f"  /metrics after {restarts} restarts: {scrape.values['agentworker']:.1f} ms "
              f"(before: {before * 1000:.1f} ms; {files} files); stock mode would merge "
              f"{stock.details['agentworker']['files']} files in {stock.values['agentworker']:.1f} ms")
