"""The internal job submitter the client, the schedule dispatcher and the tasks share, and who closes Redis:
whoever made the client, never a borrower."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from agentworker import client as client_module
from agentworker import jobs, keys
from agentworker.client import AgentWorkerClient
from agentworker.config import QuotaConfig, load_config, load_config_text
from agentworker.settings import Settings
from agentworker.submit import JobSubmitter, QuotaExceeded
from tests.conftest import BASIC_QUOTAS, wait_for


def quotas(tenants: dict[str, Any]) -> QuotaConfig:
    return load_config_text(yaml.safe_dump({**BASIC_QUOTAS, "tenants": tenants}))


async def connection_ids(redis: Redis) -> set[int]:
    return {int(entry["id"]) for entry in await redis.client_list()}


async def test_the_submitter_routes_checks_and_admits_like_the_client(redis: Redis, quota_file: Path) -> None:
    config = load_config(quota_file)
    submitter = JobSubmitter(redis, config, max_payload_bytes=2048)
    first = await submitter.submit("echo", "acme", {"message": "hi"}, idempotency_key="k1")
    again = await submitter.submit("echo", "acme", {"message": "other"}, idempotency_key="k1")
    assert (first.job_id, first.created, again.created) == ("acme:echo:k1", True, False)
    assert first.route == AgentWorkerClient(redis, config).route("acme")
    assert await redis.zscore(first.route.tenant_queue, first.job_id) is not None
    assert jobs.loads(await redis.get(jobs.job_key(first.job_id)))["k"] == {"message": "hi", "tenant_id": "acme"}

    with pytest.raises(jobs.InvalidJob, match="over the 2048-byte limit"):
        await submitter.submit("echo", "acme", {"message": "x" * 4096})
    with pytest.raises(jobs.InvalidJob, match="does not match tenant"):
        await submitter.submit("echo", "acme", {"tenant_id": "globex"})
    assert await redis.zcard(keys.pending("acme")) == 1, "refused jobs leave nothing behind"


async def test_quota_exceeded_is_one_class_and_the_submitter_follows_a_new_config(redis: Redis) -> None:
    assert client_module.QuotaExceeded is QuotaExceeded
    submitter = JobSubmitter(redis, quotas({"acme": {"max_pending": 1}}))
    await submitter.submit("echo", "acme")
    with pytest.raises(QuotaExceeded, match="max_pending of 1; nothing was enqueued") as refused:
        await submitter.submit("echo", "acme")
    assert refused.value.limit == "max_pending"
    submitter.config = quotas({})
    assert (await submitter.submit("echo", "acme")).created, "the owner's new config applies at once"


async def test_a_client_on_a_borrowed_redis_leaves_it_open(redis: Redis, quota_file: Path) -> None:
    before = await redis.client_id()
    async with AgentWorkerClient(redis, load_config(quota_file)) as borrowing:
        await borrowing.enqueue("echo", "acme")
    assert borrowing.redis is redis
    # Still the same connection: the pool was not disconnected (a new one would have a new id).
    assert await redis.client_id() == before
    assert before in await connection_ids(redis)


async def test_a_client_from_settings_closes_the_redis_it_made(redis: Redis, redis_url: str,
                                                               quota_file: Path) -> None:
    made = AgentWorkerClient.from_settings(Settings(redis_url=redis_url, config=str(quota_file)))
    await made.enqueue("echo", "acme")
    own = await made.redis.client_id()
    await made.close()

    async def gone() -> bool:
        return own not in await connection_ids(redis)

    await wait_for(gone, timeout=5)
