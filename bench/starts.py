"""Where the crash scenario's job records each of its starts, for agentworker's and ARQ's twin tasks alike
(no imports of either, so ARQ's workers stay plain ARQ)."""

from __future__ import annotations

import os
import time
from typing import Any


def starts_key(job_id: str) -> str:
    """A Redis list of ``"<wall-clock time> <worker pid>"``, one entry per start of the job."""
    return f"bench:starts:{job_id}"


async def record_start(redis: Any, job_id: str) -> tuple[float, int]:
    """Append this start; return its time and how many starts the job has had, this one included."""
    started = time.time()
    runs = await redis.rpush(starts_key(job_id), f"{started} {os.getpid()}")
    return started, int(runs)


def parse_start(entry: bytes) -> tuple[float, int]:
    """One list entry: (time, pid)."""
    when, pid = entry.split()
    return float(when), int(pid)
