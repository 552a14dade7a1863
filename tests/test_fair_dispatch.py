"""The fair dispatcher inside a shard, in-process against a real Redis: weighted shares, caps passed over
at a cost independent of any backlog, work conservation, deferred jobs, coalesced wake-ups.

Claims are made with the worker's own claim call (``ShardWorker._claim_batch``) without running the jobs,
so each test counts exactly which tenant every claimed slot went to.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

from arq.connections import ArqRedis

from agentworker import jobs, keys
from agentworker.admission import Enqueuer
from agentworker.config import PoolQuota, QuotaConfig
from agentworker.job_leases import publish_limits
from agentworker.pools.arq_internals import ShardWorker
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import Leases

POOL = "standard"


def _worker(redis: ArqRedis, holder: str = "host:1") -> ShardWorker:
    async def report(failure: Any) -> None:
        return None

    return ShardWorker(
        functions=[], queue_name=keys.queue(POOL, 0), pool_name=POOL, shard=0, redis=redis,
        gate=ConcurrencyGate(1000), leases=Leases(redis, holder=holder), pool_quota=lambda: PoolQuota(),
        on_deferred=lambda tenant: None, on_done=lambda job_id: None,
        on_final_failure=report, on_dead_letter=lambda reason, job_id: None, keep_result=60, poll_delay=1,
        job_serializer=jobs.dumps, job_deserializer=jobs.WorkerJobDecoder({"echo"}), ctx={})


async def _fill(redis: ArqRedis, tenant: str, count: int, *, due: int | None = None, start: int = 0) -> None:
    enqueuer = Enqueuer(redis)
    now = int(time.time() * 1000) if due is None else due
    for i in range(start, start + count):
        await enqueuer.enqueue(job_id=f"{tenant}:echo:{i}", tenant_id=tenant, pool=POOL, shard=0,
                               job_bytes=jobs.encode_job("echo", {"tenant_id": tenant, "message": "m"}, now),
                               score_ms=now, expires_ms=600_000, max_pending=None, rate=None)


async def _limits(redis: ArqRedis, tenants: dict[str, dict[str, Any]]) -> None:
    config = QuotaConfig.model_validate({"pools": {POOL: {"shards": 1}}, "tenants": tenants})
    await publish_limits(redis, config, POOL, int(time.time() * 1000))


async def _claims(worker: ShardWorker, total: int, batch: int) -> list[str]:
    """Tenants of the next ``total`` claimed jobs, in claim order."""
    claimed: list[str] = []
    while len(claimed) < total:
        entries = await worker._claim_batch(min(batch, total - len(claimed)))
        runs = [e for e in entries if e[0] == b"run"]
        if not runs:
            break
        claimed += [e[1].decode().split(":")[0] for e in runs]
    return claimed


async def test_weights_1_2_4_share_the_slots_1_2_4(arq_redis: ArqRedis) -> None:
    await _limits(arq_redis, {"w1": {"weight": 1}, "w2": {"weight": 2}, "w4": {"weight": 4}})
    for tenant in ("w1", "w2", "w4"):
        await _fill(arq_redis, tenant, 400)
    claimed = await _claims(_worker(arq_redis), 700, batch=10)
    shares = Counter(claimed)
    for tenant, expected in (("w1", 1 / 7), ("w2", 2 / 7), ("w4", 4 / 7)):
        assert abs(shares[tenant] / 700 - expected) <= 0.1 * expected, shares


def jain(counts: list[int]) -> float:
    return sum(counts) ** 2 / (len(counts) * sum(c * c for c in counts))


async def test_100_equal_tenants_are_served_evenly_in_every_window(arq_redis: ArqRedis) -> None:
    tenants = [f"t{i:03d}" for i in range(100)]
    for tenant in tenants:
        await _fill(arq_redis, tenant, 12)
    claimed = await _claims(_worker(arq_redis), 1000, batch=20)
    assert len(claimed) == 1000
    for window in range(0, 1000, 200):
        counts = Counter(claimed[window:window + 200])
        assert jain([counts[t] for t in tenants]) >= 0.95, (window, counts.most_common(3))


async def test_a_newcomer_is_served_at_once_beside_a_flooding_tenant(arq_redis: ArqRedis) -> None:
    await _fill(arq_redis, "flood", 5000)
    worker = _worker(arq_redis)
    assert set(await _claims(worker, 50, batch=10)) == {"flood"}
    await _fill(arq_redis, "newcomer", 3)
    # The next claims alternate: B does not wait behind A's backlog of ~4,950 jobs.
    assert Counter(await _claims(worker, 6, batch=6))["newcomer"] == 3


async def _commands(redis: ArqRedis) -> int:
    stats = await redis.info("commandstats")
    return sum(int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_") and k != "cmdstat_info")


async def _capped_claim_cost(redis: ArqRedis, backlog: int) -> tuple[int, list[str]]:
    await redis.flushdb()
    await _limits(redis, {"capped": {"max_concurrency": 2}})
    await _fill(redis, "capped", 2)
    worker = _worker(redis)
    assert await _claims(worker, 2, batch=2) == ["capped", "capped"]  # it holds its cap now
    # Its backlog, written straight into its queue (records are not needed: it is never served).
    tq = keys.tenant_queue(POOL, 0, "capped")
    for start in range(0, backlog, 10_000):
        await redis.zadd(tq, {f"capped:echo:b{i}": 1 for i in range(start, min(backlog, start + 10_000))})
    await _fill(redis, "other", 5)
    await worker._claim_batch(1)  # passes over the capped tenant once (parks it), serves `other`
    await redis.config_resetstat()
    claimed = await _claims(worker, 3, batch=1)
    return await _commands(redis), claimed


async def test_a_claim_costs_the_same_whatever_a_capped_tenants_backlog(arq_redis: ArqRedis) -> None:
    small, claimed_small = await _capped_claim_cost(arq_redis, 1_000)
    large, claimed_large = await _capped_claim_cost(arq_redis, 100_000)
    assert claimed_small == claimed_large == ["other"] * 3, "work-conserving: the free slots go to others"
    assert small == large, f"Redis commands for three claims: {small} with 1,000 queued, {large} with 100,000"


async def test_a_capped_tenant_is_served_again_when_one_of_its_jobs_finishes(arq_redis: ArqRedis) -> None:
    await _limits(arq_redis, {"capped": {"max_concurrency": 1}})
    await _fill(arq_redis, "capped", 3)
    worker = _worker(arq_redis)
    first = await worker._claim_batch(3)
    assert [e[1] for e in first if e[0] == b"run"] == [b"capped:echo:0"]
    assert [e[1] for e in first if e[0] == b"capped"] == [b"capped"]
    assert await arq_redis.zscore(keys.capped_tenants(POOL, 0), "capped") is not None
    await worker._finish_job("capped:echo:0", "done", b"{}", None, None)
    assert await arq_redis.zscore(keys.ready_tenants(POOL, 0), "capped") is not None, "back among the ready"
    assert [e[1] for e in await worker._claim_batch(3) if e[0] == b"run"] == [b"capped:echo:1"]


async def test_deferred_jobs_wait_for_their_time_without_blocking_others(arq_redis: ArqRedis) -> None:
    later = int(time.time() * 1000) + 1500
    await _fill(arq_redis, "later", 2, due=later)
    await _fill(arq_redis, "now", 2)
    worker = _worker(arq_redis)
    assert await _claims(worker, 4, batch=4) == ["now", "now"]
    assert await arq_redis.zscore(keys.waiting_tenants(POOL, 0), "later") == later
    await asyncio.sleep(max(0.0, later / 1000 - time.time()) + 0.05)
    assert await _claims(worker, 4, batch=4) == ["later", "later"]


async def test_a_tenant_enqueuing_a_burst_wakes_the_workers_once(arq_redis: ArqRedis) -> None:
    pubsub = arq_redis.pubsub()
    await pubsub.subscribe(keys.wakeup_channel(POOL))
    await pubsub.get_message(timeout=1)  # the subscription confirmation
    await _fill(arq_redis, "burst", 200)
    wakeups = []
    while (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.3)) is not None:
        wakeups.append(message["data"])
    await pubsub.aclose()
    assert wakeups == [keys.queue(POOL, 0).encode()], "one wake-up: the tenant became ready once"


async def test_jobs_a_plain_arq_producer_puts_in_the_shard_are_adopted_and_counted(arq_redis: ArqRedis) -> None:
    await _limits(arq_redis, {"acme": {"max_pending": 1}})
    now = int(time.time() * 1000)
    for key in ("a", "b"):
        await arq_redis.set(jobs.job_key(f"acme:echo:{key}"), jobs.encode_job("echo", {"tenant_id": "acme"}, now))
        await arq_redis.zadd(keys.queue(POOL, 0), {f"acme:echo:{key}": now})
    entries = await _worker(arq_redis)._claim_batch(5)
    verdicts = {e[1].decode(): e[0].decode() for e in entries}
    assert verdicts == {"acme:echo:a": "run", "acme:echo:b": "refused"}, verdicts
    assert await arq_redis.zcard(keys.queue(POOL, 0)) == 0


async def test_the_newest_quota_files_limits_win_mid_rollout(arq_redis: ArqRedis) -> None:
    new = QuotaConfig.model_validate({"pools": {POOL: {}}, "tenants": {"acme": {"max_concurrency": 5}}})
    old = QuotaConfig.model_validate({"pools": {POOL: {}}, "tenants": {"acme": {"max_concurrency": 1}}})
    assert await publish_limits(arq_redis, new, POOL, 2_000)
    assert not await publish_limits(arq_redis, old, POOL, 1_000), "an older file does not overwrite a newer one"
    assert await arq_redis.hget(keys.tenant_limits(POOL), "acme") == b"5 1 -1"
    assert await publish_limits(arq_redis, new, POOL, 1_000), "the same limits again: nothing to fight over"
    newer = QuotaConfig.model_validate({"pools": {POOL: {}}, "tenant_defaults": {"weight": 3}})
    assert await publish_limits(arq_redis, newer, POOL, 3_000)
    assert await arq_redis.hgetall(keys.tenant_limits(POOL)) == {
        b"*": b"0 3 -1", b"_version": b"3000", b"_digest": (await arq_redis.hget(keys.tenant_limits(POOL),
                                                                                  "_digest"))}
