"""Promised events, in process: once per id in the stream, published only after the commit, kept in
PostgreSQL while Redis is down, relayed when their process is gone (agentworker.event_outbox)."""

from __future__ import annotations

import json

import pytest
from redis.asyncio import Redis

from agentworker import keys
from agentworker.db import Database, open_database
from agentworker.db import event_outbox as rows
from agentworker.event_outbox import EventOutbox, relay_stale
from agentworker.events import EventPublisher, stable_event_id
from tests.conftest import RedisServer, new_tenant, wait_for


async def stream_ids(redis: Redis, tenant_id: str) -> list[str]:
    """The event ids (the JSON's ``id``) in the tenant's stream, oldest first."""
    entries = await redis.xrange(keys.event_stream(tenant_id))
    return [json.loads(fields[b"event"])["id"] for _entry_id, fields in entries]


async def pending(database: Database, tenant_id: str) -> list[str]:
    async with database.tenant(tenant_id) as tx:
        return [event_id for event_id, _body in await rows.pending(tx)]


@pytest.fixture
def publisher(redis: Redis) -> EventPublisher:
    return EventPublisher(redis, stream_maxlen=100)


async def test_an_event_published_twice_with_one_id_is_in_the_stream_once(
        redis: Redis, publisher: EventPublisher) -> None:
    tenant = new_tenant("once")
    event_id = stable_event_id(tenant, "workflow", "run-1", "workflow_step_completed", "a", 1)
    assert event_id == stable_event_id(tenant, "workflow", "run-1", "workflow_step_completed", "a", 1)
    assert event_id != stable_event_id(tenant, "workflow", "run-1", "workflow_step_completed", "a", 2)
    _record, body = publisher.prepare(tenant, "workflow_step_completed", {"step_id": "a"}, event_id)
    messages = redis.pubsub()
    await messages.subscribe(keys.event_channel(tenant))
    await messages.get_message(timeout=1)  # the subscription's confirmation

    assert await publisher.publish_once_nowait(tenant, event_id, body) is True
    assert await publisher.publish_once_nowait(tenant, event_id, body) is False
    other = publisher.publish_nowait(tenant, "job_started", {"job_id": "j"})[1]  # a plain event between
    assert await other is True
    assert await publisher.publish_once_nowait(tenant, event_id, body) is False

    ids = await stream_ids(redis, tenant)
    assert ids.count(event_id) == 1 and len(ids) == 2
    live = [await messages.get_message(timeout=1) for _ in range(3)]
    bodies = [json.loads(m["data"])["id"] for m in live if m is not None]
    assert bodies.count(event_id) == 1, "the channel also gets it once"
    await messages.aclose()


async def test_remembered_ids_are_bounded_and_a_lost_script_is_loaded_again(redis: Redis) -> None:
    tenant = new_tenant("bounded")
    publisher = EventPublisher(redis, stream_maxlen=10)
    publisher.remembered_ids = 5
    for n in range(12):
        _record, body = publisher.prepare(tenant, "e", {"n": n}, f"id-{n}")
        assert await publisher.publish_once_nowait(tenant, f"id-{n}", body)
    assert await redis.zcard(keys.published_event_ids(tenant)) == 5
    # The newest ids are the ones remembered: a repeat of one of them is still dropped.
    assert await publisher.publish_once_nowait(tenant, "id-11", "{}") is False

    await redis.script_flush()  # what a Redis restart does to loaded scripts
    _record, body = publisher.prepare(tenant, "e", {"n": 12}, "id-12")
    assert await publisher.publish_once_nowait(tenant, "id-12", body) is True
    assert (await stream_ids(redis, tenant))[-1] == "id-12"


async def test_a_promise_is_published_after_the_commit_and_never_after_a_rollback(
        redis: Redis, publisher: EventPublisher, database: Database) -> None:
    tenant = new_tenant("commit")
    outbox = EventOutbox(publisher, lambda: _same(database))

    async def failing_step() -> None:
        async with database.tenant(tenant) as tx:
            await outbox.promise(tx, "workflow_step_completed", {"n": 0}, "rolled-back")
            raise RuntimeError("step failed")

    with pytest.raises(RuntimeError, match="step failed"):
        await failing_step()
    async with database.tenant(tenant) as tx:
        await outbox.promise(tx, "workflow_step_completed", {"n": 1}, "committed")
        assert await stream_ids(redis, tenant) == [], "nothing is published before the commit"

    await wait_for(lambda: _has(redis, tenant, ["committed"]), 5, what="the committed event in the stream")
    await wait_for(lambda: _none_pending(database, tenant), 5, what="its outbox row to be deleted")
    assert await stream_ids(redis, tenant) == ["committed"]
    await outbox.aclose()


