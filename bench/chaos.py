"""``python -m bench chaos [N]``: N workflow runs through every fault the service promises to survive.

    python -m bench chaos              # N = 2000: some 3-5 minutes on a quiet 2-core machine (estimated)
    python -m bench chaos 200 --keep   # fewer runs; keep the work directory (every process's log)
    python -m bench chaos --quick      # N = 100: proves the harness works

Not part of ``python -m bench`` nor of ``make test``. Everything is private and on loopback: a
redis-server with AOF (``appendfsync everysec``, what the README asks of production), a PostgreSQL
cluster (bench/postgres_server.py) migrated as ``agentworker migrate`` does, the real ``agentworker run``
(one pool of two worker processes), and an HTTP receiver in this process standing for the outside world.
Twenty tenants each save one workflow: an ``http`` POST to the receiver (the side effect, sent with its
``Idempotency-Key``), then a ``notify`` tool step (a ``workflow_notification`` event). All N runs are
enqueued at once, in two phases:

1. fault-free, to time the same work undisturbed;
2. chaos: kill -9 of a random worker every 2 s for the whole phase and, once each at about 25 %, 50 %
   and 75 % of the fault-free wall time, a Redis restart (SIGTERM, then the same port and AOF), a
   SIGTERM of the supervisor and a fresh start, and ``pg_ctl restart -m fast``. With a small N these
   come close together (the fault-free phase lasts seconds); the table's notes say how many runs were
   still unsettled at each.

Each phase waits until every run has settled (completed, failed, or lost: no run row and no job for
15 s) or a deadline passes, then counts: runs completed, lost, failed for good, stuck ``running``;
duplicate effects (one run and step delivered under two keys: the ledger failed), same-key redeliveries
(what the receiver's own idempotency has to absorb), notify events per completed run (0, 1, >1; counted
when the runs settle and again up to 30 s later, for events published late), and wall time against the
fault-free phase. Prints a table and writes ``bench/results/chaos-<time>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker.client import AgentWorkerClient
from agentworker.config import load_config
from agentworker.db import open_database
from agentworker.settings import Settings
from bench.chaos_service import KILL_EVERY_S, ONE_OFF_FAULTS, FaultInjector, Service, log
from bench.chaos_tally import (
    EffectReceiver,
    Enqueued,
    RunTally,
    RunWatcher,
    count_notifications,
    jobs_without_result,
    notify_histogram,
    scan_logs,
)
from bench.harness import loads, machine, package_version, results_path, tear_down, write_document
from bench.postgres_server import PostgresUnavailable, PrivatePostgres, migrated_database
from bench.redis_server import PrivateRedis

TENANTS = [f"chaos-{i:02d}" for i in range(20)]
POOL = "chaos"
WORKFLOW_ID = "chaos"
PROCESSES = 2
#: seconds to wait after the runs settled for notify events still on their way (retried, or relayed late)
EVENT_GRACE_S = 30.0
#: the quota file: the pool's default tries and crash retries; no recycling to blur the faults
QUOTAS: dict[str, Any] = {
    "default_pool": POOL,
    "pools": {POOL: {"shards": 4, "processes": PROCESSES, "concurrency": 20, "job_timeout": 120, "max_tries": 3,
                     "max_crash_retries": 5, "memory_limit_mb": 4096, "max_jobs_per_process": 10_000_000}},
    "tenant_defaults": {"max_concurrency": 10, "max_pending": 1_000_000},
}
SERVICE_ENV = {
    "AGENTWORKER_HTTP_HOST": "127.0.0.1",
    "AGENTWORKER_SHUTDOWN_GRACE": "5",
    "AGENTWORKER_RESTART_BACKOFF_INITIAL": "0.2",
    "AGENTWORKER_RESTART_BACKOFF_MAX": "2",
    "AGENTWORKER_CONFIG_POLL_INTERVAL": "0",
    "AGENTWORKER_EVENT_STREAM_MAXLEN": "1000000",  # every event of the phase kept, to count them
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench chaos", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="?", type=int, help="workflow runs per phase (default 2000; 100 with --quick)")
    parser.add_argument("--quick", action="store_true", help="100 runs unless N is given: proves the harness works")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every process)")
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/chaos-<time>.json)")
    parser.add_argument("--redis-server", help="redis-server binary (default: from PATH)")
    parser.add_argument("--seed", type=int, help="seed of the choice of workers to kill (default: random)")
    parser.add_argument("--effect-delay", type=float, default=0.05,
                        help="seconds the receiver holds each request after recording it (default 0.05)")
    args = parser.parse_args(argv)
    if args.runs is None:
        args.runs = 100 if args.quick else 2000
    if args.runs < 1:
        parser.error("N must be at least 1")
    if args.seed is None:
        args.seed = random.randrange(1_000_000)
    return args


# -- one phase ------------------------------------------------------------------------------------------


@dataclass
class Setup:
    workdir: Path
    redis: PrivateRedis
    postgres: PrivatePostgres
    runs: int
    effect_delay_s: float
    rng: random.Random


def workflow(receiver_url: str) -> dict[str, Any]:
    return {"id": WORKFLOW_ID, "steps": [
        {"id": "effect", "kind": "http", "method": "POST", "url": receiver_url, "timeout_seconds": 10,
         "retry": {"max_attempts": 3, "backoff_seconds": 1},
         "body": {"run": "{{ input.id }}", "step": "effect"}},
        {"id": "notify", "kind": "tool", "tool": "notify", "depends_on": ["effect"],
         "args": {"run": "{{ input.id }}"}},
    ]}


async def run_phase(setup: Setup, phase: str, *, faults: bool, expected_s: float, deadline_s: float) -> dict[str, Any]:
    """Enqueue the runs, inject the faults (``faults``), wait until every run settled or ``deadline_s``
    passed, and count what happened."""
    plan = (f"; kill -9 every {KILL_EVERY_S:g} s, one-off faults at "
            + ", ".join(f"{fraction * expected_s:.0f} s" for _, fraction in ONE_OFF_FAULTS)) if faults else ""
    log(f"== {phase}: {setup.runs} runs over {len(TENANTS)} tenants{plan}")
    await asyncio.to_thread(setup.redis.flush)
    database_url = await migrated_database(setup.postgres, f"chaos_{phase.replace('-', '_')}")
    config_path = setup.workdir / f"{phase}-quotas.yaml"
    config_path.write_text(yaml.safe_dump(QUOTAS))
    done = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        receiver = EffectReceiver(setup.effect_delay_s)
        await receiver.start()
        stack.push_async_callback(receiver.close)
        redis = Redis.from_url(setup.redis.url)
        stack.push_async_callback(redis.aclose)
        service = Service(setup.workdir, phase, config_path, {
            **SERVICE_ENV, "AGENTWORKER_REDIS_URL": setup.redis.url, "AGENTWORKER_DATABASE_URL": database_url,
            "AGENTWORKER_EGRESS_ALLOW": f"127.0.0.1:{receiver.port}"}, processes=PROCESSES)
        stack.push_async_callback(service.close)
        service.start()
        if not await service.wait_serving(120):
            raise RuntimeError(f"agentworker run had not {PROCESSES} workers serving after 120 s; "
                               f"see {service.logs[-1]}")
        enqueued = await _save_and_enqueue(setup, database_url, config_path, receiver.url)
        began = time.monotonic()
        watcher = RunWatcher(database_url, redis, enqueued)
        injector = FaultInjector(service, setup.redis, setup.postgres, setup.rng)
        tasks = [asyncio.create_task(injector.kill_workers(began, done)),
                 asyncio.create_task(injector.one_offs(began, expected_s, done,
                                                       lambda: setup.runs - watcher.last.settled))] if faults else []
        stack.push_async_callback(_cancel, tasks)
        tally, finished_s = await _wait_settled(watcher, setup.runs, began, deadline_s, injector)
        done.set()
        for task in tasks:
            await task
        wall_s = finished_s if finished_s is not None else time.monotonic() - began
        result = await _count(tally, enqueued, redis, receiver, injector)
        result.update(runs=setup.runs, finished=finished_s is not None, wall_s=round(wall_s, 2))
    result["logs"] = scan_logs(service.logs)
    result["log_files"] = [str(p) for p in service.logs]
    return result


async def _save_and_enqueue(setup: Setup, database_url: str, config_path: Path, receiver_url: str) -> list[Enqueued]:
    """Save each tenant's workflow through the client and enqueue the runs, round-robin over the tenants."""
    settings = Settings(redis_url=setup.redis.url, database_url=database_url, config=str(config_path))
    # the client's own database, closed once the workflows are saved: its pool would only log the restart
    database = await open_database(database_url)
    redis = Redis.from_url(setup.redis.url)  # like the database: ours to close, the client leaves it open
    try:
        async with AgentWorkerClient(redis, load_config(config_path), settings, database=database) as client:
            for tenant in TENANTS:
                await client.save_workflow(tenant, workflow(receiver_url))
            enqueued: list[Enqueued] = []
            began = time.monotonic()
            for i in range(setup.runs):
                tenant, input_id = TENANTS[i % len(TENANTS)], f"run-{i:05d}"
                job = await client.enqueue("execute_workflow", tenant_id=tenant, idempotency_key=input_id,
                                           payload={"workflow_id": WORKFLOW_ID, "input_data": {"id": input_id}})
                enqueued.append(Enqueued(job.job_id, tenant, input_id))
            log(f"  enqueued {setup.runs} runs in {time.monotonic() - began:.1f} s")
            return enqueued
    finally:
        await redis.aclose()
        await database.close()


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def _wait_settled(watcher: RunWatcher, total: int, began: float, deadline_s: float,
                        injector: FaultInjector) -> tuple[RunTally, float | None]:
    """Tally every second until every run settled or the deadline; a progress line every 5 s. Returns the
    last tally and the seconds it took (None at the deadline)."""
    printed = 0.0
    tally = RunTally()
    while True:
        now = time.monotonic()
        found = await watcher.tally()
        if found is not None:
            tally = found
        faults = (f"; {len(injector.kills)} kills, {len(injector.faults)} one-off faults"
                  if injector.kills or injector.faults else "")
        if found is not None and found.settled == total:
            log(f"  {now - began:5.0f} s: {tally.line(total)}{faults}: every run settled")
            return tally, now - began
        if now - began > deadline_s:
            log(f"  deadline of {deadline_s:.0f} s passed: {tally.line(total)}")
            return tally, None
        if now - printed >= 5:
            printed = now
            log(f"  {now - began:5.0f} s: {tally.line(total)}{faults}"
                + (" (a server is not answering)" if found is None else ""))
        await asyncio.sleep(1.0)


