"""Read, requeue and delete the dead letters of a pool (``agentworker dead-letters``).

Layout. A queue entry no worker can read is moved once, atomically, from its shard queue to the pool's
hash ``agentworker:dead:{pool}`` (:func:`agentworker.keys.dead_letters`; written by the worker, see
:mod:`agentworker.job_leases`):

* field: the job id exactly as it sat in the queue, as raw bytes (it may not be UTF-8);
* value: JSON ``{"reason", "detail", "queue", "score", "ts"}``: why (one of
  :data:`agentworker.job_leases.DEAD_LETTER_REASONS`), what exactly, the queue it came from, its score
  there (due time, ms) and when it was moved (ms).

The job record ``arq:job:{id}`` is left as it was (missing, of the wrong Redis type, or bad bytes), and
for a UTF-8 id the worker also wrote a failed result ``arq:result:{id}`` (``JobUnreadable``) so a client
waiting on the job learns it failed.

Id notation. Operators see and type ids as text: a UTF-8 id made of printable characters is shown as
is; any other id is shown as ``hex:`` followed by the lowercase hex of its bytes (``hex:ff00``). Parsing
is the inverse: ``hex:`` followed by an even, non-zero number of hex digits and nothing else is always
read as bytes; anything else is the UTF-8 text itself. So that every id round-trips, a UTF-8 id that
would itself read as hex notation is shown in hex too. Real job ids (``tenant:task:key``) always hold a
``:`` after their first part, so a job of tenant ``hex`` is shown as is.

Requeue puts the job back in its recorded queue at its recorded score: the score is its original due
time, already past, so it runs at once and keeps its place ahead of jobs enqueued after it. It is an
operator's act, not a producer's enqueue: it is not counted against the tenant's ``max_pending`` or rate.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.config import QuotaConfig
from agentworker.errors import AgentWorkerError
from agentworker.routing import InvalidTenantId, route_tenant

__all__ = [
    "DEFAULT_LIST_LIMIT",
    "DeadLetter",
    "DeadLetterError",
    "DeadLetterList",
    "DeadLetterNotFound",
    "RequeueRefused",
    "count_dead_letters",
    "delete",
    "find_pools",
    "format_id",
    "list_dead_letters",
    "parse_id",
    "requeue",
]

HEX_PREFIX = "hex:"
_HEX_NOTATION = re.compile(r"hex:((?:[0-9a-fA-F]{2})+)")
DEFAULT_LIST_LIMIT = 1000
_SCAN_COUNT = 500


class DeadLetterError(AgentWorkerError, ValueError):
    """Root of every dead-letter error: its message is one sentence naming the id and why."""


class DeadLetterNotFound(DeadLetterError):
    """The id is not among the pool's dead letters."""


class RequeueRefused(DeadLetterError):
    """The dead letter cannot go back to its queue as it stands (repair its job record first)."""


# -- the id notation ---------------------------------------------------------------------------------


