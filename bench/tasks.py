"""The bench's tasks for agentworker (loaded by its workers through ``AGENTWORKER_TASK_MODULES=bench.tasks``).

Each returns the wall-clock time at which it started, so enqueue-to-start latency is measured from the
task itself, not from ARQ's millisecond timestamps. ``bench/arq_app.py`` and ``bench/saq_app.py`` define
the same two tasks for ARQ and SAQ; ``bench_rerun`` (the crash scenario's job) has its twin in
``bench/arq_app.py`` only.
"""

from __future__ import annotations

import asyncio
import time

from agentworker.tasks import JobContext, task
from bench.starts import record_start


@task()
async def bench_noop(ctx: JobContext, tenant_id: str) -> float:
    return time.time()


@task()
async def bench_sleep(ctx: JobContext, tenant_id: str, seconds: float) -> float:
    started = time.time()
    await asyncio.sleep(seconds)
    return started


@task()
async def bench_rerun(ctx: JobContext, tenant_id: str, seconds: float) -> float:
    """Record this start (time and worker pid, see ``bench/starts.py``); sleep ``seconds`` on the first start
    only, so a job the crash scenario killed finishes at once when it runs again."""
    started, runs = await record_start(ctx.redis, ctx.job_id)
    if runs == 1:
        await asyncio.sleep(seconds)
    return started
