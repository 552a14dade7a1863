"""``python -m bench``: run the benchmarks, print the table, write the JSON.

    python -m bench                       # everything (about ten minutes on a 2-core machine)
    python -m bench --quick               # tiny counts: proves the harness works, numbers mean little
    python -m bench --only throughput,latency --systems agentworker,saq

Scenarios: ``throughput`` (a, and d: memory after it), ``latency`` (b), ``restart`` (c), ``metrics`` (e),
``noisy`` (f), ``crash`` (crash-to-rerun after kill -9); fairness inside one shard (bench/fair_scenarios.py):
``noisy-shard``, ``weights``, ``fairness`` (100 tenants), ``claim-cost``. Systems: ``agentworker``, ``arq-default``,
``arq-tuned``, ``saq`` (needs ``pip install -e '.[bench]'``; skipped with a note when missing).

Separate subcommands, not among the scenarios above (bench/chaos.py, bench/tenant_scale.py):

    python -m bench chaos [N] [--keep]    # N workflow runs (default 2000) through kill -9 of workers and
                                          # restarts of Redis, the supervisor and PostgreSQL
    python -m bench tenants [--quick]     # latency and Redis commands per job with 10 and 100,000 tenants
                                          # in the tenant store (issue 19)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench import crash_scenario, fair_scenarios, neighbour, process_scenarios, scenarios
from bench.harness import loads, machine, package_version, results_path
from bench.redis_server import PrivateRedis
from bench.report import SYSTEMS, Metric, check_targets, table, targets_table, write_json
from bench.scenarios import Bench, Options
from bench.systems import SystemFactory, saq_available

SCENARIOS: dict[str, Callable[[Bench], Awaitable[None]]] = {
    "throughput": lambda b: _all(scenarios.throughput(b, "noop"), scenarios.throughput(b, "sleep")),
    "latency": scenarios.latency,
    "restart": process_scenarios.restart,
    "metrics": process_scenarios.metrics_after_restarts,
    "noisy": neighbour.noisy_neighbour,
    "crash": crash_scenario.crash_to_rerun,
    "noisy-shard": fair_scenarios.noisy_shard,
    "weights": fair_scenarios.weights,
    "fairness": fair_scenarios.fairness,
    "claim-cost": fair_scenarios.claim_cost,
}


async def _all(*steps: Awaitable[None]) -> None:
    for step in steps:
        await step


def _csv(value: str, allowed: Sequence[str], what: str) -> tuple[str, ...]:
    chosen = tuple(v.strip() for v in value.split(",") if v.strip())
    unknown = [v for v in chosen if v not in allowed]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(allowed)}")
    return chosen


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny counts, for smoke tests")
    parser.add_argument("--only", type=lambda v: _csv(v, list(SCENARIOS), "scenario"), default=tuple(SCENARIOS),
                        help=f"comma-separated scenarios ({', '.join(SCENARIOS)})")
    parser.add_argument("--systems", type=lambda v: _csv(v, SYSTEMS, "system"), default=SYSTEMS,
                        help=f"comma-separated systems ({', '.join(SYSTEMS)})")
    parser.add_argument("--output", type=Path, help="JSON file (default: bench/results/bench-<time>.json)")
    parser.add_argument("--redis-server", help="redis-server binary (default: from PATH)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs of every process)")
    return parser.parse_args(argv)


def environment(redis: PrivateRedis, args: argparse.Namespace, systems: tuple[str, ...]) -> dict[str, Any]:
    return {
        **machine(redis), "quick": args.quick, "scenarios": list(args.only), "systems": list(systems),
        "versions": {p: package_version(p) for p in ("agentworker", "arq", "saq", "redis", "uvloop", "hiredis")},
    }


async def run(args: argparse.Namespace) -> int:
    systems = tuple(s for s in SYSTEMS if s in args.systems)
    if "saq" in systems and not saq_available():
        print("bench: SAQ is not installed (pip install -e '.[bench]'); running without it", file=sys.stderr)
        systems = tuple(s for s in systems if s != "saq")
    redis = PrivateRedis(args.redis_server)
    redis.start()
    workdir = Path(tempfile.mkdtemp(prefix="aw-bench-"))
    metrics: dict[str, Metric] = {}
    env = environment(redis, args, systems)
    print(f"bench: {env['cpus']} CPUs, load average {loads(env['load_average_start'])}, "
          f"Redis {env['redis_server']} on {redis.url}, work directory {workdir}", flush=True)
    bench = Bench(options=Options(quick=args.quick), redis=redis, workdir=workdir, systems=systems,
                  make=SystemFactory(redis.url, workdir), metrics=metrics, log=lambda m: print(m, flush=True))
    try:
        for name in args.only:
            print(f"== {name}", flush=True)
            began = time.monotonic()
            await SCENARIOS[name](bench)
            print(f"   ({name}: {time.monotonic() - began:.0f} s)", flush=True)
    finally:
        redis.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    env["load_average_end"] = os.getloadavg()
    checks = check_targets(metrics)
    print()
    print(table(metrics, systems))
    if checks:
        print()
        print(targets_table(checks))
    output = results_path(args.output, "bench")
    write_json(output, metrics, checks, env)
    print(f"\nload average at the end: {loads(env['load_average_end'])}; "
          f"results written to {output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["chaos"]:
        from bench import chaos

        return chaos.main(argv[1:])
    if argv[:1] == ["tenants"]:
        from bench import tenant_scale

        return tenant_scale.main(argv[1:])
    args = parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
