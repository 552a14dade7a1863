"""The metrics archive keeps the multiprocess directory bounded and never lets a counter go backwards.

Real processes write real prometheus_client multiprocess files; the archive folds them in after they
exit; prometheus_client's own MultiProcessCollector reads the result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from prometheus_client.multiprocess import MultiProcessCollector

from agentworker.supervisor.metrics_archive import MetricsArchive

# A stand-in for a worker: records ``n`` jobs in every kind of metric, then exits.
WORKER = """
import sys
from prometheus_client import Counter, Gauge, Histogram
n = int(sys.argv[1])
Counter("t_jobs", "jobs", ["pool"]).labels("p").inc(n)
Histogram("t_dur", "durations", ["pool"], buckets=(1, 5)).labels("p").observe(n)
Gauge("t_live", "running now", ["pool"], multiprocess_mode="livesum").labels("p").set(1)
Gauge("t_max", "largest n", multiprocess_mode="max").set(n)
Gauge("t_sum", "sum of n", multiprocess_mode="sum").set(n)
Gauge("t_recent", "last n", multiprocess_mode="mostrecent").set(n)
Gauge("t_all", "n per pid", multiprocess_mode="all").set(n)
"""


def samples(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for metric in MultiProcessCollector(None, path=str(directory)).collect():
        for s in metric.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def spawn_worker(directory: Path, n: int) -> int:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER, str(n)], env=env)
    assert proc.wait(60) == 0
    return proc.pid


def test_restarts_keep_counters_and_bound_the_files(tmp_path: Path) -> None:
    archive = MetricsArchive(tmp_path / "metrics")
    archive.reset()
    for n in range(1, 6):
        pid = spawn_worker(archive.directory, n)
        before = samples(archive.directory)
        assert archive.pids() == {pid}
        removed = archive.retire(pid)
        assert removed == 7  # one file per kind: counter, histogram and five gauge modes
        after = samples(archive.directory)
        # Folding a dead process into the archive changes no counter, histogram or aggregated gauge.
        for key, value in before.items():
            if key[0] not in ("t_live", "t_all"):
                assert after[key] == value, key
        assert archive.pids() == set()

    final = samples(archive.directory)
    assert final[("t_jobs_total", (("pool", "p"),))] == 15
    assert final[("t_dur_count", (("pool", "p"),))] == 5
    assert final[("t_dur_sum", (("pool", "p"),))] == 15
    assert final[("t_dur_bucket", (("le", "1.0"), ("pool", "p")))] == 1
    assert final[("t_dur_bucket", (("le", "5.0"), ("pool", "p")))] == 5
    assert final[("t_max", ())] == 5
    assert final[("t_sum", ())] == 15
    assert final[("t_recent", ())] == 5
    # Gauges of dead processes that only make sense while they live are gone.
    assert not any(name in ("t_live", "t_all") for name, _labels in final)
    names = sorted(p.name for p in archive.directory.iterdir())
    assert names == ["counter_archive.db", "gauge_max_archive.db", "gauge_mostrecent_archive.db",
                     "gauge_sum_archive.db", "histogram_archive.db"]


def test_live_processes_and_the_archive_add_up(tmp_path: Path) -> None:
    archive = MetricsArchive(tmp_path)
    archive.reset()
    archive.retire(spawn_worker(tmp_path, 2))
    unretired = spawn_worker(tmp_path, 3)  # dead, but not yet folded in: still counted from its own file
    assert samples(tmp_path)[("t_jobs_total", (("pool", "p"),))] == 5
    assert archive.retire(unretired) > 0
    assert archive.pids() == set()
    assert unretired not in archive.pids()
    assert samples(tmp_path)[("t_jobs_total", (("pool", "p"),))] == 5


def test_reset_empties_a_directory_left_by_an_earlier_run(tmp_path: Path) -> None:
    archive = MetricsArchive(tmp_path)
    spawn_worker(tmp_path, 1)
    (tmp_path / "notes.txt").write_text("not ours")
    archive.reset()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert samples(tmp_path) == {}
