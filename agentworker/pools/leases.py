"""Tenant ``max_concurrency`` across every worker process and supervisor replica.

A Redis sorted set per tenant holds one lease per running job (member: ``{job id}@{holder}``, score:
expiry in ms of Redis' own clock). Taking one prunes expired leases and adds one if fewer than the cap
remain, in the same script that claims the job, so concurrent workers cannot overshoot. Holders renew
their leases every third of the TTL; a holder killed with SIGKILL stops renewing and its lease lapses
after at most the TTL, with nobody's help. A job that finds its tenant at the cap is left in its queue
for a later poll (deferred, not failed, and without spending one of its tries).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import keys
from agentworker.logs import get_logger

_RENEW_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  redis.call('ZADD', key, 'XX', now + ttl, ARGV[i + 1])
  redis.call('PEXPIRE', key, ttl * 2)
end
return #KEYS
"""

log = get_logger(__name__)


class TenantLeases:
    """The leases this process holds. They are taken atomically with the job's claim (see
    ``pools/arq_internals.py``); this class renews and releases them."""

    def __init__(self, redis: Redis, ttl_s: float = 30.0) -> None:
        self.redis = redis
        self.ttl_ms = max(1, int(ttl_s * 1000))
        # Members are per holder, so a process that reads a job another one runs never touches its lease.
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._renew = redis.register_script(_RENEW_LUA)
        self._held: dict[str, str] = {}  # job id -> tenant

    @property
    def held(self) -> int:
        return len(self._held)

    def member(self, job_id: str) -> str:
        return f"{job_id}@{self.holder}"

    def track(self, tenant_id: str, job_id: str) -> None:
        self._held[job_id] = tenant_id

    async def release(self, job_id: str) -> None:
        tenant_id = self._held.pop(job_id, None)
        if tenant_id is not None:
            await self.redis.zrem(keys.tenant_leases(tenant_id), self.member(job_id))

    async def renew_all(self) -> None:
        held = list(self._held.items())
        if held:
            await self._renew(keys=[keys.tenant_leases(t) for _, t in held],
                              args=[self.ttl_ms, *[self.member(job_id) for job_id, _ in held]])

    async def renew_forever(self) -> None:
        """Renew held leases every third of the TTL until cancelled; Redis errors are logged, not fatal."""
        interval = self.ttl_ms / 3000
        while True:
            await asyncio.sleep(interval)
            try:
                await self.renew_all()
            except RedisError as exc:
                log.warning("tenant lease renewal failed", error=str(exc))

    async def release_all(self) -> None:
        for job_id in list(self._held):
            with contextlib.suppress(RedisError):
                await self.release(job_id)
