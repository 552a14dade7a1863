"""Admission control and enqueue in one atomic Redis script.

A job is admitted only if its tenant is under ``max_pending`` (jobs enqueued and not yet started) and
under its ``rate_limit`` (a token bucket of ``count`` tokens refilled over ``period``). Checking and
enqueuing in one Lua script means two clients racing cannot both slip past a limit, a refused job
leaves nothing behind, and the whole enqueue costs one round trip (ARQ's own takes a WATCH/MULTI of
about six commands).

The script (``agentworker/lua/enqueue.lua``, the same file other-language producers run: see
docs/protocol.md) writes the job record as ARQ's ``enqueue_job`` would (job key with expiry), puts its id
in its tenant's queue inside the shard (scored by due time), and makes the tenant ready (or waiting, for
a deferred job) in the shard's fair dispatcher. A repeat of an existing job id (its job or result key
still exists) enqueues nothing: that is the idempotency key's no-op. It publishes a wake-up only when
the tenant just became ready: a tenant enqueuing 1,000 jobs a second wakes the workers once, not 1,000
times.

Per tenant it also keeps ``agentworker:pending:{tenant}``, job ids scored by their expiry, removed when
a worker claims the job; stale entries (jobs that expired unclaimed) are pruned by score.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.config import RateLimit
from agentworker.job_leases import lua_source


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
        self._script = redis.register_script(lua_source("enqueue"))

    async def enqueue(
        self,
        *,
        job_id: str,
        tenant_id: str,
        pool: str,
        shard: int,
        job_bytes: bytes,
        score_ms: int,
        expires_ms: int,
        max_pending: int | None,
        rate: RateLimit | None,
    ) -> AdmissionResult:
        reply = await self._script(
            keys=[jobs.job_key(job_id), jobs.result_key(job_id), keys.tenant_queue(pool, shard, tenant_id),
                  keys.pending(tenant_id), keys.rate_bucket(tenant_id), keys.ready_tenants(pool, shard),
                  keys.waiting_tenants(pool, shard), keys.capped_tenants(pool, shard),
                  keys.virtual_clock(pool, shard)],
            args=[job_id, job_bytes, score_ms, expires_ms,
                  -1 if max_pending is None else max_pending,
                  rate.count if rate else 0, int(rate.period_s * 1000) if rate else 0,
                  keys.wakeup_channel(pool), tenant_id, keys.queue(pool, shard)],
        )
        code, detail = int(reply[0]), reply[1]
        detail_text = detail.decode() if isinstance(detail, bytes) else str(detail)
        return AdmissionResult(Admission(code), int(detail_text) if detail_text else 0)
