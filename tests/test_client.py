from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.client import AgentWorkerClient, JobStatus, QuotaExceeded, ResultTimeout
from agentworker.events import EventPublisher
from agentworker.jobs import InvalidJob
from agentworker.routing import InvalidTenantId
from agentworker.settings import Settings
from tests.conftest import BASIC_QUOTAS, make_client


def quotas_with(tenants: dict[str, Any]) -> dict[str, Any]:
    return {**BASIC_QUOTAS, "tenants": tenants}


async def test_enqueue_writes_an_arq_json_job_on_the_tenant_queue(redis: Redis, redis_url: str,
                                                                  quota_file: Path) -> None:
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("echo", tenant_id="acme", payload={"message": "hi"}, idempotency_key="k1")
        assert job.created
        assert job.job_id == "acme:echo:k1"
        route = client.route("acme")
        assert job.route == route
        assert await redis.zscore(route.tenant_queue, job.job_id) is not None
        record = jobs.loads(await redis.get(jobs.job_key(job.job_id)))
        assert record["f"] == "echo"
        assert record["k"] == {"message": "hi", "tenant_id": "acme"}
        assert record["a"] == []
        assert await job.status() == JobStatus.QUEUED
        assert await redis.zcard(keys.pending("acme")) == 1


async def test_same_idempotency_key_enqueues_once(redis: Redis, redis_url: str, quota_file: Path) -> None:
    async with make_client(redis_url, quota_file) as client:
        first = await client.enqueue("echo", tenant_id="acme", payload={"message": "a"}, idempotency_key="same")
        second = await client.enqueue("echo", tenant_id="acme", payload={"message": "b"}, idempotency_key="same")
        assert first.created and not second.created
        assert second.job_id == first.job_id
        assert await redis.zcard(client.route("acme").tenant_queue) == 1
        assert jobs.loads(await redis.get(jobs.job_key(first.job_id)))["k"]["message"] == "a"
        # A different tenant with the same key is a different job.
        other = await client.enqueue("echo", tenant_id="globex", payload={}, idempotency_key="same")
        assert other.created and other.job_id == "globex:echo:same"


async def test_generated_keys_are_unique(redis_url: str, quota_file: Path) -> None:
    async with make_client(redis_url, quota_file) as client:
        ids = {(await client.enqueue("echo", tenant_id="acme")).job_id for _ in range(20)}
        assert len(ids) == 20


async def test_max_pending_rejects_and_enqueues_nothing(redis: Redis, redis_url: str,
                                                        write_quotas: Callable[..., Path]) -> None:
    path = write_quotas(quotas_with({"small": {"max_pending": 3}}))
    async with make_client(redis_url, path) as client:
        for i in range(3):
            await client.enqueue("echo", tenant_id="small", idempotency_key=f"k{i}")
        queue = client.route("small").tenant_queue
        before = await redis.zcard(queue)
        with pytest.raises(QuotaExceeded) as info:
            await client.enqueue("echo", tenant_id="small", idempotency_key="k3")
        assert info.value.limit == "max_pending"
        assert "max_pending of 3" in str(info.value)
        assert await redis.zcard(queue) == before == 3
        assert await redis.get(jobs.job_key("small:echo:k3")) is None
        # A repeat of an existing key is still answered (it adds nothing).
        again = await client.enqueue("echo", tenant_id="small", idempotency_key="k0")
        assert not again.created
        # Another tenant on the same shard is not affected.
        assert (await client.enqueue("echo", tenant_id="other-tenant")).created
        # Once a job is claimed (removed from pending), there is room again.
        await redis.zrem(keys.pending("small"), "small:echo:k0")
        assert (await client.enqueue("echo", tenant_id="small", idempotency_key="k3")).created
        assert await client.pending_count("small") == 3


async def test_rate_limit_rejects_past_the_bucket(redis: Redis, redis_url: str,
                                                  write_quotas: Callable[..., Path]) -> None:
    path = write_quotas(quotas_with({"chatty": {"rate_limit": "5/h"}}))
    async with make_client(redis_url, path) as client:
        for _ in range(5):
            await client.enqueue("echo", tenant_id="chatty")
        with pytest.raises(QuotaExceeded) as info:
            await client.enqueue("echo", tenant_id="chatty", idempotency_key="over")
        assert info.value.limit == "rate_limit"
        assert info.value.retry_after is not None and 0 < info.value.retry_after <= 720
        assert "5/h" in str(info.value)
        assert await redis.zcard(client.route("chatty").tenant_queue) == 5
        assert await redis.get(jobs.job_key("chatty:echo:over")) is None


