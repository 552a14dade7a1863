"""``python -m bench tenants``: enqueue-to-start latency and Redis commands per job with 10 and with 100,000
tenants in the tenant store (issue 19: "the same within noise").

    python -m bench tenants            # about 2 minutes on a quiet 2-core machine
    python -m bench tenants --quick    # 10,000 stored tenants, 200 jobs a row: proves the harness works
    python -m bench tenants --keep     # keep the work directory (the service's logs)

Not part of ``python -m bench`` nor of ``make test``. Everything is private and on loopback: a redis-server
(bench/redis_server.py), a PostgreSQL cluster (bench/postgres_server.py) migrated as ``agentworker migrate``
does, and the real ``agentworker run`` (one pool of 8 shards, 2 worker processes of 10 slots, the bench's
no-op task) with the private database, so its tenant sync runs as in production.

Two phases, each on an empty Redis and its own service: 10 stored tenants, then 100,000. Every stored
tenant has plan ``bench-plan`` (a plan of the quota file: max_concurrency 8, weight 2) and the override
max_concurrency 5, so the claim script reads both layers of every tenant it starts a job of. The rows are
written with one INSERT ... SELECT as the superuser (``seq`` from the store's sequence, version 1), then
:func:`agentworker.tenants.sync_once` copies them all to Redis (timed, with ``INFO memory`` before and
after). Measuring starts once the rows are older than :data:`agentworker.tenants.SYNC_SETTLE_S` (the
workers' sync copies younger rows again at every pass).

Each phase has two rows, jobs paced one every few ms through the real client (``AgentWorkerClient.enqueue``,
whose tenant directory caches a record for 0.5 s):

- jobs over **10 tenants** (the 10 first stored ones): caches hide every record read but a few;
- jobs over **2,000 distinct tenants** (one job each, the same 2,000 in both phases: with 10 stored, 1,990
  of them have no record): every job costs the producer's and a worker's first read of its tenant.

So "10 tenants" and "100,000 tenants" (the issue's rows) are compared at the same tenants per job, and the
two rows of one phase show what reading records for many distinct tenants costs. Per row: jobs, latency
p50/p99 (ms, from just before ``enqueue`` to the task's first line, ``bench/scenarios.py``'s ``latencies``),
Redis commands per job (``INFO commandstats``, every call of every client: producer, supervisor, workers,
scripts' own calls; the window runs from the first enqueue to 0.5 s after the last), the same net of the
service's idle commands (measured for 2 s before the row), the largest worker process's RSS at the end,
and the CPU PostgreSQL and the machine's other processes used meanwhile (each pass of the workers' tenant
sync asks PostgreSQL for the rows changed in the last seconds; other work on the machine shows as stalls).
Prints the table, the commands per job by name, and notes (the copy, Redis memory, the sync's query, the
worst stall of each row); writes ``bench/results/tenants-<time>.json`` (also: CPU of every process group,
latency by half second of each row, enqueue call times, what Redis's latency monitor noted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import asyncpg
import psutil
import yaml
from redis.asyncio import Redis

from agentworker import keys
from agentworker.client import AgentWorkerClient
from agentworker.config import load_config
from agentworker.db import open_database
from agentworker.settings import Settings
from agentworker.tenants import SYNC_SETTLE_S, sync_once
from bench.harness import loads, machine, results_path, tear_down, write_document
from bench.postgres_server import PostgresUnavailable, PrivatePostgres, migrated_database
from bench.redis_server import PrivateRedis
from bench.report import summary
from bench.scenarios import latencies, memory_of
from bench.systems import AgentWorker

PLAN = "bench-plan"
PLANS = {PLAN: {"max_concurrency": 8, "weight": 2}}
OVERRIDES = {"max_concurrency": 5}
PROCESSES = 2
#: seconds the service is watched idle before a row (its background commands per second)
IDLE_WINDOW_S = 2.0
#: seconds after the last enqueue before the commands are counted (far above any p99 seen)
TAIL_S = 0.5
SEED = 19


@dataclass(frozen=True)
class Sizes:
    stored: tuple[int, int]
    distinct: int
    jobs: int
    interval_s: float


FULL = Sizes(stored=(10, 100_000), distinct=2_000, jobs=2_000, interval_s=0.004)
QUICK = Sizes(stored=(10, 10_000), distinct=200, jobs=200, interval_s=0.004)


def tenant_id(i: int) -> str:
    return f"t{i:06d}"


class TenantStoreService(AgentWorker):
    """:class:`bench.systems.AgentWorker` (its quota file, client, timings) with the plan the stored tenants
    take added to the quota file, 2 worker processes, and the private database."""

    def __init__(self, redis_url: str, workdir: Path, database_url: str) -> None:
        super().__init__(redis_url, workdir, processes=PROCESSES, title="agentworker (tenant store)",
                         env={"AGENTWORKER_DATABASE_URL": database_url})
        quotas = yaml.safe_load(self.config_path.read_text())
        quotas["plans"] = PLANS
        self.config_path.write_text(yaml.safe_dump(quotas))
        self.config = load_config(self.config_path)
        self.client = AgentWorkerClient(self.redis, self.config, Settings(redis_url=redis_url))


# -- filling the store ---------------------------------------------------------------------------------


async def fill(superuser_url: str, first: int, last: int) -> float:
    """Store tenants ``first``..``last`` (one INSERT ... SELECT as the superuser, which row-level security
    does not hold back); return the seconds it took."""
    began = time.monotonic()
    conn = await asyncpg.connect(superuser_url)
    try:
        await conn.execute(
            "INSERT INTO agentworker.tenant_settings (tenant_id, plan, overrides, version, seq, updated_by) "
            "SELECT 't' || lpad(i::text, 6, '0'), $3, $4::jsonb, 1, nextval('agentworker.tenant_settings_seq'), "
            "'bench' FROM generate_series($1::int, $2::int) AS i ORDER BY i",
            first, last, PLAN, json.dumps(OVERRIDES))
        await conn.execute("ANALYZE agentworker.tenant_settings")
    finally:
        await conn.close()
    return time.monotonic() - began


async def recent_query(superuser_url: str, database: Any) -> dict[str, Any]:
    """What the workers' tenant sync asks PostgreSQL at every pass (``tenant_settings_recent``): its plan
    and how long it takes (ms, median of 5), once the rows are older than the settle window."""
    conn = await asyncpg.connect(superuser_url)
    try:
        plan = await conn.fetch(
            "EXPLAIN SELECT * FROM agentworker.tenant_settings s "
            "WHERE s.updated_at >= clock_timestamp() - make_interval(secs => $1::float8) ORDER BY s.seq LIMIT 5000",
            SYNC_SETTLE_S)
    finally:
        await conn.close()
    took = []
    for _ in range(5):
        began = time.perf_counter()
        await database.fetch_without_tenant("SELECT * FROM agentworker.tenant_settings_recent($1, $2)",
                                            SYNC_SETTLE_S, 5000)
        took.append((time.perf_counter() - began) * 1000)
    return {"plan": [r[0] for r in plan], "ms_p50": sorted(took)[2]}


async def vacuum_stats(superuser_url: str) -> dict[str, Any]:
    """When PostgreSQL last vacuumed and analysed the store's table on its own (it may, mid-row, after a fill)."""
    conn = await asyncpg.connect(superuser_url)
    try:
        row = await conn.fetchrow(
            "SELECT last_autovacuum, last_autoanalyze, autovacuum_count, autoanalyze_count FROM pg_stat_user_tables "
            "WHERE schemaname = 'agentworker' AND relname = 'tenant_settings'")
    finally:
        await conn.close()
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in dict(row or {}).items()}


