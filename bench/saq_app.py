"""A SAQ worker for the bench: ``python -m saq bench.saq_app.settings`` — 10 jobs at once, SAQ's defaults
otherwise (it waits on Redis with a blocking pop, so it needs no poll delay)."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from saq import Queue


async def noop(ctx: dict[str, Any]) -> float:
    return time.time()


async def sleep(ctx: dict[str, Any], *, seconds: float) -> float:
    started = time.time()
    await asyncio.sleep(seconds)
    return started


settings = {
    "queue": Queue.from_url(os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")),
    "functions": [noop, sleep],
    "concurrency": 10,
}
