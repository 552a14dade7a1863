"""Keep prometheus_client's multiprocess directory bounded by the number of live workers.

In multiprocess mode every process writes its samples to files named after its pid
(``counter_1234.db``, ``histogram_1234.db``, ``gauge_livesum_1234.db``...) and the collector merges every
file it finds. Stock, the files of dead processes stay forever: each restart adds files and scrapes get
slower (prometheus/client_python issues 204 and 367). Deleting them instead would make counters go
backwards.

So when the supervisor has reaped a worker it folds that worker's files into one archive file per
kind (``counter_archive.db``, ``histogram_archive.db``...) and deletes them:

* counters, histograms and summaries: values add up (histogram files hold per-bucket counts, not
  cumulative ones, so adding is right for them too);
* gauges in ``sum``, ``max``, ``min`` and ``mostrecent`` mode, which by definition include dead
  processes: added, maxed, minned or latest-timestamp-wins into ``gauge_{mode}_archive.db`` (the
  collector drops the pid label of those modes, so ``archive`` never shows as a label);
* ``live*`` gauges (prometheus_client's :func:`mark_process_dead`) and ``all`` gauges (one series per
  pid, so unbounded by design) of a dead process are dropped.

The archive is written to a temporary name (not ending in ``.db``, so the collector skips it) and
renamed over the old one, so a scrape sees the old or the new archive, never half of one. The
supervisor archives and scrapes on one event loop thread, so a scrape never sees the worker's samples
both in its own file and in the archive.

This is the one module that uses prometheus_client's private ``MmapedDict`` (and its file names); what
it relies on is checked by ``tests/test_prometheus_internals.py``, and the pin in pyproject.toml is to
the versions that test passed on.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
from pathlib import Path

from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

ARCHIVE_ID = "archive"

#: how the samples of a dead process combine with the archive, by file kind (the name before the pid)
_ADDED = ("counter", "histogram", "summary", "gauge_sum")
_COMBINE: dict[str, str] = {**dict.fromkeys(_ADDED, "sum"), "gauge_max": "max", "gauge_min": "min",
                            "gauge_mostrecent": "mostrecent"}
_FILE_RE = re.compile(r"^(?P<kind>[a-z]+(?:_[a-z]+)?)_(?P<pid>\d+|archive)\.db$")

Values = dict[str, tuple[float, float]]  # mmap key -> (value, timestamp)


def _read(path: Path) -> Values:
    values: Values = {}
    for key, value, timestamp, _pos in MmapedDict.read_all_values_from_file(str(path)):  # type: ignore[no-untyped-call]
        values[key] = (value, timestamp)
    return values


def _combine(how: str, into: Values, more: Values) -> None:
    for key, (value, ts) in more.items():
        if key not in into:
            into[key] = (value, ts)
            continue
        old_value, old_ts = into[key]
        if how == "sum":
            into[key] = (old_value + value, max(old_ts, ts))
        elif how == "max":
            into[key] = (max(old_value, value), max(old_ts, ts))
        elif how == "min":
            into[key] = (min(old_value, value), max(old_ts, ts))
        elif ts >= old_ts:  # mostrecent
            into[key] = (value, ts)


def _write(path: Path, values: Values) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    store = MmapedDict(str(tmp))  # type: ignore[no-untyped-call]
    try:
        for key, (value, ts) in values.items():
            store.write_value(key, value, ts)  # type: ignore[no-untyped-call]
    finally:
        store.close()  # type: ignore[no-untyped-call]
    os.replace(tmp, path)


class MetricsArchive:
    """The multiprocess directory of one supervisor's workers."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def reset(self) -> None:
        """Create the directory if needed and delete every metrics file in it (left by an earlier run:
        its pids mean nothing now, and its counters belong to processes of another lifetime)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        for pattern in ("*.db", "*.db.tmp"):
            for name in glob.glob(str(self.directory / pattern)):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(name)

    def files_of(self, pid: int) -> list[Path]:
        return sorted(self.directory.glob(f"*_{pid}.db"))

    def pids(self) -> set[int]:
        """Pids that have files in the directory."""
        found: set[int] = set()
        for path in self.directory.glob("*.db"):
            match = _FILE_RE.match(path.name)
            if match and match["pid"] != ARCHIVE_ID:
                found.add(int(match["pid"]))
        return found

    def retire(self, pid: int) -> int:
        """Fold the files of dead process ``pid`` into the archive and delete them; return how many
        files were removed. Call only once the process is reaped: its files must no longer change."""
        removed = 0
        for path in self.files_of(pid):
            match = _FILE_RE.match(path.name)
            kind = match["kind"] if match else ""
            how = _COMBINE.get(kind)
            if how is not None:
                archive = self.directory / f"{kind}_{ARCHIVE_ID}.db"
                merged = _read(archive) if archive.exists() else {}
                _combine(how, merged, _read(path))
                _write(archive, merged)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
        # Also removes live gauge files, should a future prometheus_client name them differently.
        mark_process_dead(pid, str(self.directory))  # type: ignore[no-untyped-call]
        return removed
