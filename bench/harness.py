"""What the benchmark entry points share (``python -m bench``, ``bench chaos``, ``bench tenants``): the
machine's description recorded with every result, where results go, and the teardown of the private
Redis and PostgreSQL a run starts."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import time
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.postgres_server import PrivatePostgres
from bench.redis_server import PrivateRedis

RESULTS = Path(__file__).resolve().parent / "results"


def package_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def machine(redis: PrivateRedis, postgres: PrivatePostgres | None = None) -> dict[str, Any]:
    """The date, CPUs, load average at the start, platform, Python and Redis (and PostgreSQL) of a run."""
    described: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cpus": os.cpu_count(), "load_average_start": os.getloadavg(),
        "platform": platform.platform(), "python": platform.python_version(), "redis_server": redis.version()}
    if postgres is not None:
        described["postgres_bin"] = str(postgres.bin_dir)
    return described


def loads(values: Iterable[float]) -> str:
    """A load average as printed: ``0.49 0.88 1.60``."""
    return " ".join(f"{x:.2f}" for x in values)


def results_path(output: Path | None, scenario: str) -> Path:
    """``--output``, or ``bench/results/<scenario>-<time>.json``."""
    return output or RESULTS / f"{scenario}-{time.strftime('%Y%m%d-%H%M%S')}.json"


def write_document(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")


def tear_down(redis: PrivateRedis | None, postgres: PrivatePostgres, workdir: Path, *, keep: bool) -> None:
    """Stop the run's Redis and PostgreSQL and remove the work directory (``keep``: leave it, with
    PostgreSQL's log copied into it)."""
    if redis is not None:
        redis.stop()
    if keep:
        with contextlib.suppress(OSError):
            shutil.copy(postgres.log_path, workdir / "postgres.log")
    postgres.cleanup()
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
