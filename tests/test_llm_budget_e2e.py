"""Tenant LLM budgets end to end: real `agentworker run` processes, chat agents calling the fake
OpenAI-compatible endpoint (which reports usage), limits set through the tenant store."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import keys
from agentworker.db import Database
from agentworker.events import _decode
from agentworker.llm_budget import SLOT_TTL_S
from tests.agent_helpers import model_settings
from tests.conftest import new_tenant, wait_for
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory
from tests.workflow_helpers import workflow_client, workflow_worker_env


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


def _window_peak(served: list[tuple[float, int]], window_s: float) -> int:
    """The most tokens served in any window of ``window_s`` seconds (windows starting at each request)."""
    served = sorted(served)
    peak = 0
    for i, (start, _) in enumerate(served):
        peak = max(peak, sum(tokens for at, tokens in served[i:] if at < start + window_s))
    return peak


@pytest.mark.timeout(420)
async def test_a_token_budget_makes_its_tenants_jobs_wait_across_windows_and_usage_matches_the_endpoint(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str, database_url: str, database: Database, fake_openai: Any) -> None:
    fake_openai.usage_by_size = True
    config = write_quotas({"pools": {"standard": {"shards": 1, "processes": 2, "concurrency": 10,
                                                  "job_timeout": 60}}})
    sup = supervisors(config, **workflow_worker_env(database_url))
    await sup.wait_ready()
    limited, free = new_tenant("budget"), new_tenant("neighbour")
    async with workflow_client(redis_url, config, database) as client:
        await client.set_tenant(limited, overrides={"llm_tokens": "1000/m", "rate_limit": "100/s"}, by="test")
        await client.save_integration(limited, "model", model_settings(fake_openai, api_key="sk-limited",
                                                                       max_tokens=40))
        await client.save_integration(free, "model", model_settings(fake_openai, api_key="sk-free", max_tokens=40))
        message = "Please note for later: the quarterly numbers look fine, all of them."
        jobs = [await client.enqueue("run_chat_agent", limited, {"conversation_id": f"c{i}", "message": message})
                for i in range(20)]
        await asyncio.sleep(2)  # the budget tenant's first window fills
        started = time.monotonic()
        neighbours = [await client.enqueue("run_chat_agent", free, {"conversation_id": f"n{i}", "message": message})
                      for i in range(5)]
        for job in neighbours:
            assert (await job.result(timeout=60))["status"] == "completed"
        neighbours_done = time.monotonic() - started
        pending_then = 0
        for job in jobs:
            pending_then += int(await job.status() != "complete")
        print(f"the neighbour's 5 turns took {neighbours_done:.2f}s; {pending_then} budget jobs were still waiting")
        assert pending_then > 0, "the budget never held any job back: the test shows nothing"
        for job in jobs:
            assert (await job.result(timeout=300))["status"] == "completed"
        infos = [await job.info() for job in jobs]
        assert all(info is not None and info.job_try == 1 for info in infos), "waiting spent no try"

        served = [(at, tokens) for at, who, tokens in fake_openai.served if who == "Bearer sk-limited"]
        largest = max(tokens for _, tokens in served)
        total = sum(tokens for _, tokens in served)
        peak = _window_peak(served, 60.0)
        print(f"budget tenant: {len(served)} calls, {total} tokens, peak of any 60 s window {peak} "
              f"(largest call {largest})")
        assert total > 1000  # it needed more than one window
        assert peak <= 1000 + largest

        # billing: the recorded usage is the endpoint's own count, and each tenant sees only its own
        usage = await client.llm_usage(limited)
        assert sum(u.total_tokens for u in usage) == total
        assert sum(u.calls for u in usage) == len(served) and all(u.estimated_calls == 0 for u in usage)
        free_served = sum(tokens for _, who, tokens in fake_openai.served if who == "Bearer sk-free")
        assert sum(u.total_tokens for u in await client.llm_usage(free)) == free_served

        events = await _event_names(redis, limited)
        assert "tenant_llm_budget_exhausted" in events
        assert "job_deferred" in events
        assert events.count("tenant_llm_budget_exhausted") <= 1 + int((time.monotonic() - started) // 60)


async def _event_names(redis: Redis, tenant: str) -> list[str]:
    """The names of every event of the tenant's stream so far."""
    return [_decode(entry_id, fields).event for entry_id, fields in await redis.xrange(keys.event_stream(tenant))]


@pytest.mark.timeout(240)
async def test_llm_concurrency_holds_across_worker_processes_and_a_killed_workers_slot_comes_back(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str, database_url: str, database: Database, fake_openai: Any) -> None:
    config = write_quotas({"pools": {"standard": {"shards": 1, "processes": 3, "concurrency": 1,
                                                  "job_timeout": 60}}})
    sup = supervisors(config, **workflow_worker_env(database_url))
    await sup.wait_ready()
    tenant = new_tenant("slots")
    slots = keys.llm_slots(tenant)
    async with workflow_client(redis_url, config, database) as client:
        await client.set_tenant(tenant, overrides={"llm_concurrency": 2}, by="test")
        await client.save_integration(tenant, "model", model_settings(fake_openai, "slow", api_key="sk-slots"))
        jobs = [await client.enqueue("run_chat_agent", tenant, {"conversation_id": f"s{i}", "message": f"hi {i}"})
                for i in range(30)]  # enough to keep two calls in flight past the slot's lease TTL

        async def holders() -> list[int]:
            members = [m.decode() for m in await redis.zrange(slots, 0, -1)]
            return [int(member.split(":")[1]) for member in members]

        await wait_for(lambda: _count(holders, 2), 60, what="two model calls in flight", interval=0.05)
        victim = (await holders())[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()

        async def slot_back() -> bool:
            live = await holders()
            return len(live) == 2 and victim not in live

        await wait_for(slot_back, SLOT_TTL_S + 30, what="the killed worker's slot to come back", interval=0.1)
        print(f"the killed worker's slot was back after {time.monotonic() - killed_at:.1f}s "
              f"(lease TTL {SLOT_TTL_S:g}s)")
        for job in jobs:
            assert (await job.result(timeout=120))["status"] == "completed"
    assert fake_openai.max_in_flight["Bearer sk-slots"] == 2


async def _count(read: Callable[[], Any], wanted: int) -> bool:
    return len(await read()) >= wanted
