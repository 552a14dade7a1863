"""A task and a tool for the job-control tests (loaded in workers via AGENTWORKER_TASK_MODULES)."""

from __future__ import annotations

import os
from typing import Any

from redis.asyncio import Redis

from agentworker.job_control import cancel_job
from agentworker.tasks import JobContext, task
from agentworker.tools import ToolContext, tool


def flag_key(flag: str) -> str:
    return f"jcprobe:flag:{flag}"


@task()
async def probe_needs_flag(ctx: JobContext, tenant_id: str, flag: str) -> str:
    """Fail until the test sets ``flag``; count each run that gets past it."""
    if not await ctx.redis.exists(flag_key(flag)):
        raise RuntimeError(f"flag {flag} is not set")
    await ctx.redis.hincrby("jcprobe:runs", ctx.job_id, 1)
    return "done"


@tool(side_effects=False)
async def probe_request_cancel(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Ask for the cancel of ``args["job_id"]`` (the job running this very step) and return at once: the
    request lands between this step and the next."""
    async with Redis.from_url(os.environ["AGENTWORKER_REDIS_URL"]) as redis:
        view = await cancel_job(redis, str(args["job_id"]), by="probe")
    return {"status": view.status, "cancel_requested": view.cancel_requested}
