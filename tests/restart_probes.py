"""Tools for the PostgreSQL restart test (loaded in workers via AGENTWORKER_TASK_MODULES).

Counted per run and step in Redis, which the restarts do not touch:

* ``restart_step`` (no side effects): each execution, ``rsprobe:{tenant}:{run}:{step}:runs``.
* ``restart_delivery`` (a side effect, through the ledger): each execution in ``...:executions``, and the
  idempotency key it was handed added to the set ``...:keys``, the way an external system that honours
  ``Idempotency-Key`` keeps one delivery per key.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from redis.asyncio import Redis

from agentworker.tools import ToolContext, tool


def probe_key(tenant_id: str, run_id: str, step_id: str, what: str) -> str:
    return f"rsprobe:{tenant_id}:{run_id}:{step_id}:{what}"


def _redis() -> Redis:
    return Redis.from_url(os.environ["AGENTWORKER_REDIS_URL"])


@tool(side_effects=False)
async def restart_step(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Count an execution, then sleep ``args["sleep"]`` seconds (so runs are long enough to be hit)."""
    async with _redis() as redis:
        count = int(await redis.incr(probe_key(ctx.tenant_id, ctx.run_id, ctx.step_id, "runs")))
    await asyncio.sleep(float(args.get("sleep", 0)))
    return {"step": ctx.step_id, "count": count}


@tool(side_effects=True)
async def restart_delivery(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Deliver once per idempotency key; count every execution."""
    async with _redis() as redis:
        count = int(await redis.incr(probe_key(ctx.tenant_id, ctx.run_id, ctx.step_id, "executions")))
        await redis.sadd(probe_key(ctx.tenant_id, ctx.run_id, ctx.step_id, "keys"), ctx.idempotency_key)
    return {"step": ctx.step_id, "key": ctx.idempotency_key, "execution": count}