async def _count(tally: RunTally, enqueued: list[Enqueued], redis: Redis, receiver: EffectReceiver,
                 injector: FaultInjector) -> dict[str, Any]:
    completed = set(tally.completed)
    completed_run_ids = [tally.run_ids[job_id] for job_id in tally.completed]
    input_of = {tally.run_ids[run.job_id]: run.input_id for run in enqueued if run.job_id in tally.run_ids}
    per_run, by_name, zero_at_settle = await _wait_notifications(redis, completed_run_ids)
    without_result = await _retry(lambda: jobs_without_result(redis, tally.completed))
    return {
        "completed": len(tally.completed), "lost": len(tally.lost), "failed": len(tally.failed),
        "stuck_running": len(tally.running), "queued": len(tally.queued), "missing": len(tally.missing),
        "failed_by_error": dict(tally.errors),
        "effects": receiver.findings({run.input_id for run in enqueued if run.job_id in completed}),
        "notify_per_completed_run": notify_histogram(per_run, completed_run_ids),
        "notify_zero_at_settle": zero_at_settle,
        "notify_examples": {"0": [input_of[r] for r in completed_run_ids if per_run.get(r, 0) == 0][:10],
                            ">1": [input_of[r] for r in completed_run_ids if per_run.get(r, 0) > 1][:10]},
        "completed_without_job_result": len(without_result), "events": dict(by_name),
        "kills": len(injector.kills), "kill_times_s": [k["at_s"] for k in injector.kills],
        "faults": [vars(f) for f in injector.faults],
        "examples": {"lost": tally.lost[:10], "stuck_running": tally.running[:10], "failed": tally.failed[:10],
                     "completed_without_job_result": without_result[:10]},
    }