# -- Redis counters ------------------------------------------------------------------------------------


async def command_calls(redis: Redis) -> dict[str, int]:
    stats: dict[str, Any] = await redis.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_")}


def delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    changed = {k: v - before.get(k, 0) for k, v in after.items()}
    return {k: v for k, v in sorted(changed.items(), key=lambda kv: -kv[1]) if v}


async def used_memory(redis: Redis) -> int:
    info: dict[str, Any] = await redis.info("memory")
    return int(info["used_memory"])


def timeline(sent: list[tuple[str, float]], timings: dict[str, Any], start_wall: float,
             bucket_s: float = 0.5) -> list[dict[str, Any]]:
    """Latency by when the job was sent: per ``bucket_s`` of the row, jobs, p50 and max (ms)."""
    buckets: dict[int, list[float]] = {}
    for ref, at in sent:
        if ref in timings:
            buckets.setdefault(int((at - start_wall) / bucket_s), []).append((timings[ref].started - at) * 1000)
    return [{"at_s": b * bucket_s, "jobs": len(v), "p50_ms": round(summary(v)["p50"], 2),
             "max_ms": round(max(v), 2)} for b, v in sorted(buckets.items())]


class CpuMeter:
    """CPU seconds (user + system) used by groups of processes between :meth:`start` and :meth:`stop`: the
    service (supervisor, zygote, workers), redis-server, PostgreSQL (postmaster and backends), this bench, and
    ``others``: every other process of the machine (other work disturbing the row shows there)."""

    def __init__(self, service: TenantStoreService, redis_server: PrivateRedis, postgres: PrivatePostgres) -> None:
        self.service, self.redis_server, self.postgres = service, redis_server, postgres
        self._start: dict[int, float] = {}
        self._everyone: dict[int, float] = {}
        self._machine = 0.0
        #: after :meth:`stop`: the processes outside the groups that used the most CPU (seconds, command)
        self.top_others: list[tuple[float, str]] = []

    def _pids(self) -> dict[str, list[int]]:
        def family(pid: int | None) -> list[int]:
            if pid is None:
                return []
            try:
                return [pid, *(c.pid for c in psutil.Process(pid).children(recursive=True))]
            except psutil.NoSuchProcess:
                return []

        postmaster = None
        with contextlib.suppress(OSError, ValueError, IndexError):
            postmaster = int((self.postgres.data / "postmaster.pid").read_text().split()[0])
        service = self.service.process.pid if self.service.process is not None else None
        redis = self.redis_server.proc.pid if self.redis_server.proc is not None else None
        return {"service": family(service), "redis": family(redis), "postgres": family(postmaster),
                "bench": [os.getpid()]}

    @staticmethod
    def _cpu(pid: int) -> float | None:
        try:
            times = psutil.Process(pid).cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return float(times.user + times.system)

    @staticmethod
    def _busy() -> float:
        times = psutil.cpu_times()
        return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))

    @staticmethod
    def _all_processes() -> dict[int, tuple[float, str]]:
        found = {}
        for proc in psutil.process_iter(["cmdline", "name", "cpu_times"]):
            times = proc.info["cpu_times"]
            if times is not None:
                found[proc.pid] = (float(times.user + times.system),
                                   " ".join(proc.info["cmdline"] or [proc.info["name"] or "?"])[:100])
        return found

    def start(self) -> None:
        self._machine = self._busy()
        self._everyone = {pid: cpu for pid, (cpu, _) in self._all_processes().items()}
        self._start = {pid: cpu for pids in self._pids().values() for pid in pids
                       if (cpu := self._cpu(pid)) is not None}

    def stop(self) -> dict[str, float]:
        used = {}
        for group, pids in self._pids().items():
            total = 0.0
            for pid in pids:
                cpu = self._cpu(pid)
                if cpu is not None:
                    total += cpu - self._start.get(pid, 0.0)
            used[group] = round(total, 3)
        used["others"] = round(max(0.0, self._busy() - self._machine - sum(used.values())), 3)
        ours = {pid for pids in self._pids().values() for pid in pids}
        others = [(round(cpu - self._everyone.get(pid, 0.0), 2), command)
                  for pid, (cpu, command) in self._all_processes().items() if pid not in ours]
        self.top_others = sorted((o for o in others if o[0] >= 0.05), reverse=True)[:3]
        return used


