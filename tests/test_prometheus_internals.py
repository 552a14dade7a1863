"""Tripwire: fails loudly if the installed prometheus_client changes the private parts that
agentworker/supervisor/metrics_archive.py relies on (the ``MmapedDict`` file format and its methods, the
multiprocess files' names).

Each failure names that file: the archive folds dead workers' files into ``<kind>_archive.db`` with these
calls, and a silent change would make counters go backwards or scrapes fail.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.multiprocess import MultiProcessCollector

VERSION = importlib.metadata.version("prometheus-client")
FIX = f"prometheus_client {VERSION} changed it: fix agentworker/supervisor/metrics_archive.py (and its pin)"

# A worker's counter, as a worker process writes it in multiprocess mode.
WORKER = """
from prometheus_client import Counter
Counter("tripwire_jobs", "jobs", ["pool"]).labels("p").inc(3)
"""


def _mmap_dict() -> Any:
    try:
        module = importlib.import_module("prometheus_client.mmap_dict")
    except ImportError as exc:
        pytest.fail(f"cannot import prometheus_client.mmap_dict ({exc}); {FIX}")
    mmaped_dict = getattr(module, "MmapedDict", None)
    assert isinstance(mmaped_dict, type), f"prometheus_client.mmap_dict.MmapedDict is gone; {FIX}"
    return mmaped_dict


def _counter_file_of_a_worker(directory: Path) -> tuple[int, Path]:
    """Run a worker that counts 3 jobs; return its pid and its file, named as metrics_archive._FILE_RE expects."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    proc = subprocess.Popen([sys.executable, "-c", WORKER], env=env)
    assert proc.wait(60) == 0
    names = sorted(f.name for f in directory.iterdir())
    assert names == [f"counter_{proc.pid}.db"], f"a worker's counter wrote {names}, not counter_<pid>.db; {FIX}"
    return proc.pid, directory / names[0]


def _counter_total(directory: Path) -> float | None:
    for metric in MultiProcessCollector(None, path=str(directory)).collect():
        for sample in metric.samples:
            if sample.name == "tripwire_jobs_total":
                return float(sample.value)
    return None


def test_the_archive_is_written_and_read_as_the_collector_does(tmp_path: Path) -> None:
    mmaped_dict = _mmap_dict()
    _pid, worker_file = _counter_file_of_a_worker(tmp_path)

    # What metrics_archive._read does: (key, value, timestamp, position) records.
    records = list(mmaped_dict.read_all_values_from_file(str(worker_file)))
    assert len(records) == 1 and len(records[0]) == 4, (
        f"MmapedDict.read_all_values_from_file yields {records!r}, not (key, value, timestamp, pos); {FIX}")
    key, value, timestamp, _pos = records[0]
    assert isinstance(key, str) and value == 3.0 and isinstance(timestamp, float), (
        f"MmapedDict.read_all_values_from_file yields {records!r}; {FIX}")

    # What metrics_archive._write does: a new file, one write_value per key, closed.
    archive_file = tmp_path / "counter_archive.db"
    try:
        store = mmaped_dict(str(archive_file))
        store.write_value(key, value + 1, timestamp)
        store.close()
    except (TypeError, AttributeError) as exc:
        pytest.fail(f"MmapedDict(path).write_value(key, value, timestamp) / close() failed ({exc!r}); {FIX}")
    assert [r[:3] for r in mmaped_dict.read_all_values_from_file(str(archive_file))] == [(key, 4.0, timestamp)], (
        f"a value written with MmapedDict.write_value does not read back; {FIX}")

    # The collector adds the archive to the live files, and reads it alone once the worker's file is gone.
    assert _counter_total(tmp_path) == 7.0, f"the collector does not add <kind>_archive.db files up; {FIX}"
    worker_file.unlink()
    assert _counter_total(tmp_path) == 4.0, f"the collector does not read <kind>_archive.db files; {FIX}"


def test_mark_process_dead_takes_a_pid_and_a_directory(tmp_path: Path) -> None:
    multiprocess = importlib.import_module("prometheus_client.multiprocess")
    mark_process_dead = getattr(multiprocess, "mark_process_dead", None)
    assert callable(mark_process_dead), f"prometheus_client.multiprocess.mark_process_dead is gone; {FIX}"
    pid, worker_file = _counter_file_of_a_worker(tmp_path)
    mark_process_dead(pid, str(tmp_path))
    # It removes only live gauges' files: a counter's stays for the archive to fold in.
    assert worker_file.exists(), f"mark_process_dead removed a counter file; {FIX}"