async def _wait_notifications(redis: Redis, completed_run_ids: list[str]) -> tuple[Any, Any, int]:
    """The notify events per run once every completed run has one, or after :data:`EVENT_GRACE_S` (an
    event may be published after its run ended: retried while Redis was away, or relayed from PostgreSQL
    after its worker died); also how many completed runs had none when the runs settled."""
    deadline = time.monotonic() + EVENT_GRACE_S
    zero_at_settle: int | None = None
    while True:
        per_run, by_name = await _retry(lambda: count_notifications(redis, TENANTS))
        zero = notify_histogram(per_run, completed_run_ids)["0"]
        if zero_at_settle is None:
            zero_at_settle = zero
        if zero == 0 or time.monotonic() > deadline:
            if zero_at_settle:
                log(f"  {zero_at_settle} completed runs had no notify event when the runs settled; {zero} still "
                    f"have none after waiting up to {EVENT_GRACE_S:g} s")
            return per_run, by_name, zero_at_settle
        await asyncio.sleep(2.0)


async def _retry(call: Callable[[], Awaitable[Any]], attempts: int = 10) -> Any:
    for attempt in range(attempts):
        try:
            return await call()
        except (RedisError, OSError):
            if attempt == attempts - 1:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


# -- the table ------------------------------------------------------------------------------------------


