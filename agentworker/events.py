"""Events from workers to the backend.

An event is the JSON object ``{"event", "tenant_id", "ts", "data"}`` (``ts``: ISO 8601 UTC with
milliseconds). Each is appended to the tenant's capped stream ``agentworker:stream:{tenant_id}`` (one
field, ``event``, holding the JSON) and published on ``agentworker:events:{tenant_id}``, in one round
trip. Subscribers get it live; a backend that was down reads the stream from its last seen id.

Job lifecycle events emitted by the envelope (``data`` always has ``job_id``, ``task``, ``try``):
``job_started``, ``job_completed`` (+ ``result``), ``job_failed`` (+ ``error``, ``reason``),
``job_timed_out`` (+ ``timeout``), ``job_rejected`` (+ ``reason``), ``job_retrying`` (+ ``defer``).

An event whose JSON is over ``AGENTWORKER_MAX_EVENT_BYTES`` is still published, truncated like a job's
result preview: its ``data`` keeps its short scalar fields (``job_id``, ``run_id``, ``step_id``...) and
gets ``"preview"`` (the start of the data's JSON, ending in ``…``), ``"bytes"`` (the data's full JSON
size) and ``"truncated": true``. The full value stays where it is stored (the job result, the step row).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from redis.asyncio import Redis

from agentworker import keys
from agentworker.settings import InputLimits

#: characters of an oversized event's data kept as its preview (fewer if the limit is small)
PREVIEW_CHARS = 2000
#: scalar fields of an oversized event's data kept as they are: at most this many, each this short
_KEPT_FIELDS, _KEPT_CHARS = 20, 200


def utc_timestamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def make_event(event: str, tenant_id: str, data: dict[str, Any], event_id: str | None = None) -> dict[str, Any]:
    """The event's JSON. ``id`` names this event wherever it is read (the channel and the stream carry the
    same one), so a consumer that reads both, or reads the stream again, drops repeats by it; a caller
    that may publish the same event twice passes a stable ``event_id``, else a random one is made."""
    return {"event": event, "id": event_id or uuid.uuid4().hex, "tenant_id": tenant_id, "ts": utc_timestamp(),
            "data": data}


@dataclass(frozen=True, slots=True)
class Event:
    """An event read back from a tenant's stream; ``id`` is the stream id to resume after."""

    id: str
    event: str
    tenant_id: str
    ts: str
    data: dict[str, Any]
    #: the event's own id (the ``id`` of its JSON): the same on the channel and in the stream
    event_id: str = ""


class EventPublisher:
    """Publishes tenant events. :meth:`publish` raises Redis errors; callers that must not fail on a lost
    event (the job envelope) catch them.

    Group commit: :meth:`publish` returns once its event is in Redis, as if it wrote it alone, but events
    published while a write is in flight go out together in the next pipeline, in the order they were
    published. A busy worker (two lifecycle events per job) so makes one round trip for many events
    instead of one each; an idle one sees no difference.
    """

    #: events written in one pipeline at most
    MAX_BATCH = 256

    def __init__(self, redis: Redis, *, stream_maxlen: int = 10_000, max_event_bytes: int | None = None) -> None:
        """``max_event_bytes``: default ``AGENTWORKER_MAX_EVENT_BYTES``; a bigger event is truncated."""
        self.redis = redis
        self.stream_maxlen = stream_maxlen
        self.max_event_bytes = max_event_bytes or InputLimits.from_env().max_event_bytes
        self._pending: list[tuple[str, str, asyncio.Future[None]]] = []  # (tenant, JSON body, written)
        self._writer: asyncio.Task[None] | None = None

    async def publish(self, tenant_id: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        record, written = self.publish_nowait(tenant_id, event, data)
        await written
        return record

    def publish_nowait(self, tenant_id: str, event: str,
                       data: dict[str, Any]) -> tuple[dict[str, Any], asyncio.Future[None]]:
        """Queue an event in order and return at once, with a future that is done once it is in Redis (or
        holds the Redis error): for a caller that must not wait for the round trip (the job envelope's
        ``job_started``). Events queued after it are still written after it."""
        record = make_event(event, tenant_id, data)
        body = json.dumps(record, separators=(",", ":"), default=str)
        if len(body) > self.max_event_bytes:  # ASCII JSON: characters are bytes
            record, body = truncate_event(record, self.max_event_bytes)
        loop = asyncio.get_running_loop()
        written: asyncio.Future[None] = loop.create_future()
        self._pending.append((tenant_id, body, written))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending(), name="event-writer")
        return record, written

    async def _write_pending(self) -> None:
        batch: list[tuple[str, str, asyncio.Future[None]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.MAX_BATCH], self._pending[self.MAX_BATCH:]
                try:
                    async with self.redis.pipeline(transaction=False) as pipe:
                        for tenant_id, body, _written in batch:
                            pipe.xadd(keys.event_stream(tenant_id), {"event": body}, maxlen=self.stream_maxlen,
                                      approximate=True)
                            pipe.publish(keys.event_channel(tenant_id), body)
                        replies = await pipe.execute(raise_on_error=False)
                except Exception as exc:
                    for _tenant_id, _body, written in batch:
                        if not written.done():
                            written.set_exception(exc)
                    continue
                for i, (_tenant_id, _body, written) in enumerate(batch):
                    error = next((r for r in replies[2 * i:2 * i + 2] if isinstance(r, Exception)), None)
                    if written.done():
                        continue
                    if error is None:
                        written.set_result(None)
                    else:
                        written.set_exception(error)
                batch = []
        except BaseException:
            # Cancelled (the loop is closing): nobody may wait forever on an event that was not written.
            for _tenant_id, _body, written in batch + self._pending:
                if not written.done():
                    written.set_exception(ConnectionError("the event writer was cancelled"))
            self._pending = []
            raise


def truncate_event(record: dict[str, Any], max_bytes: int) -> tuple[dict[str, Any], str]:
    """``record`` with its ``data`` cut down to fit in ``max_bytes`` of JSON (see the module docstring),
    and that JSON."""
    data = record.get("data") or {}
    text = json.dumps(data, separators=(",", ":"), default=str)
    kept = dict(list({k: v for k, v in data.items()
                      if isinstance(v, str | int | float | bool | None) and len(str(v)) <= _KEPT_CHARS}.items()
                     )[:_KEPT_FIELDS])
    chars = min(PREVIEW_CHARS, max_bytes // 4)
    while True:
        short = {**kept, "preview": text[:chars] + "…", "bytes": len(text), "truncated": True}
        body = json.dumps({**record, "data": short}, separators=(",", ":"), default=str)
        if len(body) <= max_bytes or (chars == 0 and not kept):
            return {**record, "data": short}, body
        if chars:
            chars //= 2
        else:
            kept = {}


def _decode(entry_id: bytes | str, fields: dict[Any, Any]) -> Event:
    raw = fields.get(b"event", fields.get("event", b"{}"))
    body = json.loads(raw)
    return Event(
        id=entry_id.decode() if isinstance(entry_id, bytes) else entry_id,
        event=body.get("event", ""),
        tenant_id=body.get("tenant_id", ""),
        ts=body.get("ts", ""),
        data=body.get("data") or {},
        event_id=str(body.get("id") or ""),
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
