"""Tasks used by the tests to observe the worker from inside jobs (loaded via AGENTWORKER_TASK_MODULES)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from typing import Any

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


@task()
async def probe_lifespan(ctx: JobContext, tenant_id: str, durations: list[float]) -> int:
    """Record each run of a job in the list ``probe:life:{job id}`` and sleep ``durations[run]`` seconds
    (the last one for later runs); return the pid that finished it.

    A run appends a ``start`` entry (its pid and wall-clock time) and, unless its process dies, an ``end``
    entry with ``how``: ``done`` or ``cancelled``; both carry the run's token."""
    key = f"probe:life:{ctx.job_id}"
    token = uuid.uuid4().hex
    await ctx.redis.rpush(key, json.dumps(
        {"run": token, "event": "start", "pid": os.getpid(), "t": time.time(), "try": ctx.job_try}))
    entries = [json.loads(raw) for raw in await ctx.redis.lrange(key, 0, -1)]
    runs_before = sum(1 for e in entries if e["event"] == "start" and e["run"] != token)
    how = "cancelled"
    try:
        await asyncio.sleep(durations[min(runs_before, len(durations) - 1)])
        how = "done"
    finally:
        await ctx.redis.rpush(key, json.dumps({"run": token, "event": "end", "how": how, "t": time.time()}))
    return os.getpid()


async def _suicide_failed(ctx: JobContext, payload: dict[str, Any], reason: str, error: BaseException) -> None:
    await ctx.redis.hset("probe:final_failures", ctx.job_id, json.dumps(
        {"reason": reason, "error": type(error).__name__, "pid": os.getpid()}))


@task(on_final_failure=_suicide_failed)
async def probe_suicide(ctx: JobContext, tenant_id: str, deaths: int = -1) -> int:
    """SIGKILL this worker process on the first ``deaths`` runs of the job (on every run if negative), as a
    segfault or the OOM killer would; count the runs in ``probe:suicides``. Its final-failure hook records
    its call in ``probe:final_failures``."""
    n = int(await ctx.redis.hincrby("probe:suicides", ctx.job_id, 1))
    if deaths < 0 or n <= deaths:
        os.kill(os.getpid(), signal.SIGKILL)
    return n


@task()
async def probe_started(ctx: JobContext, tenant_id: str, seconds: float = 0.0, log: str = "starts") -> int:
    """Append the tenant to ``probe:{log}`` as the job starts (the order of starts), then sleep."""
    position = int(await ctx.redis.rpush(f"probe:{log}", tenant_id))
    await asyncio.sleep(seconds)
    return position