def format_id(raw: bytes) -> str:
    """The id as an operator sees and types it (see the module docstring)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        return HEX_PREFIX + raw.hex()
    if not text or not text.isprintable() or _HEX_NOTATION.fullmatch(text):
        return HEX_PREFIX + raw.hex()
    return text


def parse_id(text: str) -> bytes:
    """The raw id bytes of an id written in the notation of :func:`format_id`."""
    if not text:
        raise DeadLetterError("a dead letter id must not be empty")
    match = _HEX_NOTATION.fullmatch(text)
    if match:
        return bytes.fromhex(match.group(1))
    return text.encode()


# -- reading -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DeadLetter:
    """One dead letter. ``id`` is the raw id in the operator notation; ``raw`` the bytes themselves."""

    pool: str
    id: str
    raw: bytes
    reason: str
    detail: str
    queue: str
    score: float
    ts: int  # when it was moved, ms since the epoch

    def age_s(self, now: float | None = None) -> float:
        """Seconds since it was dead-lettered."""
        return max(0.0, (time.time() if now is None else now) - self.ts / 1000)

    def as_dict(self) -> dict[str, Any]:
        return {"pool": self.pool, "id": self.id, "reason": self.reason, "detail": self.detail,
                "queue": self.queue, "score": self.score, "ts": self.ts}


@dataclass(frozen=True, slots=True)
class DeadLetterList:
    """Up to ``limit`` dead letters of one pool, oldest first, and how many the pool holds in all."""

    pool: str
    letters: list[DeadLetter]
    total: int

    @property
    def more(self) -> int:
        """Dead letters of the pool not in :attr:`letters` (over the limit)."""
        return max(0, self.total - len(self.letters))


def _decode_record(pool: str, raw_id: bytes, value: bytes) -> DeadLetter:
    """Parse a dead-letter value; a value someone else mangled still lists, as reason ``?``."""
    try:
        record = json.loads(value)
    except ValueError:
        record = None
    if not isinstance(record, dict):
        record = {"reason": "?", "detail": f"unreadable dead-letter record {value[:80]!r}"}

    def number(name: str) -> float:
        field = record.get(name)
        return float(field) if isinstance(field, int | float) and not isinstance(field, bool) else 0.0

    return DeadLetter(pool=pool, id=format_id(raw_id), raw=raw_id, reason=str(record.get("reason", "?")),
                      detail=str(record.get("detail", "")), queue=str(record.get("queue", "")),
                      score=number("score"), ts=int(number("ts")))


async def list_dead_letters(redis: Redis, pool: str, limit: int = DEFAULT_LIST_LIMIT) -> DeadLetterList:
    """At most ``limit`` dead letters of ``pool``, sorted by the time they were moved.

    The hash is read with HSCAN, so a huge one never blocks Redis nor fills memory; past ``limit`` the
    letters shown are the first the scan met, not necessarily the oldest (``more`` says how many
    were left out).
    """
    if limit < 1:
        raise DeadLetterError(f"the limit must be at least 1, not {limit}")
    name = keys.dead_letters(pool)
    letters: list[DeadLetter] = []
    cursor = 0
    while True:
        cursor, fields = await redis.hscan(name, cursor, count=_SCAN_COUNT)
        for raw_id, value in fields.items():
            if len(letters) < limit:
                letters.append(_decode_record(pool, bytes(raw_id), bytes(value)))
        if cursor == 0 or len(letters) >= limit:
            break
    total = int(await redis.hlen(name))  # type: ignore[misc]
    letters.sort(key=lambda letter: (letter.ts, letter.raw))
    return DeadLetterList(pool, letters, max(total, len(letters)))


async def count_dead_letters(redis: Redis, pools: list[str]) -> dict[str, int]:
    """How many dead letters each pool holds (one round trip)."""
    async with redis.pipeline(transaction=False) as pipe:
        for pool in pools:
            pipe.hlen(keys.dead_letters(pool))
        replies = await pipe.execute()
    return {pool: int(n) for pool, n in zip(pools, replies, strict=True)}


async def find_pools(redis: Redis, pools: list[str], raw_id: bytes) -> list[str]:
    """The pools among ``pools`` whose dead letters hold ``raw_id``."""
    async with redis.pipeline(transaction=False) as pipe:
        for pool in pools:
            pipe.hexists(keys.dead_letters(pool), raw_id)  # type: ignore[arg-type]  # bytes fields work; stubs say str
        replies = await pipe.execute()
    return [pool for pool, found in zip(pools, replies, strict=True) if found]


async def _get(redis: Redis, pool: str, raw_id: bytes) -> tuple[DeadLetter, bytes]:
    value = await redis.hget(keys.dead_letters(pool), raw_id)  # type: ignore[arg-type,misc]
    if value is None:
        raise DeadLetterNotFound(f"job {format_id(raw_id)} is not among the dead letters of pool {pool!r}")
    return _decode_record(pool, raw_id, bytes(value)), bytes(value)


# -- requeue -----------------------------------------------------------------------------------------

# KEYS: job. Returns {type} or {'string', record}: one read, so the key cannot change type in between.
_READ_RECORD_LUA = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' then return {kind, redis.call('GET', KEYS[1])} end
return {kind}
"""

# KEYS: dead letters, queue, result, attempt, retry, job
# ARGV: raw job id, the dead-letter value read, the job record checked, score, wake-up channel
# Re-checks, atomically, what the caller checked (the dead letter and the job record are still the ones
# it read, the id is not queued anew), then moves the id back to its queue and wakes the pool. The
# result and the try counter of the unreadable attempt are dropped: the job starts afresh at try 1.
_REQUEUE_LUA = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 'gone' end
if redis.call('TYPE', KEYS[6])['ok'] ~= 'string' or redis.call('GET', KEYS[6]) ~= ARGV[3] then
  return 'changed'