async def watch_redis_latency(redis: Redis, threshold_ms: int = 10) -> None:
    """Have the (private) Redis note every event and command of ``threshold_ms`` or more."""
    await redis.config_set("latency-monitor-threshold", threshold_ms)
    await redis.config_set("slowlog-log-slower-than", threshold_ms * 1000)
    await redis.execute_command("LATENCY", "RESET")
    await redis.slowlog_reset()


async def redis_latency_events(redis: Redis) -> dict[str, Any]:
    """What Redis noted since the last call (:func:`watch_redis_latency`): its latency events' latest and
    worst (ms), and its slow commands; both are reset."""
    latest = await redis.execute_command("LATENCY", "LATEST")
    slow = await redis.slowlog_get(20)
    await redis.execute_command("LATENCY", "RESET")
    await redis.slowlog_reset()
    return {"events": {(e[0].decode() if isinstance(e[0], bytes) else str(e[0])): {"latest_ms": e[2], "max_ms": e[3]}
                       for e in latest},
            "slow_commands": [{"us": int(e["duration"]), "command": e["command"][:120].decode(errors="replace")}
                              for e in slow]}


# -- one row -------------------------------------------------------------------------------------------


async def run_row(service: TenantStoreService, cpu: CpuMeter, label: str, tenants: list[str], sizes: Sizes,
                  prefix: str, stored: int) -> dict[str, Any]:
    redis = service.redis
    idle_before = await command_calls(redis)
    await asyncio.sleep(IDLE_WINDOW_S)
    idle = delta(await command_calls(redis), idle_before)
    idle_per_s = (sum(idle.values()) - 1) / IDLE_WINDOW_S  # one INFO is ours
    order = [tenants[i % len(tenants)] for i in range(sizes.jobs)]
    before = await command_calls(redis)
    window_began = time.monotonic()
    cpu.start()
    sent: list[tuple[str, float]] = []
    enqueue_ms: list[float] = []
    start = time.monotonic()
    for i, tenant in enumerate(order):
        pause = start + i * sizes.interval_s - time.monotonic()
        if pause > 0:
            await asyncio.sleep(pause)
        at = time.time()
        sent.append((await service.enqueue("noop", tenant, f"{prefix}-{i}"), at))
        enqueue_ms.append((time.time() - at) * 1000)
    sending_s = time.monotonic() - start
    await asyncio.sleep(TAIL_S)
    after = await command_calls(redis)
    window_s = time.monotonic() - window_began
    cpu_s = cpu.stop()
    calls = delta(after, before)
    calls["info"] = calls.get("info", 0) - 1  # ours, the snapshot after
    counted_until = time.time()
    redis_events = await redis_latency_events(redis)
    found, missing = await latencies(service, sent, 30)
    # a job started after the count had some of its commands left out: say how many
    timings = await service.timings([ref for ref, _ in sent])
    late = sum(1 for t in timings.values() if t.started > counted_until)
    stats = summary([x * 1000 for x in found])
    total = sum(calls.values())
    rss = {pid: round(memory_of(pid)["rss"], 1) for pid in service.worker_pids()}
    row = {
        "label": label, "stored_tenants": stored, "job_tenants": len(set(order)),
        "job_tenants_stored": sum(1 for t in set(order) if int(t[1:]) <= stored),
        "jobs": sizes.jobs, "started": len(found), "missing": missing, "started_after_count": late,
        "p50_ms": stats.get("p50"), "p99_ms": stats.get("p99"), "latency_ms": stats,
        "enqueue_ms": summary(enqueue_ms), "redis_latency_events": redis_events,
        "sending_s": round(sending_s, 2), "jobs_per_s_sent": round(sizes.jobs / sending_s, 1),
        "window_s": round(window_s, 2), "commands": total, "commands_per_job": total / sizes.jobs,
        "idle_commands_per_s": round(idle_per_s, 1),
        "commands_per_job_net": (total - idle_per_s * window_s) / sizes.jobs,
        "commands_by_name": calls, "idle_commands_by_name": idle,
        "worker_rss_mib": rss, "worker_rss_mib_max": max(rss.values(), default=None),
        "cpu_s": cpu_s, "top_other_processes": cpu.top_others,
        "cpu_percent": {k: round(v / window_s * 100, 1) for k, v in cpu_s.items()},
        "latency_timeline": timeline(sent, timings, start_wall=sent[0][1] if sent else 0.0),
    }
    extra = (f", {missing} not started" if missing else "") + (f", {late} started after the count" if late else "")
    print(f"  {label}: p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms, "
          f"{row['commands_per_job']:.2f} Redis commands/job ({row['commands_per_job_net']:.2f} net of "
          f"{idle_per_s:.0f}/s idle), sent at {row['jobs_per_s_sent']:.0f} jobs/s, worker RSS "
          f"{', '.join(f'{v:.0f}' for v in rss.values())} MiB{extra}; CPU "
          + ", ".join(f"{k} {v:.0f}%" for k, v in row["cpu_percent"].items()), flush=True)
    return row


