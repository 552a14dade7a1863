"""What a running task sees: its tenant, its job, its deadline, and tenant-scoped services."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from agentworker.config import QuotaConfig
from agentworker.events import EventPublisher
from agentworker.settings import Settings


@dataclass
class JobRuntime:
    """Shared by every job of a worker process. ``config`` is swapped in place on reload."""

    pool: str
    slot: int
    settings: Settings
    redis: Redis
    events: EventPublisher
    config: QuotaConfig


@dataclass
class JobContext:
    """Passed as the first argument of every task. Everything on it belongs to ``tenant_id``."""

    tenant_id: str
    job_id: str
    task: str
    job_try: int
    queue: str
    shard: int
    enqueue_time_ms: int
    timeout: float
    runtime: JobRuntime
    log: Any
    started_monotonic: float = field(default_factory=time.monotonic)

    @property
    def pool(self) -> str:
        return self.runtime.pool

    @property
    def redis(self) -> Redis:
        return self.runtime.redis

    @property
    def remaining(self) -> float:
        """Seconds left before the job's timeout."""
        return max(0.0, self.timeout - (time.monotonic() - self.started_monotonic))

    async def emit(self, event: str, data: dict[str, Any]) -> None:
        """Publish an event on this job's tenant channel and stream."""
        await self.runtime.events.publish(self.tenant_id, event, data)