async def test_rate_limit_refills(redis_url: str, write_quotas: Callable[..., Path]) -> None:
    path = write_quotas(quotas_with({"quick": {"rate_limit": "20/s"}}))
    async with make_client(redis_url, path) as client:
        accepted = 0
        for _ in range(25):
            try:
                await client.enqueue("echo", tenant_id="quick")
                accepted += 1
            except QuotaExceeded as exc:
                await asyncio.sleep(exc.retry_after or 1.0)
                await client.enqueue("echo", tenant_id="quick")
                accepted += 1
        assert accepted == 25


@pytest.mark.parametrize(("task", "tenant", "payload", "key", "error"), [
    ("echo", "Bad Tenant", {}, None, InvalidTenantId),
    ("echo", "", {}, None, InvalidTenantId),
    ("echo", "x" * 80, {}, None, InvalidTenantId),
    ("echo", "../x", {}, None, InvalidTenantId),
    ("Echo!", "acme", {}, None, InvalidJob),
    ("a:b", "acme", {}, None, InvalidJob),
    ("echo", "acme", {"tenant_id": "globex"}, None, InvalidJob),
    ("echo", "acme", {"x": object()}, None, InvalidJob),
    ("echo", "acme", {"x": "y" * 2_000_000}, None, InvalidJob),
    ("echo", "acme", {}, "has space", InvalidJob),
    ("echo", "acme", {}, "", InvalidJob),
])
async def test_bad_input_is_refused_before_anything_is_written(
        redis: Redis, redis_url: str, quota_file: Path, task: str, tenant: str, payload: dict[str, Any],
        key: str | None, error: type[Exception]) -> None:
    async with make_client(redis_url, quota_file) as client:
        with pytest.raises(error):
            await client.enqueue(task, tenant_id=tenant, payload=payload, idempotency_key=key)
    assert await redis.dbsize() == 0


async def test_defer_and_status(redis_url: str, quota_file: Path) -> None:
    async with make_client(redis_url, quota_file) as client:
        job = await client.enqueue("echo", tenant_id="acme", defer=60)
        assert await job.status() == JobStatus.DEFERRED
        with pytest.raises(ResultTimeout):
            await job.result(timeout=0.05)
        with pytest.raises(InvalidJob):
            await client.enqueue("echo", tenant_id="acme", defer=-1)
        assert await client.job("acme:echo:nope").status() == JobStatus.NOT_FOUND


async def test_events_catch_up_then_follow_live(redis: Redis, redis_url: str, quota_file: Path) -> None:
    publisher = EventPublisher(redis, stream_maxlen=100)
    await publisher.publish("acme", "one", {"n": 1})
    await publisher.publish("acme", "two", {"n": 2})
    await publisher.publish("globex", "not-mine", {})
    async with make_client(redis_url, quota_file) as client:
        seen: list[str] = []
        stream = client.events("acme", since="0", block_ms=200)

        async def consume() -> None:
            async for event in stream:
                assert event.tenant_id == "acme"
                seen.append(event.event)
                if len(seen) == 3:
                    return

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0.1)
        await publisher.publish("acme", "three", {"n": 3})
        await asyncio.wait_for(consumer, 5)
        assert seen == ["one", "two", "three"]

        # Resuming after an id yields only what came after it.
        events = []
        async for event in client.events("acme", since="0", block_ms=100):
            events.append(event)
            if len(events) == 3:
                break
        resumed = []
        async for event in client.events("acme", since=events[0].id, block_ms=100):
            resumed.append(event.event)
            if len(resumed) == 2:
                break
        assert resumed == ["two", "three"]
        assert events[0].data == {"n": 1}
        assert events[0].ts.endswith("Z")


async def test_events_stream_is_capped(redis: Redis) -> None:
    publisher = EventPublisher(redis, stream_maxlen=10)
    for i in range(500):
        await publisher.publish("acme", "e", {"i": i})
    assert await redis.xlen(keys.event_stream("acme")) < 200


async def test_a_long_lived_client_follows_quota_file_edits(redis: Redis, redis_url: str,
                                                            write_quotas: Callable[..., Path]) -> None:
    path = write_quotas(quotas_with({"acme": {"max_pending": 1}}))
    settings = Settings(redis_url=redis_url, config=str(path))
    async with AgentWorkerClient.from_settings(settings) as client:
        client.config_check_interval = 0.0
        await client.enqueue("echo", tenant_id="acme")
        with pytest.raises(QuotaExceeded):
            await client.enqueue("echo", tenant_id="acme")
        # The operator raises the limit and moves a tenant to another pool: no client restart needed.
        path.write_text(json.dumps(quotas_with({"acme": {"max_pending": 5}, "globex": {"pool": "premium"}})))
        assert (await client.enqueue("echo", tenant_id="acme")).created
        assert client.route("globex").pool == "premium"
        # A broken edit is ignored: the running config stays.
        path.write_text("pools: {standard: {concurrency: 0}}")
        assert not client.refresh_config(force=True)
        assert client.route("globex").pool == "premium"
        assert (await client.enqueue("echo", tenant_id="acme")).created