# -- one phase -----------------------------------------------------------------------------------------


async def run_phase(redis_server: PrivateRedis, postgres: PrivatePostgres, workdir: Path, superuser_url: str,
                    stored: int, already: int, sizes: Sizes, spread: list[str]) -> dict[str, Any]:
    print(f"== {stored:,} stored tenants", flush=True)
    await asyncio.to_thread(redis_server.flush)
    fill_s = await fill(superuser_url, already + 1, stored) if stored > already else 0.0
    filled_at = time.monotonic()
    redis = Redis.from_url(redis_server.url)
    database = await open_database(superuser_url)
    phase: dict[str, Any] = {"stored": stored, "fill_s": round(fill_s, 2), "filled": stored - already}
    try:
        service = TenantStoreService(redis_server.url, workdir, superuser_url)
        memory_before, keys_before = await used_memory(redis), await redis.dbsize()
        began = time.monotonic()
        copied = await sync_once(database, redis, service.config)
        copy_s = time.monotonic() - began
        memory_after, keys_after = await used_memory(redis), await redis.dbsize()
        sample: dict[bytes, bytes] = await redis.hgetall(keys.tenant_record(tenant_id(1)))  # type: ignore[misc]
        phase.update(copied=copied, copy_s=round(copy_s, 2), records_per_s=round(copied / copy_s),
                     redis_used_memory_before=memory_before, redis_used_memory_after=memory_after,
                     redis_bytes_per_record=round((memory_after - memory_before) / max(1, copied)),
                     redis_keys_before_after=[keys_before, keys_after],
                     record_sample={k.decode(): v.decode() for k, v in sample.items()})
        print(f"  stored {phase['filled']:,} rows in {fill_s:.1f} s; sync_once copied {copied:,} records to "
              f"Redis in {copy_s:.1f} s ({phase['records_per_s']:,}/s); Redis used_memory "
              f"{memory_before / 2**20:.1f} -> {memory_after / 2**20:.1f} MiB "
              f"({phase['redis_bytes_per_record']} bytes per record)", flush=True)
        try:
            await service.start_workers()
            await service.wait_serving()
            # the workers' sync copies rows younger than the settle window again at every pass: wait past it
            settle = filled_at + SYNC_SETTLE_S + 1.0 - time.monotonic()
            if settle > 0:
                await asyncio.sleep(settle)
            phase["recent_query"] = await recent_query(superuser_url, database)
            cpu = CpuMeter(service, redis_server, postgres)
            await watch_redis_latency(redis)
            rows = [await run_row(service, cpu, f"{stored:,} stored, jobs over 10 tenants", spread[:10], sizes,
                                  f"s{stored}-few", stored),
                    await run_row(service, cpu, f"{stored:,} stored, jobs over {len(spread):,} tenants", spread,
                                  sizes, f"s{stored}-many", stored)]
        finally:
            await service.close()
        phase["rows"] = rows
        phase["autovacuum"] = await vacuum_stats(superuser_url)
        phase["service_log"] = str(service.workdir / f"{service.key}.log")
    finally:
        await database.close()
        await redis.aclose()
    return phase


