"""The per-job Redis work made cheaper for speed writes exactly what it wrote before.

``EventPublisher`` writes events published together in one pipeline: each is still written once, in the
order published, and a bad one fails alone. (The claim and finish scripts are checked key by key in
``tests/test_job_leases.py``.)
"""

from __future__ import annotations

import asyncio
import json

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from agentworker import keys
from agentworker.events import EventPublisher


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


async def test_script_calls_of_one_loop_turn_share_one_round_trip_and_keep_their_own_replies(
        redis: Redis) -> None:
    from agentworker.pools.batching import ScriptBatcher

    script = redis.register_script("if ARGV[1] == 'bad' then return redis.error_reply('bad one') end "
                                   "return redis.call('INCRBY', KEYS[1], ARGV[1])")
    batcher = ScriptBatcher(redis, script)
    assert await batcher(keys=["warm"], args=[1]) == 1  # the first call loads the script
    await redis.config_resetstat()
    replies = await asyncio.gather(*(batcher(keys=[f"n{i % 3}"], args=[i]) for i in range(30)),
                                   batcher(keys=["n0"], args=["bad"]), return_exceptions=True)
    assert isinstance(replies[-1], ResponseError) and "bad one" in str(replies[-1])
    assert replies[:30] == [sum(range(i % 3, i + 1, 3)) for i in range(30)], "each caller gets its own reply"
    stats = await redis.info("commandstats")
    assert stats["cmdstat_evalsha"]["calls"] == 31, "every call ran once"
    assert "cmdstat_script" not in stats, "no SCRIPT EXISTS with each batch"
    assert await batcher(keys=["alone"], args=[5]) == 5


async def test_batched_script_calls_survive_a_redis_that_lost_the_script(redis: Redis) -> None:
    from agentworker.pools.batching import ScriptBatcher

    script = redis.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    batcher = ScriptBatcher(redis, script)
    assert await asyncio.gather(batcher(keys=["a"], args=[1]), batcher(keys=["a"], args=[1])) == [1, 2]
    await redis.script_flush()  # as after a Redis restart
    assert sorted(await asyncio.gather(*(batcher(keys=["a"], args=[1]) for _ in range(3)))) == [3, 4, 5]


async def test_an_event_has_one_id_on_the_channel_and_in_the_stream(redis: Redis) -> None:
    from agentworker.events import read_events

    pubsub = redis.pubsub()
    await pubsub.subscribe(keys.event_channel("acme"))
    await pubsub.get_message(timeout=1)  # the subscription confirmation
    publisher = EventPublisher(redis)
    first = await publisher.publish("acme", "e", {"n": 1})
    second = await publisher.publish("acme", "e", {"n": 2})
    live = []
    while len(live) < 2 and (message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=2)):
        live.append(json.loads(message["data"])["id"])
    await pubsub.aclose()
    stored = []
    async for event in read_events(redis, "acme", since="0", block_ms=100):
        stored.append(event.event_id)
        if len(stored) == 2:
            break
    assert live == stored == [first["id"], second["id"]]
    assert first["id"] != second["id"] and len(first["id"]) == 32
