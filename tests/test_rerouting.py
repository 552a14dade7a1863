"""Moving queued jobs when the quota file changes where tenants route (agentworker/rerouting.py).

In-process against a real Redis: the move script and the reroute functions, the observer that runs them
after a reload, and the worker's misrouting check during the change. The end-to-end tests at the bottom
run the real ``agentworker run``, move a tenant to another pool and reshard a pool with jobs queued, and
check every job runs once, on its new queue, none refused.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.admission import Enqueuer
from agentworker.config import QuotaConfig, parse_config
from agentworker.events import EventPublisher
from agentworker.rerouting import config_of_routing_table, move_tenant, reroute, reroute_strays
from agentworker.routing import route_tenant, routing_table_json, shard_of
from agentworker.settings import Settings
from agentworker.supervisor import observer as observer_module
from agentworker.supervisor.observer import RedisObserver
from agentworker.tasks.context import JobRuntime
from agentworker.tasks.envelope import misrouting_reason
from tests.conftest import make_client, wait_for
from tests.supervisor_helpers import SupervisorProcess, serving_pids, supervisor_factory

TWO_POOLS: dict[str, Any] = {
    "default_pool": "standard",
    "pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 30},
              "premium": {"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 30}},
    "tenants": {"acme": {"pool": "standard"}},
}


def config_of(data: dict[str, Any]) -> QuotaConfig:
    return parse_config(data)


def moved_to_premium(data: dict[str, Any]) -> dict[str, Any]:
    return {**data, "tenants": {**data["tenants"], "acme": {"pool": "premium"}}}


def resharded(data: dict[str, Any], pool: str, shards: int) -> dict[str, Any]:
    return {**data, "pools": {**data["pools"], pool: {**data["pools"][pool], "shards": shards}}}


async def queued(redis: Redis, tenant: str, pool: str, shard: int) -> list[tuple[str, float]]:
    return [(m.decode(), s) for m, s in await redis.zrange(keys.tenant_queue(pool, shard, tenant), 0, -1,
                                                          withscores=True)]


async def state_of(redis: Redis, tenant: str, pool: str, shard: int) -> dict[str, float]:
    """The state sets of (pool, shard) the tenant is in, with its score in each."""
    found = {}
    for name, key in (("ready", keys.ready_tenants(pool, shard)), ("waiting", keys.waiting_tenants(pool, shard)),
                      ("capped", keys.capped_tenants(pool, shard))):
        score = await redis.zscore(key, tenant)
        if score is not None:
            found[name] = score
    return found


async def enqueue_under(redis_url: str, path: Path, tenant: str, count: int, *, defer: float | None = None,
                        task: str = "probe_count") -> list[str]:
    """Enqueue with a client reading ``path``: the routing producers used before the file changed."""
    async with make_client(redis_url, path) as client:
        return [(await client.enqueue(task, tenant_id=tenant, idempotency_key=f"k{i:03d}",
                                      defer=None if defer is None else defer + i)).job_id
                for i in range(count)]


# -- the move ------------------------------------------------------------------------------------------------


async def test_a_moved_tenant_keeps_its_jobs_scores_and_order_and_is_ready_in_its_new_shard(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path]) -> None:
    old_path = write_quotas(TWO_POOLS)
    old, new = config_of(TWO_POOLS), config_of(moved_to_premium(TWO_POOLS))
    before, after = route_tenant(old, "acme"), route_tenant(new, "acme")
    assert before.pool == "standard" and after.pool == "premium"
    ids = await enqueue_under(redis_url, old_path, "acme", 20)
    await redis.zadd(keys.tenant_queue(before.pool, before.shard, "acme"), {"acme:probe_count:late": 9e12})
    expected = await queued(redis, "acme", before.pool, before.shard)
    assert [job_id for job_id, _ in expected] == [*ids, "acme:probe_count:late"]
    assert "ready" in await state_of(redis, "acme", before.pool, before.shard)
    await redis.set(keys.virtual_clock(after.pool, after.shard), 42.5)

    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.wakeup_channel("premium"))
    await pubsub.get_message(timeout=1)  # the subscription's confirmation
    assert await reroute(redis, old, new) == 21

    assert await queued(redis, "acme", after.pool, after.shard) == expected  # same ids, same scores, same order
    assert not await redis.exists(keys.tenant_queue(before.pool, before.shard, "acme"))
    assert await state_of(redis, "acme", before.pool, before.shard) == {}
    # Ready in the new shard, at its virtual clock (no credit, no debt), and the new pool is woken.
    assert await state_of(redis, "acme", after.pool, after.shard) == {"ready": 42.5}
    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)
    assert message is not None and message["data"].decode() == after.queue
    await pubsub.aclose()

    # Once only: a second run moves nothing and changes nothing.
    assert await reroute(redis, old, new) == 0
    assert await move_tenant(redis, "acme", before.pool, before.shard, after) == 0
    assert await queued(redis, "acme", after.pool, after.shard) == expected
    assert await state_of(redis, "acme", after.pool, after.shard) == {"ready": 42.5}


async def test_deferred_jobs_land_in_waiting_and_merge_with_jobs_already_in_the_new_shard(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path]) -> None:
    old_path = write_quotas(TWO_POOLS)
    new_data = moved_to_premium(TWO_POOLS)
    new_path = write_quotas(new_data, name="new.yaml")
    old, new = config_of(TWO_POOLS), config_of(new_data)
    before, after = route_tenant(old, "acme"), route_tenant(new, "acme")
    await enqueue_under(redis_url, old_path, "acme", 3, defer=60)
    # A producer already on the new file enqueued one later job in the new shard.
    async with make_client(redis_url, new_path) as client:
        await client.enqueue("probe_count", tenant_id="acme", idempotency_key="new", defer=600)
    new_first = (await queued(redis, "acme", after.pool, after.shard))[0][1]
    assert await state_of(redis, "acme", after.pool, after.shard) == {"waiting": new_first}
    old_jobs = await queued(redis, "acme", before.pool, before.shard)

    assert await reroute(redis, old, new) == 3

    merged = await queued(redis, "acme", after.pool, after.shard)
    assert merged == sorted([*old_jobs, ("acme:probe_count:new", new_first)], key=lambda item: item[1])
    # Waiting, now until the earliest of them (the moved ones are due first).
    assert await state_of(redis, "acme", after.pool, after.shard) == {"waiting": old_jobs[0][1]}
    assert old_jobs[0][1] > time.time() * 1000 + 50_000
    assert await state_of(redis, "acme", before.pool, before.shard) == {}


async def test_resharding_moves_every_unnamed_tenant_that_changes_shard_and_no_other(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path]) -> None:
    old_path = write_quotas(TWO_POOLS)
    old, new = config_of(TWO_POOLS), config_of(resharded(TWO_POOLS, "standard", 4))
    tenants = [f"t{i:02d}" for i in range(40)]
    for tenant in tenants:
        await enqueue_under(redis_url, old_path, tenant, 2)
    await enqueue_under(redis_url, old_path, "deferred", 2, defer=120)
    movers = [t for t in [*tenants, "deferred"] if shard_of(t, 2) != shard_of(t, 4)]
    assert 5 < len(movers) < 40

    assert await reroute(redis, old, new) == 2 * len(movers)

    for tenant in [*tenants, "deferred"]:
        route = route_tenant(new, tenant)
        assert len(await queued(redis, tenant, route.pool, route.shard)) == 2, tenant
        states = {shard: await state_of(redis, tenant, "standard", shard) for shard in range(4)}
        assert {shard for shard, state in states.items() if state} == {route.shard}, (tenant, states)
        assert list(states[route.shard]) == ["waiting" if tenant == "deferred" else "ready"]
    # Nothing is left where the new file does not route it.
    assert await reroute_strays(redis, new) == 0


async def test_a_removed_pool_and_a_changed_default_pool_move_named_and_unnamed_tenants_and_the_inbox(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path]) -> None:
    old_data = {**TWO_POOLS, "tenants": {"acme": {"pool": "premium"}}}
    old_path = write_quotas(old_data)
    new_data = {"default_pool": "premium", "pools": {"premium": TWO_POOLS["pools"]["premium"]}, "tenants": {}}
    old, new = config_of(old_data), config_of(new_data)
    await enqueue_under(redis_url, old_path, "acme", 3)
    await enqueue_under(redis_url, old_path, "plain", 4)  # unnamed: standard, the old default pool
    # A plain ARQ producer's job, still in the inbox of a shard that no longer exists.
    gone = keys.queue("standard", shard_of("arq", 2))
    await redis.zadd(gone, {"arq:probe_count:raw": 1234})

    assert await reroute(redis, old, new) == 4 + 1  # acme stays (premium kept its shards): plain and the inbox

    for tenant, count in (("acme", 3), ("plain", 4)):
        route = route_tenant(new, tenant)
        assert len(await queued(redis, tenant, route.pool, route.shard)) == count
        assert "ready" in await state_of(redis, tenant, route.pool, route.shard)
    assert await redis.zcard(gone) == 0
    assert await redis.zscore(route_tenant(new, "arq").queue, "arq:probe_count:raw") == 1234
    assert not await redis.keys(f"{keys.PREFIX}:*:standard:*")


async def test_the_stray_sweep_moves_tenants_left_in_old_shards_a_bounded_number_per_pass(
        redis: Redis) -> None:
    old, config = config_of(TWO_POOLS), config_of(moved_to_premium(TWO_POOLS))
    enqueuer = Enqueuer(redis)
    now = int(time.time() * 1000)

    async def put(tenant: str, pool: str, shard: int) -> None:
        await enqueuer.enqueue(job_id=f"{tenant}:probe_count:x", tenant_id=tenant, pool=pool, shard=shard,
                               job_bytes=jobs.encode_job("probe_count", {"tenant_id": tenant}, now),
                               score_ms=now, expires_ms=600_000, max_pending=None, rate=None)

    # acme's job went back to its old shard after the move (it was running then, and crashed); 300
    # unnamed tenants (standard's) are queued in premium's shard 0 by a producer that had them there;
    # "home" is where it belongs.
    await put("acme", "standard", route_tenant(old, "acme").shard)
    strays = [f"s{i:03d}" for i in range(300)]
    for tenant in strays:
        await put(tenant, "premium", 0)
    await put("home", "standard", route_tenant(config, "home").shard)

    cursors: dict[str, int] = {}
    first = await reroute_strays(redis, config, cursors=cursors, limit=20)
    assert 1 < first < 150  # acme and a bounded page of the others: a pass's cost is capped
    moved, passes = first, 1
    while moved < len(strays) + 1 and passes < 100:  # later passes resume where the last one stopped
        moved += await reroute_strays(redis, config, cursors=cursors, limit=20)
        passes += 1
    assert moved == len(strays) + 1
    for tenant in ["acme", *strays, "home"]:
        route = route_tenant(config, tenant)
        assert await queued(redis, tenant, route.pool, route.shard) == [(f"{tenant}:probe_count:x", now)]
        assert await state_of(redis, tenant, route.pool, route.shard) == {"ready": 0.0}
    assert await redis.zcard(keys.ready_tenants("premium", 0)) == sum(
        route_tenant(config, t).queue == keys.queue("premium", 0) for t in ["acme", *strays, "home"])
    assert await reroute_strays(redis, config) == 0


def test_the_published_routing_table_gives_back_the_routing() -> None:
    config = config_of({**TWO_POOLS, "tenants": {"acme": {"pool": "premium"}, "beta": {"max_pending": 3}}})
    again = config_of_routing_table(routing_table_json(config))
    assert again is not None
    for tenant in ("acme", "beta", "gamma", *(f"t{i}" for i in range(50))):
        assert route_tenant(again, tenant) == route_tenant(config, tenant)
    assert config_of_routing_table(None) is None
    assert config_of_routing_table("not json") is None
    assert config_of_routing_table(json.dumps({"default_pool": "x", "pools": {}, "tenants": {}})) is None


# -- the worker's check during a change ----------------------------------------------------------------------


async def test_a_worker_runs_jobs_its_previous_file_routed_here_and_refuses_others(redis: Redis) -> None:
    old, new = config_of(TWO_POOLS), config_of(moved_to_premium(TWO_POOLS))
    old_queue, new_queue = route_tenant(old, "acme").queue, route_tenant(new, "acme").queue
    never = keys.queue("premium", 1 - route_tenant(new, "acme").shard)
    job = "acme:probe_count:k"
    runtime = JobRuntime(pool="standard", slot=0, settings=Settings(), redis=redis, events=EventPublisher(redis),
                         config=old)
    assert misrouting_reason(runtime, job, "probe_count", "acme", old_queue) is None
    assert misrouting_reason(runtime, job, "probe_count", "acme", new_queue) is not None
    runtime.config = new  # SIGHUP: the worker took the new file
    assert misrouting_reason(runtime, job, "probe_count", "acme", new_queue) is None
    assert misrouting_reason(runtime, job, "probe_count", "acme", old_queue) is None  # queued before the move
    reason = misrouting_reason(runtime, job, "probe_count", "acme", never)
    assert reason is not None and f"routes to {new_queue}" in reason
    # A worker that only ever ran the new file refuses what its file never routed there.
    fresh = JobRuntime(pool="standard", slot=1, settings=Settings(), redis=redis, events=EventPublisher(redis),
                       config=new)
    assert misrouting_reason(fresh, job, "probe_count", "acme", old_queue) is not None


# -- the observer (the supervisor's Redis side) --------------------------------------------------------------


async def test_the_observer_moves_jobs_after_a_reload_and_at_start_after_a_change_made_while_down(
        redis: Redis, redis_url: str, write_quotas: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(observer_module, "REROUTE_GRACE_S", 0.3)
    old_path = write_quotas(TWO_POOLS)
    old, new = config_of(TWO_POOLS), config_of(moved_to_premium(TWO_POOLS))
    current: list[tuple[int, QuotaConfig]] = [(1, old)]
    observer = RedisObserver(redis, lambda: current[-1])
    rerouted: list[int] = []
    observer.on_rerouted = rerouted.append
    await observer.observe_once()
    assert observer.ok and rerouted == [1]
    ids = await enqueue_under(redis_url, old_path, "acme", 5)

    current.append((2, new))  # a reload
    await observer.observe_once()
    # The new routing is published at once; the jobs move only once the workers had the grace to reload.
    assert json.loads(await redis.get(keys.ROUTING))["tenants"]["acme"] == "premium"
    assert len(await queued(redis, "acme", "standard", route_tenant(old, "acme").shard)) == 5
    assert rerouted == [1]
    await asyncio.sleep(0.35)
    await observer.observe_once()
    after = route_tenant(new, "acme")
    assert [job_id for job_id, _ in await queued(redis, "acme", after.pool, after.shard)] == ids
    assert rerouted == [1, 2] and observer.jobs_rerouted == 5

    # The file changed back while no supervisor ran: a new one moves the jobs at its first pass, from the
    # routing table the last one published.
    again = RedisObserver(redis, lambda: (1, old))
    await again.observe_once()
    before = route_tenant(old, "acme")
    assert [job_id for job_id, _ in await queued(redis, "acme", before.pool, before.shard)] == ids
    assert again.jobs_rerouted == 5


# -- end to end: the real agentworker run ---------------------------------------------------------------------


@pytest.fixture
def supervisors(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


async def rejections(redis: Redis, tenant: str) -> list[dict[str, Any]]:
    entries = await redis.xrange(keys.event_stream(tenant))
    events = [json.loads(fields[b"event"]) for _id, fields in entries]
    return [e for e in events if e["event"] in ("job_rejected", "job_failed")]


async def runs(redis: Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in (await redis.hgetall("probe:runs")).items()}


@pytest.mark.slow
@pytest.mark.timeout(120)
async def test_moving_a_tenant_to_another_pool_runs_its_100_queued_jobs_once_on_the_new_pool(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str) -> None:
    data = {"default_pool": "standard",
            "pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 1, "job_timeout": 60},
                      "premium": {"shards": 2, "processes": 1, "concurrency": 4, "job_timeout": 60}},
            "tenants": {"acme": {"pool": "standard"}}}
    config = write_quotas(data)
    sup = supervisors(config)
    await sup.wait_ready()
    async with make_client(redis_url, config) as client:
        # The standard pool's only slot is busy with another tenant's long job: acme's jobs stay queued.
        blocker = await client.enqueue("probe_sleep", tenant_id="blocker", payload={"seconds": 15, "group": "b"})
        await wait_for(lambda: _is_running(redis), 20, what="the blocker running")
        ids = [(await client.enqueue("probe_count", tenant_id="acme", idempotency_key=f"j{i:03d}")).job_id
               for i in range(100)]
    old_route = route_tenant(config_of(data), "acme")
    assert await redis.zcard(old_route.tenant_queue) == 100

    new_data = moved_to_premium(data)
    config.write_text(yaml.safe_dump(new_data))  # the supervisor polls the file (FAST_ENV: every 0.5 s)
    new_route = route_tenant(config_of(new_data), "acme")
    async with make_client(redis_url, config) as client:
        results = [await client.job(job_id).result(timeout=30) for job_id in ids]
        assert await client.job(blocker.job_id).status() == "in_progress"  # moved, not waited out
    assert {r["queue"] for r in results} == {new_route.queue}
    assert {job_id: n for job_id, n in (await runs(redis)).items() if job_id in ids} == dict.fromkeys(ids, 1)
    assert await rejections(redis, "acme") == []
    assert not await redis.exists(old_route.tenant_queue)
    assert '"tenant\'s queued jobs moved"' in sup.log()


async def _is_running(redis: Redis) -> bool:
    return int(await redis.get("probe:b:running") or 0) >= 1


@pytest.mark.slow
@pytest.mark.timeout(150)
async def test_resharding_a_pool_from_2_to_4_runs_its_50_queued_jobs_once(
        supervisors: Callable[..., SupervisorProcess], write_quotas: Callable[..., Path], redis: Redis,
        redis_url: str) -> None:
    data = {"default_pool": "standard",
            "pools": {"standard": {"shards": 2, "processes": 1, "concurrency": 1, "job_timeout": 60}}}
    config = write_quotas(data)
    sup = supervisors(config)
    await sup.wait_ready()
    tenants = [f"r{i:02d}" for i in range(25)]
    movers = {t for t in tenants if shard_of(t, 2) != shard_of(t, 4)}
    assert movers
    async with make_client(redis_url, config) as client:
        # 50 jobs of 0.1 s on one slot: about 5 s of work, still mostly queued when the file changes.
        ids = [(await client.enqueue("probe_sleep", tenant_id=tenant, idempotency_key=f"j{n}",
                                     payload={"seconds": 0.1, "group": "r"})).job_id
               for n in range(2) for tenant in tenants]
    config.write_text(yaml.safe_dump(resharded(data, "standard", 4)))
    await sup.wait_status(lambda s: s["supervisor"]["config_version"] >= 2, 20, what="the reload")
    async with make_client(redis_url, config) as client:
        for job_id in ids:
            await client.job(job_id).result(timeout=60)
        infos = {job_id: await client.job(job_id).info() for job_id in ids}
    assert {job_id: n for job_id, n in (await runs(redis)).items() if job_id in ids} == dict.fromkeys(ids, 1)
    for tenant in tenants:
        assert await rejections(redis, tenant) == [], tenant
    # Jobs of moved tenants ran on the new shards 2 and 3, which no producer wrote to: they were moved.
    new_shards = {keys.queue("standard", 2), keys.queue("standard", 3)}
    assert any(info is not None and info.queue in new_shards for info in infos.values())
    status = await sup.wait_status(lambda s: len(serving_pids(s, "standard")) == 1, 30, what="one worker")
    assert status["supervisor"]["config_version"] == 2
