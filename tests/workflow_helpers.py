"""Shared pieces of the workflow end-to-end tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from redis.asyncio import Redis

from agentworker.client import AgentWorkerClient
from agentworker.config import load_config
from agentworker.db import Database
from agentworker.events import Event
from agentworker.settings import Settings
from agentworker.submit import JobSubmitter
from tests.conftest import LOOPBACK_PEERS_ALLOWED
from tests.workflow_probes import counter_key

WORKER_MODULES = "tests.probe_tasks,tests.workflow_probes"


def workflow_worker_env(database_url: str, **extra: str) -> dict[str, str]:
    return {"AGENTWORKER_DATABASE_URL": database_url, "AGENTWORKER_TASK_MODULES": WORKER_MODULES,
            **LOOPBACK_PEERS_ALLOWED, **extra}


class _ClientWithItsOwnRedis(AgentWorkerClient):
    """The helpers' client: the helper made its Redis client, so closing it closes that too (an
    AgentWorkerClient leaves a Redis client it was handed open)."""

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await self.redis.aclose()


def workflow_client(redis_url: str, config_path: Path, database: Database | None = None,
                    database_url: str | None = None) -> AgentWorkerClient:
    settings = Settings(redis_url=redis_url, config=str(config_path),
                        **({"database_url": database_url} if database_url else {}))
    return _ClientWithItsOwnRedis(Redis.from_url(redis_url), load_config(config_path), settings, database=database)


def submitter_of(client: AgentWorkerClient) -> JobSubmitter:
    """A job submitter on ``client``'s Redis and config, as the dispatcher and the tasks use one."""
    return JobSubmitter(client.redis, client.config, max_payload_bytes=client.settings.max_payload_bytes)


def probe(step_id: str, depends_on: list[str] | None = None, **args: Any) -> dict[str, Any]:
    """A tool step calling the counting probe, named after the step."""
    return {"id": step_id, "kind": "tool", "tool": "probe_step", "depends_on": depends_on or [],
            "args": {"name": step_id, **args}}


async def counts(redis: Redis, tenant_id: str, names: list[str]) -> dict[str, int]:
    values = [await redis.get(counter_key(tenant_id, name)) for name in names]
    return {name: int(v) if v is not None else 0 for name, v in zip(names, values, strict=True)}


async def collect_events(client: AgentWorkerClient, tenant_id: str, until: Callable[[Event], bool],
                         timeout: float = 30) -> list[Event]:
    """The tenant's events from the start of its stream up to the first one ``until`` accepts."""
    seen: list[Event] = []
    try:
        async with asyncio.timeout(timeout):
            async for event in client.events(tenant_id, since="0", block_ms=200):
                seen.append(event)
                if until(event):
                    return seen
    except TimeoutError:
        raise AssertionError(f"no such event within {timeout}s; saw {[e.event for e in seen]}") from None
    raise AssertionError("event stream ended")


def workflow_events(events: list[Event], run_id: str) -> list[Event]:
    return [e for e in events if e.event.startswith("workflow_") and e.data.get("run_id") == run_id]
