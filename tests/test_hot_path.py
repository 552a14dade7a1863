"""The per-job Redis work made cheaper for speed (issue 6) writes exactly what it wrote before.

* ``ShardWorker.finish_job`` runs ARQ's MULTI/EXEC as one script: for every kind of call ARQ makes, both
  leave the same keys, values and expiries behind;
* ``EventPublisher`` writes events published together in one pipeline: each is still written once, in
  the order published, and a bad one fails alone.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from arq.connections import ArqRedis
from arq.worker import Worker
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from agentworker import keys
from agentworker.events import EventPublisher
from agentworker.pools.arq_internals import ShardWorker
from agentworker.pools.gate import ConcurrencyGate
from agentworker.pools.leases import TenantLeases


async def _noop(ctx: dict[str, Any]) -> None:
    return None


def _worker(redis: ArqRedis, queue: str) -> ShardWorker:
    from arq.worker import func

    return ShardWorker(
        functions=[func(_noop, name="noop")], queue_name=queue, shard=0, redis=redis, gate=ConcurrencyGate(2),
        leases=TenantLeases(redis), tenant_cap=lambda tenant: None, on_deferred=lambda tenant: None,
        on_done=lambda job_id: None, max_jobs=2, job_timeout=10, max_tries=3, keep_result=60, poll_delay=1,
        job_serializer=lambda v: b"", job_deserializer=lambda b: {}, ctx={})


async def _seed(redis: Redis, job_id: str, queue: str) -> None:
    await redis.set(f"arq:in-progress:{job_id}", b"1", px=60_000)
    await redis.set(f"arq:retry:{job_id}", b"1", ex=88_400)
    await redis.set(f"arq:job:{job_id}", b"job-bytes", px=600_000)
    await redis.zadd(queue, {job_id: 1000})
    await redis.zadd("arq:abort", {job_id: 1})


async def _state(redis: Redis, job_id: str, queue: str) -> dict[str, Any]:
    """What is left of one job: each key's value and whether (and roughly how long) it expires."""
    state: dict[str, Any] = {}
    for name in ("in-progress", "retry", "job", "result"):
        key = f"arq:{name}:{job_id}"
        ttl = await redis.pttl(key)
        state[name] = (await redis.get(key), "none" if ttl == -1 else "gone" if ttl == -2 else round(ttl, -4))
    state["queue"] = await redis.zscore(queue, job_id)
    state["abort"] = await redis.zscore("arq:abort", job_id)
    return state


FINISH_CALLS = [
    # finish, result_data, result_timeout_s, keep_result_forever, incr_score, keep_in_progress
    pytest.param(True, b'{"r": 1}', 3600.0, False, None, None, id="success-with-expiry"),
    pytest.param(True, b'{"r": 1}', 3600.0, True, None, None, id="kept-forever"),
    pytest.param(True, None, 0.0, False, None, None, id="finished-without-result"),
    pytest.param(False, None, None, False, 5000, None, id="retry-later"),
    pytest.param(False, None, None, False, None, None, id="requeue-now"),
    pytest.param(True, b'{"r": 2}', 60.0, False, None, 30.0, id="keep-in-progress"),
]


@pytest.mark.parametrize(("finish", "data", "timeout", "forever", "incr", "keep"), FINISH_CALLS)
async def test_finish_job_script_leaves_what_arqs_transaction_leaves(
        redis_url: str, finish: bool, data: bytes | None, timeout: float | None, forever: bool, incr: int | None,
        keep: float | None) -> None:
    redis = ArqRedis.from_url(redis_url)
    try:
        ours, theirs = _worker(redis, "q:ours"), _worker(redis, "q:theirs")
        await _seed(redis, "ours", "q:ours")
        await _seed(redis, "theirs", "q:theirs")
        await ours.finish_job("ours", finish, data, timeout, forever, incr, keep)
        await Worker.finish_job(theirs, "theirs", finish, data, timeout, forever, incr, keep)
        assert await _state(redis, "ours", "q:ours") == await _state(redis, "theirs", "q:theirs")
    finally:
        await redis.aclose()


async def test_events_published_together_are_each_written_once_in_order(redis: Redis) -> None:
    publisher = EventPublisher(redis, stream_maxlen=1000)
    records = await asyncio.gather(*(publisher.publish("acme", "e", {"i": i}) for i in range(200)))
    assert [r["data"]["i"] for r in records] == list(range(200))
    entries = await redis.xrange(keys.event_stream("acme"))
    assert [int(e[1][b"event"].split(b'"i":')[1].rstrip(b"}")) for e in entries] == list(range(200))


async def test_a_bad_event_fails_alone_and_later_ones_go_through(redis: Redis) -> None:
    await redis.set(keys.event_stream("broken"), "not a stream")  # XADD on it is an error
    publisher = EventPublisher(redis)
    results = await asyncio.gather(publisher.publish("acme", "before", {}), publisher.publish("broken", "x", {}),
                                   publisher.publish("acme", "after", {}), return_exceptions=True)
    assert isinstance(results[1], ResponseError)
    assert [r["event"] for r in (results[0], results[2]) if isinstance(r, dict)] == ["before", "after"]
    assert await redis.xlen(keys.event_stream("acme")) == 2
    await publisher.publish("acme", "later", {})
    assert await redis.xlen(keys.event_stream("acme")) == 3


async def test_a_redis_outage_fails_every_waiting_event_and_the_next_write_retries(redis: Redis) -> None:
    dead = Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)  # nothing listens on port 1
    publisher = EventPublisher(dead)
    try:
        results = await asyncio.gather(*(publisher.publish("acme", "e", {}) for _ in range(3)),
                                       return_exceptions=True)
        assert all(isinstance(r, RedisConnectionError) for r in results)
        publisher.redis = redis
        await publisher.publish("acme", "back", {})
        assert await redis.xlen(keys.event_stream("acme")) == 1
    finally:
        await dead.aclose()
