"""``python -m bench --quick`` runs every scenario end to end and writes its table and JSON.

Tiny counts, agentworker beside tuned ARQ (one baseline keeps it near 2.5 minutes; SAQ's adapter is the same
interface): this proves the harness works, not how fast anything is. No figure is asserted, only that each
was measured.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

# Not in the default run (pyproject's addopts deselect "bench"): .ci/run runs it after `make test`.
pytestmark = [pytest.mark.slow, pytest.mark.bench,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")]


@pytest.mark.timeout(240)
def test_quick_bench_measures_every_scenario_and_writes_json(tmp_path: Path) -> None:
    systems = ["agentworker", "arq-tuned"]
    output = tmp_path / "bench.json"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--systems", ",".join(systems),
                           "--output", str(output)], cwd=ROOT, capture_output=True, text=True, timeout=230)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| metric" in done.stdout and str(output) in done.stdout

    document = json.loads(output.read_text())
    metrics = document["metrics"]
    assert document["environment"]["quick"] is True and document["environment"]["cpus"]
    for key in ("throughput_noop", "throughput_sleep", "latency_p50", "latency_p99", "memory_rss", "memory_uss",
                "neighbour_alone_p99", "neighbour_p99", "crash_rerun_p50", "crash_rerun_p99",
                "neighbour_alone_p99_shard", "neighbour_p99_shard", "neighbour_started_shard",
                "neighbour_backlog_shard", "fair_jain_min", "fair_served_min"):
        for system in systems:
            measured = metrics[key]["values"].get(system)
            assert measured is not None or system in metrics[key]["notes"], (key, system)
    for key in ("restart_zygote", "restart_afresh", "metrics_scrape", "metrics_merge", "metrics_merge_stock",
                "neighbour_p99_capped", "memory_uss_afresh"):
        assert metrics[key]["values"]["agentworker"] > 0, key
    for key in ("weight_share_1", "weight_share_2", "weight_share_4", "claim_p50_100", "claim_p99_10000",
                "claim_cmds_100", "claim_cmds_10000", "claim_us_10000"):
        assert metrics[key]["values"]["agentworker"] > 0, key
        assert metrics[key]["notes"]["arq-tuned"] == "n/a", key  # no weights, no tenant caps
    assert metrics["weight_deviation"]["values"]["agentworker"] is not None
    assert metrics["restart_zygote"]["values"]["arq-tuned"] > 0  # the baseline's cold start
    assert metrics["crash_rerun_arq_defaults"]["values"]["arq-tuned"] > 0  # derived from ARQ's own rule
    checks = {(c["metric"], c["target"]) for c in document["targets"]}
    assert ("latency_p50", "<= 5 ms") in checks
    assert all(c["measured"] is not None for c in document["targets"])
