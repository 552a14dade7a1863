"""What the workers can run: the task and tool names they serve, published in Redis so a schedule or a
workflow naming one that does not exist is refused when it is saved, not when it first runs.

Each worker process adds its registry's names at start (and every :data:`REFRESH_S`) to two hashes:
``agentworker:catalog:tasks`` (task -> time last seen, ms) and ``agentworker:catalog:tools`` (tool ->
``*`` or the comma-separated tenants it is restricted to). The client checks a schedule's ``task`` and a
workflow's ``tool`` steps against them. Names stay known for :data:`FORGET_AFTER_S` after the last worker
serving them stopped (a rolling deploy does not make them unknown); before any worker has published
(an empty catalog), nothing is refused — there is nothing to check against.

Not checked, because only a running agent can know them: the ``tools`` of an agent step (they may name an
external MCP server's tools, loaded when the agent starts).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from redis.asyncio import Redis

from agentworker import keys

__all__ = ["FORGET_AFTER_S", "REFRESH_S", "publish", "tool_problem", "unknown_task"]

#: how often a worker adds its names again
REFRESH_S = 600.0
#: names nobody published for this long are forgotten
FORGET_AFTER_S = 7 * 86_400


async def publish(redis: Redis, tasks: Iterable[str], tools: Iterable[tuple[str, frozenset[str] | None]]) -> None:
    """Add a worker's task and tool names to the catalog."""
    now = str(int(time.time() * 1000))
    task_fields = dict.fromkeys(tasks, now)
    tool_fields = {name: "*" if tenants is None else ",".join(sorted(tenants)) for name, tenants in tools}
    async with redis.pipeline(transaction=False) as pipe:
        if task_fields:
            pipe.hset(keys.catalog_tasks(), mapping=task_fields)
            pipe.expire(keys.catalog_tasks(), int(FORGET_AFTER_S))
        if tool_fields:
            pipe.hset(keys.catalog_tools(), mapping=tool_fields)
            pipe.expire(keys.catalog_tools(), int(FORGET_AFTER_S))
        await pipe.execute()


async def unknown_task(redis: Redis, task: str) -> str | None:
    """Why ``task`` cannot be scheduled (one sentence), or None if a worker serves it or none has said."""
    known = sorted(name.decode() for name in await redis.hkeys(keys.catalog_tasks()))  # type: ignore[misc]
    if not known or task in known:
        return None
    return f"task: no worker serves a task named {task!r} (served: {', '.join(known)})"


async def tool_problem(redis: Redis, tenant_id: str, tool: str) -> str | None:
    """Why a tool step may not call ``tool`` for ``tenant_id`` (one sentence), or None if it may (or no
    worker has published its tools yet)."""
    tools = {k.decode(): v.decode() for k, v in (await redis.hgetall(keys.catalog_tools())).items()}  # type: ignore[misc]
    if not tools:
        return None
    allowed = tools.get(tool)
    if allowed is not None and (allowed == "*" or tenant_id in allowed.split(",")):
        return None
    available = sorted(n for n, who in tools.items() if who == "*" or tenant_id in who.split(","))
    return f"no tool named {tool!r} is available to tenant {tenant_id!r} (available: {', '.join(available)})"
