"""A task the schedule tests run from schedules (loaded in workers via AGENTWORKER_TASK_MODULES)."""

from __future__ import annotations

from agentworker.tasks import JobContext, task


def ticks_key(tenant_id: str, label: str) -> str:
    return f"ticks:{tenant_id}:{label}"


@task()
async def record_tick(ctx: JobContext, tenant_id: str, due_at: str, label: str = "tick") -> str:
    """Append the due time this run was dispatched for, so a test can count runs per due time."""
    await ctx.redis.rpush(ticks_key(tenant_id, label), due_at)
    return due_at


@task()
async def failing_tick(ctx: JobContext, tenant_id: str, due_at: str) -> str:
    """A scheduled task that fails while ``probe:fail:{tenant}`` exists (a schedule must show it)."""
    if await ctx.redis.exists(f"probe:fail:{tenant_id}"):
        raise RuntimeError(f"the report for {due_at} could not be built")
    return due_at
