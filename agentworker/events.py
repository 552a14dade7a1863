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
import contextlib
import dataclasses
import hashlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from agentworker import keys
from agentworker.settings import InputLimits

_PUBLISH_ONCE_LUA = resources.files("agentworker").joinpath("lua", "publish_once.lua").read_text(encoding="utf-8")
_PUBLISH_ONCE_SHA = hashlib.sha1(_PUBLISH_ONCE_LUA.encode()).hexdigest()

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


def stable_event_id(tenant_id: str, *parts: object) -> str:
    """The id of an event that is the same every time it is made: 32 hex characters derived from the
    tenant and what names the event (e.g. run, step, attempt and event name). A re-publication of the
    event (after a crash, by the outbox relay) so carries the same id, and the stream keeps one entry."""
    raw = "\x1f".join((tenant_id, *(str(part) for part in parts)))
    return hashlib.sha256(raw.encode("utf-8", errors="surrogatepass")).hexdigest()[:32]


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

    Events with a stable id (:meth:`publish_once_nowait`, used by :mod:`agentworker.event_outbox`) go
    through ``agentworker/lua/publish_once.lua`` in the same pipeline: the stream gets one entry per id,
    however many times it is published. The ids are remembered per tenant in a sorted set bounded to
    twice the stream's length, so an id is forgotten only long after its entry left the stream.
    """

    #: events written in one pipeline at most
    MAX_BATCH = 256

    def __init__(self, redis: Redis, *, stream_maxlen: int = 10_000, max_event_bytes: int | None = None) -> None:
        """``max_event_bytes``: default ``AGENTWORKER_MAX_EVENT_BYTES``; a bigger event is truncated."""
        self.redis = redis
        self.stream_maxlen = stream_maxlen
        self.remembered_ids = max(2 * stream_maxlen, 1000)
        self.max_event_bytes = max_event_bytes or InputLimits.from_env().max_event_bytes
        # (tenant, JSON body, stable id or None, written: True, or False for a repeat of a stable id)
        self._pending: list[tuple[str, str, str | None, asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def publish(self, tenant_id: str, event: str, data: dict[str, Any]) -> dict[str, Any]:
        record, written = self.publish_nowait(tenant_id, event, data)
        await written
        return record

    def prepare(self, tenant_id: str, event: str, data: dict[str, Any],
                event_id: str | None = None) -> tuple[dict[str, Any], str]:
        """The event's record and the JSON that is published (truncated past ``max_event_bytes``)."""
        record = make_event(event, tenant_id, data, event_id)
        body = json.dumps(record, separators=(",", ":"), default=str)
        if len(body) > self.max_event_bytes:  # ASCII JSON: characters are bytes
            record, body = truncate_event(record, self.max_event_bytes)
        return record, body

    def publish_nowait(self, tenant_id: str, event: str,
                       data: dict[str, Any]) -> tuple[dict[str, Any], asyncio.Future[bool]]:
        """Queue an event in order and return at once, with a future that is done once it is in Redis (or
        holds the Redis error): for a caller that must not wait for the round trip (the job envelope's
        ``job_started``). Events queued after it are still written after it."""
        record, body = self.prepare(tenant_id, event, data)
        return record, self._queue(tenant_id, body, None)

    def publish_once_nowait(self, tenant_id: str, event_id: str, body: str) -> asyncio.Future[bool]:
        """Queue an event made by :meth:`prepare` with a stable ``event_id``; the future's result is True
        if this call put it in the stream, False if that id was already there (nothing written)."""
        return self._queue(tenant_id, body, event_id)

    async def flush(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds for the events queued so far to be written (at shutdown, before
        the Redis connection closes); never raises."""
        writer = self._writer
        if writer is not None and not writer.done():
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(writer), timeout)

    def _queue(self, tenant_id: str, body: str, event_id: str | None) -> asyncio.Future[bool]:
        loop = asyncio.get_running_loop()
        written: asyncio.Future[bool] = loop.create_future()
        self._pending.append((tenant_id, body, event_id, written))
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._write_pending(), name="event-writer")
        return written

    async def _write_pending(self) -> None:
        batch: list[tuple[str, str, str | None, asyncio.Future[bool]]] = []
        try:
            while self._pending:
                batch, self._pending = self._pending[:self.MAX_BATCH], self._pending[self.MAX_BATCH:]
                try:
                    replies = await self._send(batch)
                    missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
                    if missing:  # Redis restarted and lost the script: load it, send those again
                        await self.redis.script_load(_PUBLISH_ONCE_LUA)
                        again = await self._send([batch[i] for i in missing])
                        for i, reply in zip(missing, again, strict=True):
                            replies[i] = reply
                except Exception as exc:
                    for _tenant_id, _body, _event_id, written in batch:
                        if not written.done():
                            written.set_exception(exc)
                    continue
                for (_tenant_id, _body, _event_id, written), reply in zip(batch, replies, strict=True):
                    if written.done():
                        continue
                    if isinstance(reply, Exception):
                        written.set_exception(reply)
                    else:
                        written.set_result(bool(reply))
                batch = []
        except BaseException:
            # Cancelled (the loop is closing): nobody may wait forever on an event that was not written.
            for _tenant_id, _body, _event_id, written in batch + self._pending:
                if not written.done():
                    written.set_exception(ConnectionError("the event writer was cancelled"))
            self._pending = []
            raise

    async def _send(self, batch: list[tuple[str, str, str | None, asyncio.Future[bool]]]) -> list[Any]:
        """One pipeline for ``batch``; one reply (or error) per event: True/1 written, 0 a repeat."""
        async with self.redis.pipeline(transaction=False) as pipe:
            for tenant_id, body, event_id, _written in batch:
                if event_id is None:
                    pipe.xadd(keys.event_stream(tenant_id), {"event": body}, maxlen=self.stream_maxlen,
                              approximate=True)
                    pipe.publish(keys.event_channel(tenant_id), body)
                else:
                    pipe.evalsha(_PUBLISH_ONCE_SHA, 2, keys.event_stream(tenant_id),
                                 keys.published_event_ids(tenant_id), keys.event_channel(tenant_id), event_id, body,
                                 str(self.stream_maxlen), str(self.remembered_ids))
            raw = await pipe.execute(raise_on_error=False)
        replies: list[Any] = []
        position = 0
        for _tenant_id, _body, event_id, _written in batch:
            if event_id is None:
                pair = raw[position:position + 2]
                position += 2
                replies.append(next((r for r in pair if isinstance(r, Exception)), True))
            else:
                replies.append(raw[position])
                position += 1
        return replies


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


def decode_entry(entry_id: bytes | str, fields: dict[Any, Any]) -> Event | None:
    """:func:`_decode` for readers that must not fail on one bad entry (the operator console): None for an
    entry whose ``event`` field is not a JSON object; ``data`` that is not an object reads as ``{}``."""
    try:
        event = _decode(entry_id, fields)
    except (ValueError, RecursionError, AttributeError):  # not JSON, nested too deep, not an object
        return None
    return event if isinstance(event.data, dict) else dataclasses.replace(event, data={})


async def stream_position(redis: Redis, tenant_id: str) -> str:
    """Where the tenant's stream is now ("0" while it has none): reading after it yields every event
    published from here on, none before."""
    stream = keys.event_stream(tenant_id)
    info = await redis.xinfo_stream(stream) if await redis.exists(stream) else None
    if not info:
        return "0"
    last = info["last-generated-id"]
    return last.decode() if isinstance(last, bytes) else str(last)


async def read_events(redis: Redis, tenant_id: str, *, since: str = "0", block_ms: int = 5000,
                      batch: int = 100) -> AsyncIterator[Event]:
    """Yield a tenant's events after stream id ``since`` ("0": from the oldest kept, "$": only new),
    catching up first and then following live, without gaps or duplicates."""
    stream = keys.event_stream(tenant_id)
    last = since
    if last == "$":  # resolved once, so events published between two reads are not skipped
        last = await stream_position(redis, tenant_id)
    while True:
        response = await redis.xread({stream: last}, count=batch, block=block_ms)
        for _stream, entries in response or []:
            for entry_id, fields in entries:
                event = _decode(entry_id, fields)
                last = event.id
                yield event