end
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 'queued' end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4], KEYS[5])
redis.call('ZADD', KEYS[2], ARGV[4], ARGV[1])
redis.call('PUBLISH', ARGV[5], KEYS[2])
return 'ok'
"""


def _record_name(letter: DeadLetter) -> str:
    """How messages name the job record: its key, unless the id is only shown in hex."""
    return f"record {jobs.job_key(letter.id)}" if letter.id.encode() == letter.raw else "job record"


def _check_queue(letter: DeadLetter, pool: str, config: QuotaConfig | None) -> None:
    job_id = letter.id
    prefix = keys.queue(pool, 0).removesuffix("0")
    shard = letter.queue.removeprefix(prefix)
    if not letter.queue.startswith(prefix) or not shard.isdigit():
        raise RequeueRefused(f"job {job_id}'s recorded queue {letter.queue!r} is not a queue of pool {pool!r}")
    if config is None:
        return
    tenant = letter.raw.decode().partition(":")[0]
    try:
        route = route_tenant(config, tenant)
    except InvalidTenantId:
        raise RequeueRefused(f"job {job_id} does not start with a valid tenant id; no worker would run it") \
            from None
    if route.queue != letter.queue:
        raise RequeueRefused(f"job {job_id}'s tenant {tenant!r} now routes to {route.queue}, not to its recorded "
                             f"queue {letter.queue} (has the quota file changed?); a worker would refuse it there")


def _check_record(letter: DeadLetter, kind: str, record: bytes | None) -> bytes:
    job_id, where = letter.id, _record_name(letter)
    if kind == "none":
        raise RequeueRefused(f"job {job_id}'s {where} does not exist; write a valid job record there "
                             f"first, or delete the dead letter")
    if kind != "string" or record is None:
        raise RequeueRefused(f"job {job_id}'s {where} is a Redis {kind}, not a string; repair it first, "
                             f"or delete the dead letter")
    try:
        # Structural checks only: no task set, so every readable job decodes as a reject of an unknown task,
        # which is fine here (the worker knows its tasks; a task it does not know fails readably).
        jobs.WorkerJobDecoder(set())(record)
    except jobs.UnreadableJob as exc:
        raise RequeueRefused(f"job {job_id}'s {where} is still unreadable ({exc.reason}: {exc.detail}); "
                             f"repair it first, or delete the dead letter") from None
    return record


async def requeue(redis: Redis, pool: str, raw_id: bytes, *, config: QuotaConfig | None = None) -> DeadLetter:
    """Put a dead letter back in its queue, once its job record has been repaired; return it.

    Refused (:class:`DeadLetterError`) when the id is not among the pool's dead letters, is not UTF-8,
    its record ``arq:job:{id}`` is missing, not a string or still unreadable, its recorded queue is not
    one of the pool's (or, given ``config``, not where its tenant routes now), or it is queued again
    already. Otherwise, in one script: the dead letter, the unreadable attempt's result, attempt and try
    counter go; the id goes back to its queue at its recorded score; the pool's wake-up channel is told.
    """
    letter, value = await _get(redis, pool, raw_id)
    try:
        job_id = raw_id.decode()
    except UnicodeDecodeError:
        raise RequeueRefused(f"job {letter.id} has an id that is not UTF-8: no worker can run it; "
                             f"delete it instead") from None
    _check_queue(letter, pool, config)
    reply = await redis.register_script(_READ_RECORD_LUA)(keys=[jobs.job_key(job_id)])
    kind = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    record = _check_record(letter, kind, bytes(reply[1]) if len(reply) > 1 else None)
    outcome = await redis.register_script(_REQUEUE_LUA)(
        keys=[keys.dead_letters(pool), letter.queue, jobs.result_key(job_id), keys.job_attempt(job_id),
              jobs.retry_key(job_id), jobs.job_key(job_id)],
        args=[raw_id, value, record, repr(letter.score), keys.wakeup_channel(pool)])
    outcome = outcome.decode() if isinstance(outcome, bytes) else str(outcome)
    if outcome == "gone":
        raise DeadLetterNotFound(f"job {letter.id} left the dead letters of pool {pool!r} while it was being "
                                 f"requeued (someone else requeued or deleted it)")
    if outcome == "changed":
        raise RequeueRefused(f"job {letter.id}'s {_record_name(letter)} changed while it was being requeued; "
                             f"try again")
    if outcome == "queued":
        raise RequeueRefused(f"job {letter.id} is already in {letter.queue} again (enqueued anew?); its dead letter "
                             f"was left as it is")
    return letter


# -- delete ------------------------------------------------------------------------------------------

# KEYS: dead letters, job, attempt, retry. ARGV: raw job id. Returns 0 if it was not a dead letter.
_DELETE_LUA = """
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then return 0 end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4])
return 1
"""


async def delete(redis: Redis, pool: str, raw_id: bytes) -> DeadLetter:
    """Drop a dead letter for good, with its job record, attempt and try counter; return it.

    The failed result the worker wrote (``JobUnreadable``) stays until it expires: it is the job's
    answer to whoever waits on it, and it keeps the idempotency key taken until then.
    """
    letter, _value = await _get(redis, pool, raw_id)
    deleted = await redis.register_script(_DELETE_LUA)(
        keys=[keys.dead_letters(pool), jobs.job_key("").encode() + raw_id, keys.job_attempt("").encode() + raw_id,
              jobs.retry_key("").encode() + raw_id],
        args=[raw_id])
    if not int(deleted):
        raise DeadLetterNotFound(f"job {letter.id} left the dead letters of pool {pool!r} while it was being "
                                 f"deleted (someone else requeued or deleted it)")
    return letter
