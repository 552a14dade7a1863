"""Admission control and enqueue in one atomic Redis script.

A job is admitted only if its tenant is under ``max_pending`` (jobs enqueued and not yet started) and
under its ``rate_limit`` (a token bucket of ``count`` tokens refilled over ``period``). Checking and
enqueuing in one Lua script means two clients racing cannot both slip past a limit, a refused job
leaves nothing behind, and the whole enqueue costs one round trip (ARQ's own takes a WATCH/MULTI of
about six commands).

The script writes the job exactly where and how ARQ's ``enqueue_job`` would (job key with expiry, queue
sorted set scored by due time), so ARQ's worker code runs it unchanged. A repeat of an existing job id
(its job or result key still exists) enqueues nothing: that is the idempotency key's no-op.

Per tenant it also keeps ``agentworker:pending:{tenant}``, job ids scored by their expiry, removed when
a worker claims the job; stale entries (jobs that expired unclaimed) are pruned by score.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.config import RateLimit

_ENQUEUE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return {0, ''}
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local max_pending = tonumber(ARGV[5])
if max_pending >= 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
  local n = redis.call('ZCARD', KEYS[4])
  if n >= max_pending then
    return {-1, tostring(n)}
  end
end
local rate = tonumber(ARGV[6])
if rate > 0 then
  local period = tonumber(ARGV[7])
  local bucket = redis.call('HMGET', KEYS[5], 'tokens', 'ts')
  local tokens = tonumber(bucket[1]) or rate
  local ts = tonumber(bucket[2]) or now
  if now > ts then
    tokens = math.min(rate, tokens + (now - ts) * rate / period)
    ts = now
  end
  if tokens < 1 then
    return {-2, tostring(math.ceil((1 - tokens) * period / rate))}
  end
  redis.call('HSET', KEYS[5], 'tokens', tostring(tokens - 1), 'ts', tostring(ts))
  redis.call('PEXPIRE', KEYS[5], math.ceil(period * 2))
end
local expires = tonumber(ARGV[4])
redis.call('SET', KEYS[1], ARGV[2], 'PX', expires)
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], now + expires, ARGV[1])
redis.call('PEXPIRE', KEYS[4], expires)
if ARGV[8] ~= '' then
  redis.call('PUBLISH', ARGV[8], KEYS[3])
end
return {1, ''}
"""


class Admission(Enum):
    ENQUEUED = 1
    DUPLICATE = 0
    OVER_MAX_PENDING = -1
    OVER_RATE_LIMIT = -2


@dataclass(frozen=True, slots=True)
class AdmissionResult:
    outcome: Admission
    #: pending count for OVER_MAX_PENDING, milliseconds until a token for OVER_RATE_LIMIT
    detail: int = 0


class Enqueuer:
    """Registers the script once per Redis client and runs it."""

    def __init__(self, redis: Redis) -> None:
        self._script = redis.register_script(_ENQUEUE_LUA)

    async def enqueue(
        self,
        *,
        job_id: str,
        tenant_id: str,
        pool: str,
        queue: str,
        job_bytes: bytes,
        score_ms: int,
        expires_ms: int,
        max_pending: int | None,
        rate: RateLimit | None,
    ) -> AdmissionResult:
        reply = await self._script(
            keys=[jobs.job_key(job_id), jobs.result_key(job_id), queue, keys.pending(tenant_id),
                  keys.rate_bucket(tenant_id)],
            args=[job_id, job_bytes, score_ms, expires_ms,
                  -1 if max_pending is None else max_pending,
                  rate.count if rate else 0, int(rate.period_s * 1000) if rate else 0,
                  keys.wakeup_channel(pool)],
        )
        code, detail = int(reply[0]), reply[1]
        detail_text = detail.decode() if isinstance(detail, bytes) else str(detail)
        return AdmissionResult(Admission(code), int(detail_text) if detail_text else 0)
