"""Plain ARQ workers for the bench: ``python -m arq bench.arq_app.DefaultSettings`` (or ``TunedSettings``).

Both run 10 jobs at once, as agentworker's bench pool does. ``DefaultSettings`` keeps every other ARQ
default (0.5 s poll delay, reads ``max_jobs`` ids per poll, pickle). ``TunedSettings`` is ARQ as a careful
user would tune it without changing the concurrency: a 10 ms poll delay and 100 ids read per poll.

``CrashDefaultSettings`` and ``CrashTunedSettings`` are the same two for the crash scenario: they also serve
``rerun``, take ``BENCH_ARQ_MAX_JOBS`` jobs at once (one worker holds every sample) and use
``BENCH_ARQ_JOB_TIMEOUT`` seconds as job_timeout, which sets how long ARQ keeps a killed job's in-progress key
(``in_progress_timeout_s`` = the largest function timeout + 10 s).
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, ClassVar

from arq.connections import RedisSettings

from bench.starts import record_start


async def noop(ctx: dict[str, Any]) -> float:
    return time.time()


async def sleep(ctx: dict[str, Any], seconds: float) -> float:
    started = time.time()
    await asyncio.sleep(seconds)
    return started


async def rerun(ctx: dict[str, Any], seconds: float) -> float:
    """``bench.tasks.bench_rerun`` for ARQ: record the start, sleep on the first start only."""
    started, runs = await record_start(ctx["redis"], ctx["job_id"])
    if runs == 1:
        await asyncio.sleep(seconds)
    return started


_REDIS = RedisSettings.from_dsn(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0"))


class DefaultSettings:
    functions: ClassVar[list[Any]] = [noop, sleep]
    redis_settings = _REDIS
    max_jobs = 10


class TunedSettings:  # not a subclass: ARQ reads only the class's own __dict__
    functions: ClassVar[list[Any]] = [noop, sleep]
    redis_settings = _REDIS
    max_jobs = 10
    poll_delay = 0.01
    queue_read_limit = 100


_CRASH_JOBS = int(os.environ.get("BENCH_ARQ_MAX_JOBS", "20"))
_CRASH_TIMEOUT = float(os.environ.get("BENCH_ARQ_JOB_TIMEOUT", "5"))


class CrashDefaultSettings:
    functions: ClassVar[list[Any]] = [noop, sleep, rerun]
    redis_settings = _REDIS
    max_jobs = _CRASH_JOBS
    job_timeout = _CRASH_TIMEOUT


class CrashTunedSettings:
    functions: ClassVar[list[Any]] = [noop, sleep, rerun]
    redis_settings = _REDIS
    max_jobs = _CRASH_JOBS
    job_timeout = _CRASH_TIMEOUT
    poll_delay = 0.01
    queue_read_limit = 100
