"""Crash-to-rerun after kill -9: how long a job whose worker was SIGKILLed waits before it starts again.

agentworker: the real ``agentworker run`` with a pool of two processes. Each sample enqueues a job that
records each of its starts (``bench/starts.py``) and sleeps on its first, waits until it runs, kills -9
the worker running it and times the kill to the job's next start, on whichever worker. The supervisor
reaps the dead worker, releases its job leases and wakes the pool, so the other worker takes it at once.

ARQ: two plain ARQ workers. Nothing in ARQ notices a dead worker: the killed job's in-progress key stays
until it expires, ``job_timeout + 10 s`` after the pickup (``Worker.in_progress_timeout_s``), and only
then does the other worker run it. With ARQ's default job_timeout (300 s) that is 310 s a sample, so ARQ
is measured with a short job_timeout and all its samples at once: one worker holds every sample job, is
killed once right after it picked them up, and the other takes each job when its key expires. The row for
ARQ's defaults is computed from that rule by ARQ's own ``Worker``, not measured.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any

from bench.process_scenarios import SHORT_BACKOFF
from bench.report import Metric, summary
from bench.scenarios import Bench
from bench.starts import parse_start, starts_key
from bench.systems import AgentWorker, Arq, System, wait_until

#: how long the sample job sleeps on its first start: far longer than any kill takes to arrange
FIRST_RUN_S = 120.0
#: agentworker's rerun must come well within this: even unreleased, a lease lapses in 10 s (the default TTL)
RERUN_DEADLINE_S = 30.0
#: a rerun this late waited for the lease to lapse: the supervisor did not release the dead worker's jobs
LAPSED_S = 5.0
#: Redis databases of the two ARQ runs (they run side by side; ARQ's keys are global within a database)
ARQ_DB = {"arq-default": 1, "arq-tuned": 2}


def arq_in_progress_ttl_s(job_timeout: float | None = None) -> float:
    """How long ARQ keeps a job's in-progress key after its pickup, by ARQ's own rule (the installed one)."""
    from arq.worker import Worker

    from bench.arq_app import rerun

    kwargs: dict[str, Any] = {} if job_timeout is None else {"job_timeout": job_timeout}
    return float(Worker(functions=[rerun], handle_signals=False, **kwargs).in_progress_timeout_s)


async def wait_starts(system: System, refs: list[str], count: int, timeout: float,
                      what: str) -> dict[str, list[tuple[float, int]]]:
    """Wait until every job in ``refs`` has started ``count`` times; return each one's (time, pid) starts."""
    found: dict[str, list[tuple[float, int]]] = {}

    async def started() -> bool:
        async with system.redis.pipeline(transaction=False) as pipe:
            for ref in refs:
                pipe.lrange(starts_key(ref), 0, -1)
            lists = await pipe.execute()
        found.clear()
        found.update({ref: [parse_start(e) for e in entries] for ref, entries in zip(refs, lists, strict=True)})
        return all(len(starts) >= count for starts in found.values())

    await wait_until(started, timeout, what, interval=0.002)
    return found


def _metrics(bench: Bench) -> tuple[Metric, Metric, Metric]:
    opts = bench.options
    how = (f"{opts.crash_samples} kills; ARQ: {opts.crash_samples} jobs, 1 kill, "
           f"job_timeout {opts.crash_arq_job_timeout_s:g} s")
    p50 = bench.metric("crash_rerun_p50", f"crash-to-rerun after kill -9, p50 ({how})", "ms", "lower")
    p99 = bench.metric("crash_rerun_p99", "same, p99", "ms", "lower")
    derived = bench.metric("crash_rerun_arq_defaults",
                           "same, ARQ defaults (job_timeout 300 s): derived from its TTL rule, not measured",
                           "ms", "lower")
    return p50, p99, derived


async def crash_to_rerun(bench: Bench) -> None:
    p50, p99, derived = _metrics(bench)
    if "agentworker" in bench.systems:
        ours = await _agentworker(bench)
        p50.values["agentworker"] = ours["p50"]
        p99.values["agentworker"] = ours["p99"]
        p50.details["agentworker"] = ours
        derived.values["agentworker"] = ours["p50"]
        derived.notes["agentworker"] = "measured p50"
    arq_keys = [k for k in ("arq-default", "arq-tuned") if k in bench.systems]
    if arq_keys:
        bench.redis.flush()
        measured = await asyncio.gather(*(_arq(bench, key) for key in arq_keys))
        ttl_s = arq_in_progress_ttl_s()
        for key, theirs in zip(arq_keys, measured, strict=True):
            note = f"job_timeout {bench.options.crash_arq_job_timeout_s:g} s"
            p50.values[key], p99.values[key] = theirs["p50"], theirs["p99"]
            p50.notes[key] = p99.notes[key] = note
            p50.details[key] = theirs
            derived.values[key] = ttl_s * 1000
            derived.notes[key] = f"derived: {ttl_s:g} s TTL"
            derived.details[key] = {"in_progress_timeout_s": ttl_s, "rule": "largest function timeout + 10 s, "
                                    "from the pickup; plus up to one poll delay"}
    if "saq" in bench.systems:
        for metric in (p50, p99, derived):
            metric.notes["saq"] = "not measured"


