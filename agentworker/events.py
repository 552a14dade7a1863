"""Events from workers to the backend.

An event is the JSON object ``{"event", "tenant_id", "ts", "data"}`` (``ts``: ISO 8601 UTC with
milliseconds). Each is appended to the tenant's capped stream ``agentworker:stream:{tenant_id}`` (one
field, ``event``, holding the JSON) and published on ``agentworker:events:{tenant_id}``, in one round
trip. Subscribers get it live; a backend that was down reads the stream from its last seen id.

Job lifecycle events emitted by the envelope (``data`` always has ``job_id``, ``task``, ``try``):
``job_started``, ``job_completed`` (+ ``result``), ``job_failed`` (+ ``error``, ``reason``),
``job_timed_out`` (+ ``timeout``), ``job_rejected`` (+ ``reason``), ``job_retrying`` (+ ``defer``).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from agentworker import keys


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(event: str, tenant_id: str, data: dict[str, Any]) -> dict[str, Any]:
    return {"event": event, "tenant_id": tenant_id, "ts": utc_timestamp(), "data": data}


@dataclass(frozen=True, slots=True)
class Event:
    """An event read back from a tenant's stream; ``id`` is the stream id to resume after."""

    id: str
    event: str
    tenant_id: str
    ts: str
    data: dict[str, Any]


class EventPublisher:
    """Publishes tenant events; never raises (an event lost to a Redis blip must not fail a job)."""

    def __init__(self, redis: Redis, *, stream_maxlen: int = 10_000) -> None:
        self.redis = redis
        self.stream_maxlen = stream_maxlen

    async def publish(self, tenant_id: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        record = make_event(event, tenant_id, data)
        body = json.dumps(record, separators=(",", ":"), default=str)
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.xadd(keys.event_stream(tenant_id), {"event": body}, maxlen=self.stream_maxlen,
                      approximate=True)
            pipe.publish(keys.event_channel(tenant_id), body)
            await pipe.execute()
        return record


def _decode(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    raw = fields.get(b"event", fields.get("event", b"{}"))
    body = json.loads(raw)
    return Event(
        id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        event=body.get("event", ""),
        tenant_id=body.get("tenant_id", ""),
        ts=body.get("ts", ""),
        data=body.get("data") or {},
    )


async def read_events(redis: Redis, tenant_id: str, *, since: str = "0", block_ms: int = 5000,
                      batch: int = 100) -> AsyncIterator[Event]:
    """Yield a tenant's events after stream id ``since`` ("0": from the oldest kept, "$": only new),
    catching up first and then following live, without gaps or duplicates."""
    stream = keys.event_stream(tenant_id)
    last = since
    if last == "$":
        # Resolve "$" once, so events published between two reads are not skipped.
        info = await redis.xinfo_stream(stream) if await redis.exists(stream) else None
        last = (info["last-generated-id"].decode() if isinstance(info["last-generated-id"], bytes)
                else info["last-generated-id"]) if info else "0"
    while True:
        response = await redis.xread({stream: last}, count=batch, block=block_ms)
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                event = _decode(entry_id, fields)
                last = event.id
                yield event
