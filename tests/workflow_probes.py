"""Tools for the workflow tests (loaded in workers via AGENTWORKER_TASK_MODULES).

Each execution of a probe step's effect is counted in Redis (``wfprobe:{tenant}:{name}``), so a test can
prove which steps ran how often, across worker processes and crashes.
"""

from __future__ import annotations

import asyncio
import os
import signal
from typing import Any

from redis.asyncio import Redis

from agentworker.tools import ToolContext, tool


def _redis() -> Redis:
    return Redis.from_url(os.environ["AGENTWORKER_REDIS_URL"])


def counter_key(tenant_id: str, name: str) -> str:
    return f"wfprobe:{tenant_id}:{name}"


@tool(side_effects=False)
async def probe_step(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Count an execution of ``args["name"]``; block ``args["block_first"]`` seconds on the first one;
    fail while the count is below ``args["fail_until"]``; SIGKILL its own worker when ``args["kill_worker"]``."""
    name = str(args["name"])
    async with _redis() as redis:
        count = int(await redis.incr(counter_key(ctx.tenant_id, name)))
        await redis.rpush(f"wfprobe:{ctx.tenant_id}:order", name)
    if args.get("kill_worker"):
        os.kill(os.getpid(), signal.SIGKILL)  # a poison step: its worker dies every time it runs it
    if count == 1 and args.get("block_first"):
        await asyncio.sleep(float(args["block_first"]))
    if count < int(args.get("fail_until", 0)):
        raise RuntimeError(f"{name} fails on execution {count}")
    return {"name": name, "count": count, "pid": os.getpid(), "seen": args.get("seen")}


@tool(side_effects=True)
async def probe_effect(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """A side effect through the ledger: counted once per real execution."""
    name = str(args["name"])
    async with _redis() as redis:
        count = int(await redis.incr(counter_key(ctx.tenant_id, name)))
    if args.get("sleep"):
        await asyncio.sleep(float(args["sleep"]))
    return {"name": name, "count": count, "key": ctx.idempotency_key}