async def _agentworker(bench: Bench) -> dict[str, Any]:
    """Kill -9 the worker running a job, over and over; each sample is the kill to the job's next start."""
    samples = bench.options.crash_samples
    bench.redis.flush()
    # the backoff only delays the killed process's replacement (the job reruns on the other one); a short
    # one has both processes serving again before the next kill
    system = AgentWorker(bench.redis.url, bench.workdir, processes=2, env=SHORT_BACKOFF)
    measured: list[float] = []
    on_survivor = 0
    try:
        await system.start_workers()
        assert system.process is not None
        log = system.process.log_path
        for n in range(samples):
            serving = await system.wait_serving()
            ref = await system.enqueue("rerun", "crash", f"crash-{n}", FIRST_RUN_S)
            (_, pid), = (await wait_starts(system, [ref], 1, 30, f"agentworker to start job {ref}"))[ref][:1]
            killed_at = time.time()
            os.kill(pid, signal.SIGKILL)
            starts = (await wait_starts(system, [ref], 2, RERUN_DEADLINE_S,
                                        f"agentworker to rerun job {ref} after kill -9 of worker {pid}; "
                                        f"see the supervisor's log {log} (kept with --keep)"))[ref]
            rerun_at, rerun_pid = starts[1]
            measured.append(rerun_at - killed_at)
            if rerun_pid in serving and rerun_pid != pid:
                on_survivor += 1
            await wait_until(lambda r=ref: _finished(system, r), 30, f"agentworker to finish job {ref}")
    finally:
        await system.close()
    lapsed = sum(1 for s in measured if s >= LAPSED_S)
    if lapsed:
        bench.log(f"  agentworker: {lapsed} of {samples} jobs reran only after {LAPSED_S:g} s or more, when their "
                  f"lease lapsed: the supervisor did not release the dead workers' jobs (see {log}, kept with --keep)")
    stats = {k: v * 1000 if k != "n" else v for k, v in summary(measured).items()}
    bench.log(f"  agentworker: kill -9 to rerun p50 {stats['p50']:.1f} ms, p99 {stats['p99']:.1f} ms "
              f"over {samples} kills ({on_survivor} reran on the surviving worker)")
    return {**stats, "samples_ms": [round(s * 1000, 2) for s in measured], "processes": 2,
            "reran_on_survivor": on_survivor, "reran_after_lease_lapse": lapsed, "env": SHORT_BACKOFF}


async def _finished(system: System, ref: str) -> bool:
    return bool(await system.timings([ref]))


async def _arq(bench: Bench, key: str) -> dict[str, Any]:
    """Two ARQ workers: the victim picks up every sample job, is killed at once, the survivor reruns them."""
    opts = bench.options
    samples, job_timeout = opts.crash_samples, opts.crash_arq_job_timeout_s
    ttl_s = arq_in_progress_ttl_s(job_timeout)
    url = f"redis://127.0.0.1:{bench.redis.port}/{ARQ_DB[key]}"
    env = {"BENCH_ARQ_MAX_JOBS": str(samples), "BENCH_ARQ_JOB_TIMEOUT": f"{job_timeout:g}"}
    workers = []
    for name in ("victim", "survivor"):
        workdir = bench.workdir / f"crash-{key}-{name}"
        workdir.mkdir(exist_ok=True)
        workers.append(Arq(url, workdir, tuned=key == "arq-tuned", settings="Crash", env=env))
    victim, survivor = workers
    try:
        # placement by SIGSTOP: the survivor's warm-up job must not go to the victim, and no sample job
        # to the survivor
        await victim.start_workers()
        victim_pid = _pid(victim)
        os.kill(victim_pid, signal.SIGSTOP)
        await survivor.start_workers()
        os.kill(_pid(survivor), signal.SIGSTOP)
        os.kill(victim_pid, signal.SIGCONT)
        refs = [await victim.enqueue("rerun", "crash", f"crash-{i}", FIRST_RUN_S) for i in range(samples)]
        first = await wait_starts(victim, refs, 1, 30, f"{victim.title} to start {samples} jobs")
        os.kill(_pid(survivor), signal.SIGCONT)
        killed_at = time.time()
        os.kill(victim_pid, signal.SIGKILL)
        picked_up = [starts[0][0] for starts in first.values()]
        if {starts[0][1] for starts in first.values()} != {victim_pid} or killed_at - min(picked_up) > job_timeout:
            raise RuntimeError(f"bench: {victim.title}'s sample jobs did not all run on the victim until the kill")
        starts = await wait_starts(victim, refs, 2, ttl_s + 30, f"{survivor.title} to rerun the killed jobs")
    finally:
        for worker in workers:
            if worker.process is not None and worker.process.alive():
                os.kill(worker.process.pid, signal.SIGCONT)
            await worker.close()
    measured = [s[1][0] - killed_at for s in starts.values()]
    first_to_rerun = [s[1][0] - s[0][0] for s in starts.values()]
    stats = {k: v * 1000 if k != "n" else v for k, v in summary(measured).items()}
    bench.log(f"  {victim.title}: kill -9 to rerun p50 {stats['p50']:,.0f} ms, p99 {stats['p99']:,.0f} ms over "
              f"{samples} jobs (job_timeout {job_timeout:g} s: in-progress key lives {ttl_s:g} s)")
    return {**stats, "samples_ms": [round(s * 1000, 1) for s in measured],
            "first_start_to_rerun_ms": [round(s * 1000, 1) for s in first_to_rerun], "job_timeout_s": job_timeout,
            "in_progress_timeout_s": ttl_s, "measured": "all samples at once: one worker killed while running "
                                                         "every sample job, the other reruns them"}


def _pid(system: System) -> int:
    assert system.process is not None
    return system.process.pid

