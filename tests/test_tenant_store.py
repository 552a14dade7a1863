"""The tenant store (agentworker.tenants): plans, stored overrides, audit, the Redis copy, moves.

Real Redis and PostgreSQL; the end-to-end checks with real supervisors are in test_tenant_store_e2e.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.client import AgentWorkerClient
from agentworker.config import ConfigError, PoolQuota, StoredTenant, parse_config
from agentworker.db import Database
from agentworker.job_leases import publish_limits
from agentworker.pools.arq_internals import ShardWorker
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import Leases
from agentworker.rerouting import reroute_strays
from agentworker.submit import JobSubmitter, QuotaExceeded
from agentworker.tenants import InvalidTenantChange, TenantDirectory, TenantStore, sync_once
from tests.conftest import make_client, new_tenant, wait_for

QUOTAS: dict[str, Any] = {
    "default_pool": "standard",
    "pools": {"standard": {"shards": 2, "job_timeout": 300}, "premium": {"shards": 2, "job_timeout": 900}},
    "plans": {
        "free": {"max_concurrency": 2, "rate_limit": "5/s", "max_pending": 50},
        "pro": {"pool": "premium", "max_concurrency": 8, "weight": 2, "job_timeout": 600},
    },
    "tenant_defaults": {"plan": "free", "max_pending": 100},
    "tenants": {"acme": {"plan": "pro", "max_pending": 5}},
}


def _worker(redis: Any, pool: str, shard: int) -> ShardWorker:
    async def report(failure: Any) -> None:
        return None

    return ShardWorker(
        functions=[], queue_name=keys.queue(pool, shard), pool_name=pool, shard=shard, redis=redis,
        gate=ConcurrencyGate(1000), leases=Leases(redis, holder="host:1"), pool_quota=lambda: PoolQuota(),
        on_deferred=lambda tenant: None, on_done=lambda job_id: None,
        on_final_failure=report, on_dead_letter=lambda reason, job_id: None, keep_result=60, poll_delay=1,
        job_serializer=jobs.dumps, job_deserializer=jobs.WorkerJobDecoder({"echo"}), ctx={})


@pytest.fixture
async def client(redis_url: str, write_quotas: Callable[..., Path],
                 database: Database) -> AsyncIterator[AgentWorkerClient]:
    path = write_quotas(QUOTAS)
    async with make_client(redis_url, path) as made:
        made._database = database  # the test's own pool (left open by the client)
        yield made


def test_plans_are_validated_with_the_rest_of_the_file_all_problems_at_once() -> None:
    with pytest.raises(ConfigError) as refused:
        parse_config({
            "pools": {"standard": {"job_timeout": 60}},
            "plans": {"Bad Name": {}, "big": {"pool": "nowhere"}, "slow": {"job_timeout": 120},
                      "odd": {"max_concurrency": 0, "colour": "red"}},
            "tenant_defaults": {"plan": "missing"},
            "tenants": {"acme": {"plan": "gold"}},
        })
    errors = refused.value.errors
    assert "tenant_defaults.plan: names plan 'missing', which is not defined" in errors
    assert "plans.big.pool: names pool 'nowhere', which is not defined" in errors
    assert "plans.slow.job_timeout: 120s is above pool 'standard''s job_timeout 60s" in errors
    assert "plans.odd.max_concurrency: must be >= 1 (got 0)" in errors
    assert "plans.odd.colour: unknown key" in errors
    assert "tenants.acme.plan: names plan 'gold', which is not defined" in errors
    assert any(e.startswith("plans.Bad Name: plan name must match") for e in errors)


def test_precedence_is_override_then_plan_then_file_entry_then_tenant_defaults() -> None:
    config = parse_config(QUOTAS)
    unnamed = config.resolve("somebody")
    assert (unnamed.pool, unnamed.limits.max_concurrency, unnamed.limits.max_pending) == ("standard", 2, 100)
    assert unnamed.sources["max_concurrency"] == "plan free (tenant_defaults)"
    assert unnamed.sources["max_pending"] == "tenant_defaults"
    named = config.resolve("acme")  # its own plan over the defaults, its own keys over its plan
    assert (named.pool, named.limits.max_concurrency, named.limits.max_pending) == ("premium", 8, 5)
    assert named.sources["pool"] == "plan pro (file)" and named.sources["max_pending"] == "file"
    stored = config.resolve("acme", StoredTenant("acme", "free", {"max_concurrency": 6}))
    assert (stored.pool, stored.limits.max_concurrency, stored.limits.max_pending) == ("premium", 6, 50)
    assert stored.sources["max_concurrency"] == "override"
    assert stored.sources["max_pending"] == "plan free"
    assert stored.sources["pool"] == "plan pro (file)"  # free names no pool: the file's plan still routes
    assert config.job_timeout_for("acme") == 600
    assert config.job_timeout_for("somebody") == 300


async def test_set_get_list_and_every_change_audited(client: AgentWorkerClient, redis: Redis) -> None:
    tenant = new_tenant("store")
    view = await client.get_tenant(tenant)
    assert not view.stored and view.version == 0 and view.limits["max_concurrency"] == 2

    view = await client.set_tenant(tenant, plan="pro", overrides={"max_concurrency": 6}, by="billing:upgrade")
    assert view.stored and view.version == 1 and view.plan == "pro" and view.pool == "premium"
    assert view.limits["max_concurrency"] == 6 and view.sources["max_concurrency"] == "override"
    assert view.limits["weight"] == 2 and view.sources["weight"] == "plan pro"
    assert view.limits["job_timeout"] == 600
    assert view.updated_by == "billing:upgrade"

    same = await client.set_tenant(tenant, plan="pro", by="billing:retry")  # no change: nothing recorded
    assert same.version == 1
    await client.set_tenant(tenant, overrides={"rate_limit": "20/s"}, by="ops")
    assert await client.unset_tenant(tenant, "max_concurrency", by="ops")
    view = await client.get_tenant(tenant)
    assert view.overrides == {"rate_limit": "20/s"} and view.limits["max_concurrency"] == 8

    history = await client.tenant_history(tenant)
    assert [(c.version, c.changed_by) for c in history] == [(3, "ops"), (2, "ops"), (1, "billing:upgrade")]
    assert history[-1].old is None
    assert history[-1].new == {"plan": "pro", "overrides": {"max_concurrency": 6}}
    assert history[0].old == {"plan": "pro", "overrides": {"max_concurrency": 6, "rate_limit": "20/s"}}
    assert history[0].new == {"plan": "pro", "overrides": {"rate_limit": "20/s"}}

    assert await client.unset_tenant(tenant, by="ops")  # the whole entry
    assert not (await client.get_tenant(tenant)).stored
    assert not await client.unset_tenant(tenant, by="ops")
    assert (await client.tenant_history(tenant))[0].new is None

    listed = [v.tenant_id for v in await client.list_tenants(limit=5000)]
    assert tenant not in listed
    other = new_tenant("store")
    await client.set_tenant(other, plan="free", by="ops")
    page = await client.list_tenants(after=other[:-1], limit=1)
    assert [v.tenant_id for v in page] == [other]


async def test_a_bad_change_is_refused_with_each_keys_path_and_nothing_changes(
        client: AgentWorkerClient, redis: Redis) -> None:
    tenant = new_tenant("bad")
    await client.set_tenant(tenant, overrides={"max_concurrency": 3}, by="ops")
    with pytest.raises(InvalidTenantChange) as refused:
        await client.set_tenant(tenant, plan="gold", overrides={"max_concurrency": 0, "rate_limit": "lots",
                                                               "colour": "red"}, by="ops")
    assert refused.value.errors == [
        "plan: names plan 'gold', which is not defined (plans: free, pro)",
        "overrides.max_concurrency: must be >= 1 (got 0)",
        "overrides.rate_limit: must look like 50/s, 600/m or 1000/h",
        "overrides.colour: unknown key",
    ]
    with pytest.raises(InvalidTenantChange) as refused:
        await client.set_tenant(tenant, overrides={"job_timeout": 1000}, by="ops")
    assert refused.value.errors == ["overrides.job_timeout: 1000s is above pool 'standard''s job_timeout 300s"]
    with pytest.raises(InvalidTenantChange, match="by: must say who makes the change"):
        await client.set_tenant(tenant, overrides={"max_concurrency": 4}, by="")
    with pytest.raises(InvalidTenantChange, match=r"unset\.colour: unknown key"):
        await client.set_tenant(tenant, unset=["colour"], by="ops")
    view = await client.get_tenant(tenant)
    assert view.version == 1 and view.overrides == {"max_concurrency": 3}
    assert len(await client.tenant_history(tenant)) == 1
    record = await redis.hgetall(keys.tenant_record(tenant))
    assert record[b"v"] == b"1" and record[b"claim"] == b"3 - -"


async def test_a_change_reaches_the_claim_script_and_admission_at_once(
        client: AgentWorkerClient, redis: Redis, arq_redis: Any) -> None:
    tenant = new_tenant("claim")
    await client.set_tenant(tenant, overrides={"rate_limit": "1000/s"}, by="ops")  # the free plan's is 5/s
    route = client.route(tenant)
    await publish_limits(redis, client.config, route.pool, 1)
    for i in range(6):
        await client.enqueue("echo", tenant, {"message": "m"}, idempotency_key=str(i))
    worker = _worker(arq_redis, route.pool, route.shard)

    async def started(n: int) -> int:
        return sum(1 for e in await worker._claim_batch(n) if e[0] == b"run")

    assert await started(10) == 2  # the default plan's max_concurrency
    await client.set_tenant(tenant, overrides={"max_concurrency": 5}, by="ops")
    assert (await client.get_tenant(tenant)).sources["rate_limit"] == "override"
    # a capped tenant is looked at again at its next finish or within a second; make it due now
    await redis.zadd(keys.capped_tenants(route.pool, route.shard), {tenant: 0})
    assert await started(10) == 3

    # admission: the client's own cache was dropped by its change (another client's lives 0.5 s at most)
    await client.set_tenant(tenant, overrides={"max_pending": 1}, by="ops")  # one of the six is still queued
    with pytest.raises(QuotaExceeded, match="at its max_pending of 1"):
        await client.enqueue("echo", tenant, {"message": "m"}, idempotency_key="over")


async def test_redis_losing_the_records_is_repaired_from_the_store(
        client: AgentWorkerClient, redis: Redis, database: Database) -> None:
    tenant = new_tenant("lost")
    await client.set_tenant(tenant, plan="pro", overrides={"max_concurrency": 4}, by="ops")
    await sync_once(database, redis, client.config)
    assert await redis.get(keys.tenants_synced()) is not None
    await redis.delete(keys.tenant_record(tenant), keys.tenants_synced())  # what a Redis restart loses
    directory = TenantDirectory(redis)
    assert await directory.get(tenant) is None
    copied = await sync_once(database, redis, client.config)
    assert copied >= 1
    stored = await directory.get(tenant, fresh=True)
    assert stored is not None and stored.plan == "pro" and dict(stored.overrides) == {"max_concurrency": 4}
    # a stale copy never overwrites a newer record
    await client.set_tenant(tenant, overrides={"max_concurrency": 7}, by="ops")
    await redis.delete(keys.tenants_synced())
    await sync_once(database, redis, client.config)
    assert (await redis.hget(keys.tenant_record(tenant), "claim")) == b"7 - -"


async def test_a_change_saved_while_redis_is_unreachable_is_copied_by_the_sync(
        client: AgentWorkerClient, redis: Redis, database: Database) -> None:
    tenant = new_tenant("offline")
    unreachable = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    try:
        store = TenantStore(database, unreachable, lambda: client.config)
        view = await store.set(tenant, overrides={"max_concurrency": 9}, by="ops")
    finally:
        await unreachable.aclose()
    assert view.version == 1
    assert not await redis.exists(keys.tenant_record(tenant))
    await sync_once(database, redis, client.config)
    assert (await redis.hget(keys.tenant_record(tenant), "claim")) == b"9 - -"


async def test_a_plan_that_moves_the_tenant_to_another_pool_moves_its_queued_jobs(
        client: AgentWorkerClient, redis: Redis) -> None:
    tenant = new_tenant("mover")
    await client.set_tenant(tenant, overrides={"rate_limit": "1000/s", "max_pending": 1000}, by="ops")
    before = client.route(tenant)
    assert before.pool == "standard"
    for i in range(100):
        await client.enqueue("probe_sleep", tenant, {"seconds": 0}, idempotency_key=str(i), defer=i)
    assert await redis.zcard(before.tenant_queue) == 100
    view = await client.set_tenant(tenant, plan="pro", by="billing")
    after = client.route(tenant)
    assert view.pool == after.pool == "premium"
    assert await redis.zcard(before.tenant_queue) == 0
    assert await redis.zcard(after.tenant_queue) == 100
    record = await redis.hgetall(keys.tenant_record(tenant))
    assert record[b"pool"] == b"premium" and b'"previous_queue":"standard:' in record[b"entry"]
    job = await client.enqueue("probe_sleep", tenant, {"seconds": 0}, idempotency_key="after")
    assert job.route.pool == "premium"


async def test_a_listening_directory_drops_an_entry_when_its_change_is_announced(
        client: AgentWorkerClient, redis: Redis) -> None:
    tenant = new_tenant("listen")
    directory = TenantDirectory(redis, ttl=3600)  # only the announcement can refresh it
    listening = asyncio.create_task(directory.listen_forever())
    try:
        await wait_for(lambda: directory._listening, 5, what="the directory to subscribe")
        assert await directory.get(tenant) is None
        await client.set_tenant(tenant, overrides={"weight": 3}, by="ops")

        async def refreshed() -> bool:
            stored = await directory.get(tenant)
            return stored is not None and stored.overrides.get("weight") == 3

        await wait_for(refreshed, 5, what="the change to reach the directory")
    finally:
        listening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await listening


async def test_the_directory_is_bounded(redis: Redis) -> None:
    directory = TenantDirectory(redis, capacity=50)
    await directory.get_many([f"many-{i}" for i in range(500)])
    assert len(directory) == 50


async def test_the_stray_sweep_routes_through_the_store_and_moves_a_stale_producers_jobs(
        client: AgentWorkerClient, redis: Redis) -> None:
    tenant = new_tenant("stray")
    await client.set_tenant(tenant, overrides={"rate_limit": "1000/s"}, by="ops")
    stale = JobSubmitter(redis, client.config, tenants=TenantDirectory(redis, ttl=3600))
    assert (await stale.tenants.get(tenant)) is not None  # cached before the move: it keeps the old route
    before = client.route(tenant)
    await client.set_tenant(tenant, plan="pro", by="billing")
    after = client.route(tenant)
    assert (before.pool, after.pool) == ("standard", "premium")
    submitted = await stale.submit("probe_sleep", tenant, {"seconds": 0}, idempotency_key="late", defer=60)
    assert submitted.route.queue == before.queue
    assert await redis.zcard(before.tenant_queue) == 1

    config = client.config
    moved = await reroute_strays(redis, config, directory=TenantDirectory(redis))
    assert moved == 1
    assert await redis.zcard(before.tenant_queue) == 0 and await redis.zcard(after.tenant_queue) == 1
    # and the sweep leaves a stored tenant where the store routes it (without the store it would move it back)
    assert await reroute_strays(redis, config, directory=TenantDirectory(redis)) == 0
    assert await redis.zcard(after.tenant_queue) == 1
