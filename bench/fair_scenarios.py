"""Fairness inside one shard: tenants sharing one shard's queue, served by weighted fair queuing.

* ``noisy-shard``: the noisy neighbour of ``bench/scenarios.py`` with A and B on the *same* shard, A
  thousands of jobs ahead (every system; ARQ and SAQ have one FIFO queue anyway).
* ``weights``: three saturating tenants of weights 1, 2 and 4: their shares of the job starts.
* ``fairness``: 100 equal saturating tenants, each submitting its jobs as one batch, one tenant after
  another: Jain's index of the job starts per tenant in every 2 s window (every system).
* ``claim-cost``: tenant A capped with 1,000 and then 100,000 jobs queued: tenant B's latency and the
  Redis commands each claim runs, which must not depend on A's backlog.

Every agentworker run here uses a pool of one shard (``shards: 1``) and one process of 10 slots.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import statistics
from typing import Any

from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.job_leases import lua_source
from bench.neighbour import NeighbourCase, neighbour_rows
from bench.report import BASELINES, Metric, Target, summary
from bench.scenarios import Bench, latencies, paced
from bench.systems import CONCURRENCY, AgentWorker, System, wait_until

# -- noisy neighbour on one shard -----------------------------------------------------------------------


async def noisy_shard(bench: Bench) -> None:
    """Tenant B's latency alone, then beside tenant A on the same shard, A flooding at 10x and thousands of
    jobs ahead. The target allows B two slot turnovers more than alone: 2 x (A's job / concurrency)."""
    opts = bench.options
    case = NeighbourCase("_shard", f", one shard, A {opts.shard_neighbour_prefill:,} ahead, "
                         f"B every {opts.shard_neighbour_interval_s * 1000:g} ms",
                         opts.shard_neighbour_interval_s, prefill=opts.shard_neighbour_prefill, shards=1)
    allowance_ms = 2 * opts.flood_job_s / CONCURRENCY * 1000
    for key in bench.systems:
        await neighbour_rows(bench, key, case,
                             Target("delta_max", allowance_ms, against_metric="neighbour_alone_p99_shard"))


# -- shared by the saturating scenarios ----------------------------------------------------------------


async def enqueue_all(system: System, kind: str, order: list[tuple[str, str]], seconds: float) -> dict[str, str]:
    """Enqueue one job per (tenant, key) in this order, 100 at a time; return each job's ref -> its tenant."""
    tenant_of: dict[str, str] = {}
    for start in range(0, len(order), 100):
        batch = order[start:start + 100]
        refs = await asyncio.gather(*(system.enqueue(kind, tenant, key, seconds) for tenant, key in batch))
        tenant_of.update(zip(refs, (tenant for tenant, _ in batch), strict=True))
    return tenant_of


async def run_saturated(system: System, tenant_of: dict[str, str], span_s: float, job_s: float) -> list[
        tuple[float, str]]:
    """Start the workers with every job queued, let them run ``span_s`` s past the first start; return
    (start time, tenant) of every job that started, sorted."""
    n = len(tenant_of)
    await system.start_workers(warm=False)

    async def started() -> bool:
        if system.process is not None and not system.process.alive():
            raise RuntimeError(f"{system.title} exited; see {system.process.log_path}")
        return await system.remaining() < n

    await wait_until(started, 90, f"{system.title} to start a job", interval=0.01)
    await asyncio.sleep(span_s + job_s + 0.3)  # every job started within the span has finished
    timings = await system.timings(list(tenant_of))
    return sorted((t.started, tenant_of[ref]) for ref, t in timings.items())


def _na(bench: Bench, *metrics: Metric) -> None:
    for metric in metrics:
        for key in BASELINES:
            if key in bench.systems:
                metric.notes[key] = "n/a"


# -- weights 1, 2, 4 ----------------------------------------------------------------------------------


def tenant_name(weight: float) -> str:
    return f"weight{weight:g}".replace(".", "-")


async def weights(bench: Bench) -> None:
    """Three tenants of weights 1, 2, 4 on one shard, each with more queued than it can get: their shares of
    the job starts in a window after a warm-up, against w / sum(w). ARQ and SAQ have no weights."""
    opts = bench.options
    total = sum(opts.weights)
    names = ":".join(f"{w:g}" for w in opts.weights)
    shares = {w: bench.metric(f"weight_share_{w:g}", f"weights {names} on one shard: share of job starts, weight "
                              f"{w:g} (fair: {w / total * 100:.1f} %)", "%", "closer") for w in opts.weights}
    worst = bench.metric("weight_deviation", f"weights {names}: largest deviation from the weighted share "
                         f"(relative, over {opts.weights_window_s:g} s)", "%", "lower", Target("max", 10.0))
    _na(bench, *shares.values(), worst)
    if "agentworker" not in bench.systems:
        return
    bench.redis.flush()
    system = AgentWorker(bench.redis.url, bench.workdir, shards=1,
                         tenants={tenant_name(w): {"weight": w} for w in opts.weights})
    span = opts.weights_warmup_s + opts.weights_window_s
    capacity = CONCURRENCY / opts.weights_job_s  # jobs/s at best: each tenant gets 30 % more than its share of it
    counts = {tenant_name(w): math.ceil(capacity * span * w / total * 1.3) + CONCURRENCY for w in opts.weights}
    order = [(t, f"w-{i}") for i in range(max(counts.values())) for t in counts if i < counts[t]]  # interleaved
    try:
        tenant_of = await enqueue_all(system, "sleep", order, opts.weights_job_s)
        starts = await run_saturated(system, tenant_of, span, opts.weights_job_s)
        left = {t: await system.queued(t) for t in counts}
    finally:
        await system.close()
    begin = starts[0][0] + opts.weights_warmup_s
    window = [tenant for at, tenant in starts if begin <= at < begin + opts.weights_window_s]
    deviations = []
    for w, metric in shares.items():
        got = window.count(tenant_name(w)) / len(window)
        fair = w / total
        metric.values["agentworker"] = got * 100
        metric.details["agentworker"] = {"starts": window.count(tenant_name(w)), "fair": fair, "queued_at_end":
                                         left[tenant_name(w)]}
        deviations.append(abs(got / fair - 1) * 100)
    worst.values["agentworker"] = max(deviations)
    saturated = all(n > 0 for n in left.values())
    if not saturated:
        worst.notes["agentworker"] = "a backlog ran out"
    worst.details["agentworker"] = {"window_starts": len(window), "window_s": opts.weights_window_s,
                                    "warmup_s": opts.weights_warmup_s, "job_s": opts.weights_job_s,
                                    "enqueued": counts, "queued_at_end": left, "saturated": saturated}
    bench.log(f"  weights {names}: shares " + ", ".join(f"{m.values['agentworker']:.1f} %" for m in shares.values())
              + f" of {len(window)} starts; largest deviation {max(deviations):.1f} %; queued at the end {left}")


# -- 100 equal tenants: Jain's index per window ----------------------------------------------------------


def jain(counts: list[int]) -> float:
    """Jain's fairness index: 1 when every tenant got the same, 1/n when one tenant got everything."""
    total, squares = sum(counts), sum(c * c for c in counts)
    return total * total / (len(counts) * squares) if squares else 0.0


async def fairness(bench: Bench) -> None:
    """100 equal tenants on one shard, each submitting its jobs as one batch, one tenant after another,
    before the workers start; Jain's index of the job starts per tenant in each 2 s window after a
    warm-up. ARQ and SAQ serve their one queue in order."""
    opts = bench.options
    n, win = opts.fair_tenants, opts.fair_window_s
    lowest = bench.metric("fair_jain_min", f"{n} equal tenants on one shard: Jain's index of job starts per {win:g} s "
                          f"window, lowest of {opts.fair_windows}", "index", "higher", Target("min", 0.95))
    served = bench.metric("fair_served_min", f"same, fewest tenants with a job start in a {win:g} s window "
                          f"(of {n})", "tenants", "higher")
    span = opts.fair_warmup_s + opts.fair_windows * win
    per_tenant = math.ceil(CONCURRENCY / opts.fair_job_s * span / n * 1.3) + 2
    tenants = [f"fair{i:03d}" for i in range(n)]
    order = [(t, f"f-{j}") for t in tenants for j in range(per_tenant)]  # tenant by tenant
    for key in bench.systems:
        bench.redis.flush()
        system = AgentWorker(bench.redis.url, bench.workdir, shards=1) if key == "agentworker" else bench.make(key)
        try:
            tenant_of = await enqueue_all(system, "sleep", order, opts.fair_job_s)
            starts = await run_saturated(system, tenant_of, span, opts.fair_job_s)
            left = min([await system.queued(t) for t in tenants]) if isinstance(system, AgentWorker) else None
        finally:
            await system.close()
        begin = starts[0][0] + opts.fair_warmup_s
        indexes, tenants_served, per_window = [], [], []
        for w in range(opts.fair_windows):
            lo, hi = begin + w * win, begin + (w + 1) * win
            in_window = [tenant for at, tenant in starts if lo <= at < hi]
            counts = [in_window.count(t) for t in tenants]
            indexes.append(jain(counts))
            tenants_served.append(sum(1 for c in counts if c))
            per_window.append(len(in_window))
        lowest.values[key] = min(indexes)
        served.values[key] = float(min(tenants_served))
        if left == 0:
            lowest.notes[key] = "a backlog ran out"
        lowest.details[key] = {"jain": [round(j, 4) for j in indexes], "starts_per_window": per_window,
                               "tenants_served": tenants_served, "jobs_per_tenant": per_tenant,
                               "job_s": opts.fair_job_s, "fewest_queued_at_end": left}
        bench.log(f"  {n} tenants: {system.title} Jain's index per window {', '.join(f'{j:.3f}' for j in indexes)} "
                  f"({', '.join(map(str, per_window))} starts; tenants served {tenants_served})")


# -- claim cost with a capped tenant's backlog -------------------------------------------------------------

#: tenant A's held jobs sleep this long: past the whole run (the pool's job_timeout is 60 s)
HOLD_S = 50.0


async def claim_cost(bench: Bench) -> None:
    """Tenant A at its max_concurrency with a backlog of 1,000, then 100,000 jobs on B's shard; B sends
    no-ops. B's latency and the Redis commands per claim, side by side: they must not grow with A's backlog."""
    opts = bench.options
    small, large = opts.claim_backlogs
    cap = opts.claim_cap
    rows: dict[str, dict[int, Metric]] = {}
    for kind, label, unit in (("p50", "latency p50", "ms"), ("p99", "latency p99", "ms"),
                              ("cmds", "Redis commands per claim (run by the claim script)", "cmds"),
                              ("us", "claim script time in Redis, median", "µs")):
        rows[kind] = {n: bench.metric(f"claim_{kind}_{n}", f"tenant B beside A capped at {cap} with {n:,} queued: "
                                      f"{label}", unit, "lower") for n in (small, large)}
    _na(bench, *(m for by_n in rows.values() for m in by_n.values()))
    if "agentworker" not in bench.systems:
        return
    for backlog, result in zip((small, large), await _claim_runs(bench, (small, large)), strict=True):
        stats = summary([x * 1000 for x in result.pop("latencies")])
        rows["p50"][backlog].values["agentworker"] = stats["p50"]
        rows["p99"][backlog].values["agentworker"] = stats["p99"]
        if result["missing"]:
            rows["p99"][backlog].notes["agentworker"] = f"{result['missing']} not started"
        rows["cmds"][backlog].values["agentworker"] = result["commands_per_claim"]
        rows["us"][backlog].values["agentworker"] = result["claim_us_p50"]
        rows["cmds"][backlog].details["agentworker"] = result
        bench.log(f"  claim cost, A's backlog {backlog:,}: B p50 {stats['p50']:.1f} ms, p99 {stats['p99']:.1f} ms; "
                  f"{result['claims']} claims, {result['commands_per_claim']:.1f} commands per claim "
                  f"({result['commands_per_claim_that_started']:.1f} in those that started a job, at most "
                  f"{result['commands_max']}), script {result['claim_us_p50']:.0f} µs median; "
                  f"A served beyond its cap: {result['a_served_beyond_cap']}")


async def _claim_runs(bench: Bench, backlogs: tuple[int, ...]) -> list[dict[str, Any]]:
    """One worker; for each backlog in turn (growing), A's queue is topped up to it and B sends its jobs."""
    opts = bench.options
    cap, a, b = opts.claim_cap, "tenant-a", "tenant-b"
    bench.redis.flush()
    # a short grace: A's held jobs would otherwise hold the stop up for the whole default grace
    system = AgentWorker(bench.redis.url, bench.workdir, shards=1, tenants={a: {"max_concurrency": cap}},
                         env={"AGENTWORKER_SHUTDOWN_GRACE": "0.5"})
    claim_sha = hashlib.sha1(lua_source("claim").encode()).hexdigest()
    leases, queue = keys.tenant_leases(a), keys.tenant_queue("bench", 0, a)
    results = []
    try:
        await system.start_workers()
        # real jobs first: `cap` of them run and hold A's cap, the rest head A's queue
        for i in range(cap + 2):
            await system.enqueue("sleep", a, f"hold-{i}", HOLD_S)
        await wait_until(lambda: _holding(system.redis, leases, cap), 30, "tenant A to reach its cap")
        written = 0
        for backlog in backlogs:
            # the backlog goes straight into A's tenant queue, due now, behind the real jobs: no record is
            # needed for jobs that never run (A never gets past its cap)
            seconds, micros = await system.redis.time()
            now_ms = seconds * 1000 + micros // 1000
            for first in range(written, backlog, 10_000):
                async with system.redis.pipeline(transaction=False) as pipe:
                    for chunk in range(first, min(backlog, first + 10_000), 1000):
                        pipe.zadd(queue, {f"{a}:bench_sleep:backlog-{i}": now_ms
                                          for i in range(chunk, min(backlog, chunk + 1000))})
                    await pipe.execute()
            written = backlog
            queued_before = await system.queued(a)
            before = await system.redis.info("commandstats")
            async with _SlowLog(system.redis) as slowlog:
                sent = await paced(system, opts.claim_b_jobs, opts.shard_neighbour_interval_s, b, f"b{backlog}")
                found, missing = await latencies(system, sent, opts.neighbour_wait_s)
            after = await system.redis.info("commandstats")
            queued_after, holding = await system.queued(a), int(await system.redis.zcard(leases))
            results.append(_claim_result(slowlog.entries, claim_sha, before, after) | {
                "latencies": found, "missing": missing, "backlog": backlog, "cap": cap,
                "a_queued_before_after": [queued_before, queued_after], "a_leases_at_end": holding,
                "a_served_beyond_cap": queued_after != queued_before or holding != cap})
    finally:
        await system.close()
    return results


def _claim_result(entries: list[dict[str, Any]], sha: str, before: dict[str, Any],
                  after: dict[str, Any]) -> dict[str, Any]:
    claims = _claims(entries, sha)
    commands = [c["commands"] for c in claims]
    with_start = [c["commands"] for c in claims if c["started"]]
    calls = {k: after[k]["calls"] - before.get(k, {}).get("calls", 0) for k in after if k.startswith("cmdstat_")}
    return {
        "claims": len(claims), "claims_that_started": len(with_start),
        "jobs_started_by_claims": sum(c["started"] for c in claims),
        "commands_per_claim": statistics.fmean(commands) if commands else 0.0,
        "commands_per_claim_that_started": statistics.fmean(with_start) if with_start else 0.0,
        "commands_max": max(commands, default=0),
        "claim_us_p50": statistics.median(c["us"] for c in claims) if claims else 0.0,
        "claim_us_p99": summary([float(c["us"]) for c in claims]).get("p99", 0.0),
        "commandstats_calls": {"evalsha": calls.get("cmdstat_evalsha", 0), "all": sum(calls.values())},
        "counted": "SLOWLOG with a 0 µs threshold logs every command, a script's own calls (TIME, ZRANGE, ...) "
                   "just before the script's EVALSHA, which it logs with its duration; a claim is an EVALSHA of "
                   "the claim script",
    }


async def _holding(redis: Redis, leases: str, cap: int) -> bool:
    return int(await redis.zcard(leases)) >= cap


class _SlowLog:
    """Every command Redis runs while the block runs, from its SLOWLOG with a 0 µs threshold (this is the
    bench's private Redis; its settings are put back after)."""

    MAX_LEN = 500_000

    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self.entries: list[dict[str, Any]] = []
        self._saved: dict[str, Any] = {}

    async def __aenter__(self) -> _SlowLog:
        self._saved = {k: (await self.redis.config_get(k))[k] for k in ("slowlog-log-slower-than", "slowlog-max-len")}
        await self.redis.config_set("slowlog-max-len", self.MAX_LEN)
        await self.redis.slowlog_reset()
        await self.redis.config_set("slowlog-log-slower-than", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.redis.config_set("slowlog-log-slower-than", self._saved["slowlog-log-slower-than"])
        self.entries = sorted(await self.redis.slowlog_get(self.MAX_LEN), key=lambda e: int(e["id"]))
        await self.redis.config_set("slowlog-max-len", self._saved["slowlog-max-len"])
        await self.redis.slowlog_reset()


#: the client address SLOWLOG gives the commands a script runs (its fake client has no connection)
SCRIPT_CLIENT = b"?:0"


def _claims(entries: list[dict[str, Any]], sha: str) -> list[dict[str, Any]]:
    """Each claim in a SLOWLOG capture: how many commands its script ran, how many jobs it started (an
    in-progress key set), and its duration in µs as Redis measured it."""
    claims: list[dict[str, Any]] = []
    inner: list[bytes] = []
    in_progress = ("SET " + jobs.in_progress_key("")).encode()
    for entry in entries:
        if entry["client_address"] == SCRIPT_CLIENT:
            inner.append(entry["command"])
            continue
        words = entry["command"].split(b" ", 2)
        if words[0].upper() == b"EVALSHA" and len(words) > 1 and words[1].decode() == sha:
            claims.append({"commands": len(inner), "us": int(entry["duration"]),
                           "started": sum(1 for c in inner if c.upper().startswith(in_progress.upper()))})
        inner = []
    return claims
