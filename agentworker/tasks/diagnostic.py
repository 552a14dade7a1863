"""Diagnostic tasks: prove the machinery end to end without any external service."""

from __future__ import annotations

import asyncio

from agentworker.tasks.context import JobContext
from agentworker.tasks.registry import task

MAX_SLEEP_SECONDS = 3600.0


@task()
async def echo(ctx: JobContext, tenant_id: str, message: str = "") -> str:
    """Return ``message`` unchanged."""
    return message


@task()
async def sleep(ctx: JobContext, tenant_id: str, seconds: float = 1.0) -> float:
    """Sleep ``seconds`` (bounded by the job timeout, like any task) and return them."""
    if not isinstance(seconds, int | float) or not 0 <= seconds <= MAX_SLEEP_SECONDS:
        raise ValueError(f"seconds must be a number from 0 to {MAX_SLEEP_SECONDS:g}, got {seconds!r}")
    await asyncio.sleep(seconds)
    return float(seconds)