def table(baseline: dict[str, Any], chaos: dict[str, Any]) -> str:
    def row(label: str, get: Callable[[dict[str, Any]], Any]) -> str:
        return f"| {label} | {get(baseline)} | {get(chaos)} |"

    def notify(bucket: str) -> Callable[[dict[str, Any]], Any]:
        return lambda p: p["notify_per_completed_run"][bucket]

    def wall(p: dict[str, Any]) -> str:
        return f"{p['wall_s']:.1f}" + ("" if p["finished"] else " (deadline)")

    ratio = chaos["wall_s"] / baseline["wall_s"] if baseline["wall_s"] else float("nan")
    return "\n".join([
        "| | fault-free | chaos |", "|---|---:|---:|",
        row("runs enqueued", lambda p: p["runs"]),
        row("completed", lambda p: p["completed"]),
        row("lost (no run row, no job)", lambda p: p["lost"]),
        row("failed for good", lambda p: p["failed"]),
        row("stuck `running`", lambda p: p["stuck_running"]),
        row("not started at the deadline (queued)", lambda p: p["queued"] + p["missing"]),
        row("duplicate effects (run+step, >1 key)", lambda p: p["effects"]["duplicate_effects"]),
        row("same-key redeliveries (keys seen >1x)", lambda p: p["effects"]["same_key_redeliveries"]),
        row("completed runs whose effect never arrived", lambda p: p["effects"]["completed_without_effect"]),
        row("completed runs whose job has no result", lambda p: p["completed_without_job_result"]),
        row("completed runs with 0 notify events when the runs settled", lambda p: p["notify_zero_at_settle"]),
        row(f"completed runs with 0 notify events (up to {EVENT_GRACE_S:g} s later)", notify("0")),
        row("completed runs with 1 notify event", notify("1")),
        row("completed runs with >1 notify events", notify(">1")),
        row("worker kills (kill -9)", lambda p: p["kills"]),
        row("one-off faults injected", lambda p: sum(1 for f in p["faults"] if f["error"] is None)),
        row("error lines in the service's logs", lambda p: p["logs"]["levels"].get("error", 0)),
        row("wall time (s)", wall),
        f"| wall time vs fault-free | 1.00 | {ratio:.2f} |",
    ])