# -- the table -----------------------------------------------------------------------------------------


def markdown(head: list[str], rows: list[list[str]]) -> str:
    """A markdown table padded like bench/report.py's."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


def table(phases: list[dict[str, Any]]) -> str:
    head = ["stored tenants", "jobs' tenants", "jobs", "p50 ms", "p99 ms", "Redis cmds/job",
            "cmds/job net of idle", "worker RSS MiB", "PostgreSQL CPU %", "other processes' CPU %"]
    rows = []
    for phase in phases:
        for row in phase["rows"]:
            tenants = f"{row['job_tenants']:,}"
            if row["job_tenants_stored"] != row["job_tenants"]:
                tenants += f" ({row['job_tenants_stored']:,} stored)"
            rows.append([f"{phase['stored']:,}", tenants, f"{row['started']:,}/{row['jobs']:,}",
                         f"{row['p50_ms']:.2f}", f"{row['p99_ms']:.2f}", f"{row['commands_per_job']:.2f}",
                         f"{row['commands_per_job_net']:.2f}", f"{row['worker_rss_mib_max']:.0f}",
                         f"{row['cpu_percent']['postgres']:.0f}", _others(row)])
    return markdown(head, rows)


#: other processes' CPU (% of one core) from which a row is marked disturbed: the service alone keeps
#: about 1.3 of the 2 cores busy at this rate, so more than a quarter of a core taken is felt in the latency
DISTURBED_PERCENT = 25.0


def _others(row: dict[str, Any]) -> str:
    others = row["cpu_percent"]["others"]
    return f"{others:.0f}" + (" (disturbed)" if others >= DISTURBED_PERCENT else "")


def by_command(phases: list[dict[str, Any]], top: int = 8, spread: int = 6) -> str:
    """Commands per job by name (scripts' own calls included): the ``top`` commonest, then the ``spread``
    whose counts per job differ most between the rows, then the rest."""
    rows = [row for phase in phases for row in phase["rows"]]
    per_job = [{k: v / r["jobs"] for k, v in r["commands_by_name"].items()} for r in rows]
    every = {name for counts in per_job for name in counts}
    totals = {name: sum(c.get(name, 0.0) for c in per_job) for name in every}
    names = sorted(every, key=lambda n: -totals[n])[:top]
    ranges = {n: max(c.get(n, 0.0) for c in per_job) - min(c.get(n, 0.0) for c in per_job) for n in every}
    names += [n for n in sorted(every - set(names), key=lambda n: -ranges[n])[:spread] if ranges[n] >= 0.05]
    head = ["command", *(f"{r['stored_tenants']:,}/{r['job_tenants']:,}" for r in rows)]
    lines = [[name, *(f"{c.get(name, 0.0):.2f}" for c in per_job)] for name in names]
    lines.append(["(others)", *(f"{sum(v for k, v in c.items() if k not in names):.2f}" for c in per_job)])
    lines.append(["all", *(f"{sum(c.values()):.2f}" for c in per_job)])
    return "Redis commands per job by name (columns: stored tenants / jobs' tenants)\n" + markdown(head, lines)


def notes(phases: list[dict[str, Any]]) -> list[str]:
    lines = []
    for phase in phases:
        recent = phase.get("recent_query", {})
        scan = next((p.strip().removeprefix("->").split("(cost")[0].strip() for p in recent.get("plan", [])
                     if "Scan" in p), "?")
        grown = (phase["redis_used_memory_after"] - phase["redis_used_memory_before"]) / 2**20
        per_record = f"{phase['redis_bytes_per_record']} B/record" if phase["copied"] >= 1000 else "too few to say"
        lines.append(f"  {phase['stored']:,} stored: sync_once copied {phase['copied']:,} records in "
                     f"{phase['copy_s']:.2f} s ({phase['records_per_s']:,}/s); Redis used_memory +{grown:.1f} MiB "
                     f"({per_record}); each pass of the workers' tenant sync asks tenant_settings_recent: "
                     f"{recent.get('ms_p50', 0):.1f} ms ({scan})")
        for row in phase["rows"]:
            events = row["redis_latency_events"]
            worst = max(row["latency_timeline"], key=lambda b: b["max_ms"], default=None)
            if worst is not None and worst["max_ms"] > 100:
                lines.append(f"  {row['label']}: jobs sent {worst['at_s']:g}-{worst['at_s'] + 0.5:g} s into the row "
                             f"waited up to {worst['max_ms']:.0f} ms (Redis noted "
                             f"{'nothing over 10 ms' if not events['events'] else events['events']}; other "
                             f"processes used {row['cpu_percent']['others']:.0f}% CPU"
                             + "".join(f"; {cpu:.1f} s: {cmd[:70]}" for cpu, cmd in row["top_other_processes"][:2])
                             + ")")
    return lines


# -- entry point ---------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench tenants", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 stored tenants, 200 jobs a row")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every process)")
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/tenants-<time>.json)")
    parser.add_argument("--redis-server", help="redis-server binary (default: from PATH)")
    return parser.parse_args(argv)


def environment(args: argparse.Namespace, redis: PrivateRedis, postgres: PrivatePostgres,
                sizes: Sizes) -> dict[str, Any]:
    return {**machine(redis, postgres), "scenario": "tenants", "quick": args.quick, "sizes": asdict(sizes),
            "plans": PLANS, "overrides": OVERRIDES, "processes": PROCESSES, "seed": SEED}


async def run(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="aw-tenants-"))
    try:
        postgres = PrivatePostgres(prefix="aw-tenants-pg-")
    except PostgresUnavailable as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"bench tenants: {exc}", file=sys.stderr)
        return 2
    redis = PrivateRedis(args.redis_server)
    phases: list[dict[str, Any]] = []
    began = time.monotonic()
    try:
        redis.start()
        await asyncio.to_thread(postgres.start)
        database_url = await migrated_database(postgres, "tenants")
        env = environment(args, redis, postgres, sizes)
        print(f"bench tenants: {env['cpus']} CPUs, load average "
              f"{loads(env['load_average_start'])}, Redis {env['redis_server']} on "
              f"{redis.url}, PostgreSQL on port {postgres.port}, work directory {workdir}", flush=True)
        small, large = sizes.stored
        # the 10 first tenants, then distinct ones from the whole range (the same in both phases)
        rng = random.Random(SEED)
        spread = [tenant_id(i) for i in range(1, small + 1)]
        spread += [tenant_id(i) for i in rng.sample(range(small + 1, large + 1), sizes.distinct - small)]
        already = 0
        for stored in sizes.stored:
            phases.append(await run_phase(redis, postgres, workdir, database_url, stored, already, sizes, spread))
            already = stored
    finally:
        tear_down(redis, postgres, workdir, keep=args.keep)
    env["load_average_end"] = os.getloadavg()
    env["wall_s"] = round(time.monotonic() - began, 1)
    print()
    print(table(phases))
    print()
    print(by_command(phases))
    print("\n".join(notes(phases)))
    output = results_path(args.output, "tenants")
    write_document(output, {"environment": env, "phases": phases})
    kept = f"; logs kept in {workdir}" if args.keep else ""
    print(f"\n{env['wall_s']:.0f} s; load average at the end: {loads(env['load_average_end'])}; "
          f"results written to {output}{kept}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("bench tenants: interrupted; every process and temporary directory was cleaned up", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
