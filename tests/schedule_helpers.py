"""Shared pieces of the schedule, polling, webhook and report tests."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from agentworker.db import Database
from tests.conftest import LOOPBACK_PEERS_ALLOWED
from tests.schedule_probes import ticks_key
from tests.workflow_helpers import WORKER_MODULES

SCHEDULE_MODULES = WORKER_MODULES + ",tests.schedule_probes"


def schedule_worker_env(database_url: str, **extra: str) -> dict[str, str]:
    return {"AGENTWORKER_DATABASE_URL": database_url, "AGENTWORKER_TASK_MODULES": SCHEDULE_MODULES,
            "AGENTWORKER_SCHEDULER": "on", **LOOPBACK_PEERS_ALLOWED, **extra}


def tick_schedule(schedule_id: str, cron: str, label: str | None = None, **extra: Any) -> dict[str, Any]:
    """A schedule running ``record_tick`` with its due time."""
    return {"id": schedule_id, "cron": cron, "task": "record_tick",
            "payload": {"due_at": "{{ due_at }}", "label": label or schedule_id}, **extra}


async def ticks(redis: Redis, tenant_id: str, label: str) -> list[str]:
    return [value.decode() for value in await redis.lrange(ticks_key(tenant_id, label), 0, -1)]


async def set_next_due(database: Database, tenant_id: str, schedule_id: str, due: datetime) -> None:
    """Move a schedule's next due time (tests drive the dispatcher with a clock of their own)."""
    async with database.tenant(tenant_id) as tx:
        await tx.execute("UPDATE agentworker.schedules SET next_due_at = $2 WHERE schedule_id = $1",
                         schedule_id, due)


def future_minute(days: int = 400) -> datetime:
    """A whole minute far enough ahead that no dispatcher on the real clock reaches it during a test."""
    return (datetime.now(UTC) + timedelta(days=days)).replace(second=0, microsecond=0)