def notes(phases: dict[str, dict[str, Any]]) -> list[str]:
    lines = []
    for fault in phases["chaos"]["faults"]:
        outcome = fault["error"] or f"took {fault['took_s']:.1f} s"
        lines.append(f"  {fault['name']} at {fault['at_s']:.0f} s, {fault['unsettled']} runs unsettled: {outcome}")
    for name, phase in phases.items():
        if phase["failed_by_error"]:
            lines.append(f"  {name}: failed runs by error: {phase['failed_by_error']}")
        for kind in ("lost", "stuck_running", "completed_without_job_result"):
            if phase["examples"][kind]:
                lines.append(f"  {name}: {kind.replace('_', ' ')}, e.g. {', '.join(phase['examples'][kind][:5])}")
        if phase["logs"]["top"]:
            top = "; ".join(f"{text} ({n})" for text, n in phase["logs"]["top"][:5])
            lines.append(f"  {name}: commonest warnings and errors in the service's logs: {top}")
    return lines


def environment(args: argparse.Namespace, redis: PrivateRedis, postgres: PrivatePostgres) -> dict[str, Any]:
    return {**machine(redis, postgres), "scenario": "chaos", "runs": args.runs, "seed": args.seed,
            "effect_delay_s": args.effect_delay, "tenants": len(TENANTS), "quotas": QUOTAS, "service_env": SERVICE_ENV,
            "kill_every_s": KILL_EVERY_S, "one_off_faults": dict(ONE_OFF_FAULTS),
            "versions": {p: package_version(p) for p in ("agentworker", "arq", "redis", "asyncpg", "langgraph")}}


# -- entry point ----------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="aw-chaos-"))
    try:
        postgres = PrivatePostgres(prefix="aw-chaos-pg-")
    except PostgresUnavailable as exc:
        shutil.rmtree(workdir, ignore_errors=True)
        print(f"bench chaos: {exc}", file=sys.stderr)
        return 2
    redis: PrivateRedis | None = None
    phases: dict[str, dict[str, Any]] = {}
    try:
        redis = PrivateRedis(args.redis_server, appendonly=True, dir=workdir / "redis")
        redis.start()
        await asyncio.to_thread(postgres.start)
        env = environment(args, redis, postgres)
        log(f"bench chaos: {env['cpus']} CPUs, load average {loads(env['load_average_start'])}, "
            f"Redis {env['redis_server']} (AOF) on {redis.url}, PostgreSQL on port {postgres.port}, "
            f"work directory {workdir}, seed {args.seed}")
        setup = Setup(workdir, redis, postgres, args.runs, args.effect_delay, random.Random(args.seed))
        # generous: the fault-free phase has needed about 0.03 s a run on 2 cores
        phases["fault-free"] = await run_phase(setup, "fault-free", faults=False, expected_s=0,
                                               deadline_s=120 + args.runs * 0.5)
        expected_s = phases["fault-free"]["wall_s"]
        phases["chaos"] = await run_phase(setup, "chaos", faults=True, expected_s=expected_s,
                                          deadline_s=300 + expected_s * 5)
    finally:
        tear_down(redis, postgres, workdir, keep=args.keep)
    env["load_average_end"] = os.getloadavg()
    print()
    print(table(phases["fault-free"], phases["chaos"]))
    print("\n".join(notes(phases)))
    output = results_path(args.output, "chaos")
    write_document(output, {"environment": env, "phases": phases})
    kept = f"; logs kept in {workdir}" if args.keep else ""
    print(f"\nload average at the end: {loads(env['load_average_end'])}; "
          f"results written to {output}{kept}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        print("bench chaos: interrupted; every process and temporary directory was cleaned up", file=sys.stderr)
        return 130