async def test_events_promised_while_redis_is_down_wait_in_postgresql_and_go_out_in_order_once_it_returns(
        database: Database) -> None:
    server = RedisServer()
    server.start()
    redis = Redis.from_url(server.url, socket_connect_timeout=1, socket_timeout=2)
    try:
        publisher = EventPublisher(redis, stream_maxlen=100)
        outbox = EventOutbox(publisher, lambda: _same(database))
        tenant = new_tenant("down")
        server.stop()
        for n in range(3):
            async with database.tenant(tenant) as tx:
                await outbox.promise(tx, "workflow_step_completed", {"n": n}, f"down-{n}")
        await wait_for(lambda: outbox.waiting == 3, 10, what="the three events to wait for Redis")
        assert await pending(database, tenant) == ["down-0", "down-1", "down-2"]

        server.start()
        await wait_for(lambda: _has(redis, tenant, ["down-0", "down-1", "down-2"]), 20,
                       what="the waiting events in the stream")
        await wait_for(lambda: _none_pending(database, tenant), 5, what="their rows to be deleted")
        assert await stream_ids(redis, tenant) == ["down-0", "down-1", "down-2"], "once each, in order"
        assert outbox.waiting == 0
        await outbox.aclose()
    finally:
        await redis.aclose()
        server.cleanup()


async def test_the_relay_publishes_what_a_dead_process_left_and_drops_what_it_had_published(
        redis: Redis, publisher: EventPublisher, database: Database) -> None:
    tenant = new_tenant("relay")
    bodies: dict[str, str] = {}
    async with database.tenant(tenant) as tx:
        for event_id in ("never-published", "published-not-deleted"):
            _record, bodies[event_id] = publisher.prepare(tenant, "workflow_notification", {"id": event_id},
                                                          event_id)
            await rows.record(tx, event_id, bodies[event_id])
    # The process published the second one and died before deleting its row.
    assert await publisher.publish_once_nowait(tenant, "published-not-deleted", bodies["published-not-deleted"])

    relayed = await relay_stale(database, publisher, older_than_s=0)
    assert relayed >= 1  # other tests' stale rows may be relayed too; ours is the one that counts here
    assert sorted(await stream_ids(redis, tenant)) == ["never-published", "published-not-deleted"]
    assert await pending(database, tenant) == []
    record = json.loads((await redis.xrange(keys.event_stream(tenant)))[-1][1][b"event"])
    assert record == json.loads(bodies["never-published"]), "the relayed event is the one recorded (id, ts)"

    async with database.tenant(tenant) as tx:  # a young row is left to the process that promised it
        await rows.record(tx, "young", "{}")
    await relay_stale(database, publisher, older_than_s=3600)
    assert await pending(database, tenant) == ["young"]


async def test_an_outbox_row_is_visible_to_its_tenant_only(database: Database, database_url: str) -> None:
    tenant, other = new_tenant("mine"), new_tenant("theirs")
    async with database.tenant(tenant) as tx:
        assert await rows.record(tx, "mine-1", "{}") is True
        assert await rows.record(tx, "mine-1", "{}") is False, "an earlier try's row is kept"
    async with database.tenant(other) as tx:
        assert await rows.pending(tx) == []
        assert await rows.forget(tx, ["mine-1"]) == 0
    stale = await rows.stale(database, older_than_s=0, limit=1000)
    assert any(s.tenant_id == tenant and s.event_id == "mine-1" for s in stale)
    other_db = await open_database(database_url)
    try:
        async with other_db.tenant(tenant) as tx:
            assert await rows.forget(tx, ["mine-1"]) == 1
    finally:
        await other_db.close()


async def _same(database: Database) -> Database:
    return database


async def _has(redis: Redis, tenant_id: str, expected: list[str]) -> bool:
    return set(expected) <= set(await stream_ids(redis, tenant_id))


async def _none_pending(database: Database, tenant_id: str) -> bool:
    return not await pending(database, tenant_id)


async def test_an_event_redis_lost_after_taking_it_is_published_again_before_its_row_is_deleted(
        redis: Redis, publisher: EventPublisher, database: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    import agentworker.event_outbox as module

    monkeypatch.setattr(module, "CONFIRM_AFTER_S", 0.5)
    tenant = new_tenant("lost")
    outbox = EventOutbox(publisher, lambda: _same(database))
    async with database.tenant(tenant) as tx:
        await outbox.promise(tx, "workflow_run_completed", {"n": 1}, "lost-1")
    await wait_for(lambda: _has(redis, tenant, ["lost-1"]), 5, what="the event in the stream")
    # Redis restarts without its last second of writes: the stream entry and the remembered id are gone.
    await redis.delete(keys.event_stream(tenant), keys.published_event_ids(tenant))
    assert await pending(database, tenant) == ["lost-1"], "the row is kept until Redis is seen to keep it"

    await wait_for(lambda: _has(redis, tenant, ["lost-1"]), 5, what="the event published again")
    await wait_for(lambda: _none_pending(database, tenant), 5, what="its row to be deleted once confirmed")
    assert await stream_ids(redis, tenant) == ["lost-1"]
    await outbox.aclose()
