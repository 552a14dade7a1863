"""A lock in Redis for work one process of the fleet does at a time (sweeping runs, relaying events).

``SET NX PX`` with a token of our own, deleted only if it still holds that token: after it expired,
another process may hold it. The lock is for load, never for correctness: what it guards must stay
right when two processes run it at once (a lapsed lock, a paused process).
"""

from __future__ import annotations

import uuid

from redis.asyncio import Redis

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
    return redis.call('DEL', KEYS[1])
end
return 0
"""


class RedisLock:
    """``key`` held for ``hold_s`` seconds by whoever :meth:`acquire` s it first."""

    def __init__(self, redis: Redis, key: str, hold_s: float) -> None:
        self.redis = redis
        self.key = key
        self.hold_ms = max(1, int(hold_s * 1000))
        self.token = uuid.uuid4().hex
        self._release = redis.register_script(_RELEASE_LUA)

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.token, nx=True, px=self.hold_ms))

    async def release(self) -> bool:
        """Delete the lock if it still holds our token; True if it did."""
        return bool(await self._release(keys=[self.key], args=[self.token]))
