"""Tasks used by the tests to observe the worker from inside jobs (loaded via AGENTWORKER_TASK_MODULES)."""

from __future__ import annotations

import asyncio
import os
import time

from agentworker.tasks import JobContext, task

# INCR a running counter and raise the recorded maximum in one step.
_ENTER_LUA = """
local n = redis.call('INCR', KEYS[1])
if n > tonumber(redis.call('GET', KEYS[2]) or '0') then redis.call('SET', KEYS[2], n) end
return n
"""


@task()
async def probe_count(ctx: JobContext, tenant_id: str, message: str = "") -> dict[str, object]:
    """Count each execution of a job id, and report where it ran."""
    await ctx.redis.hincrby("probe:runs", ctx.job_id, 1)
    return {"message": message, "queue": ctx.queue, "pid": os.getpid()}


@task()
async def probe_sleep(ctx: JobContext, tenant_id: str, seconds: float, group: str = "all") -> int:
    """Sleep while counted as running in ``group`` (and in the tenant's and the shard's counters)."""
    redis = ctx.redis
    enter = redis.register_script(_ENTER_LUA)
    counters = [f"probe:{group}", f"probe:tenant:{tenant_id}", f"probe:shard:{ctx.shard}"]
    now_running = 0
    for counter in counters:
        n = await enter(keys=[f"{counter}:running", f"{counter}:max"])
        now_running = now_running or int(n)
    await redis.rpush(f"probe:{group}:starts", ctx.shard)
    try:
        await asyncio.sleep(seconds)
    finally:
        for counter in counters:
            await redis.decr(f"{counter}:running")
    await redis.hincrby("probe:runs", ctx.job_id, 1)
    return now_running


@task()
async def probe_effect(ctx: JobContext, tenant_id: str, name: str, seconds: float = 0.0) -> int:
    """A side effect counted once per execution, after an optional sleep."""
    await asyncio.sleep(seconds)
    return int(await ctx.redis.hincrby("probe:effects", name, 1))


@task()
async def probe_block(ctx: JobContext, tenant_id: str, seconds: float) -> float:
    """Block the event loop (synchronous sleep), as badly written blocking code would."""
    time.sleep(seconds)  # noqa: ASYNC251 - blocking on purpose
    return seconds


@task()
async def probe_fail(ctx: JobContext, tenant_id: str, message: str = "boom") -> None:
    raise RuntimeError(message)


@task(retry_on=(ConnectionError,))
async def probe_flaky(ctx: JobContext, tenant_id: str, failures: int) -> int:
    """Fail with a retryable error on the first ``failures`` tries, then succeed; return the try number."""
    if ctx.job_try <= failures:
        raise ConnectionError(f"transient failure on try {ctx.job_try}")
    return ctx.job_try
