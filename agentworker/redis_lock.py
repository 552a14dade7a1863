"""A lock in Redis for work one process of the fleet does at a time (sweeping runs, relaying events).

``SET NX PX`` with a token of our own, deleted only if it still holds that token: after it expired,
another process may hold it. The lock is for load, never for correctness: what it guards must stay
right when two processes run it at once (a lapsed lock, a paused process).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker.db.database import DatabaseError, DatabaseNotMigrated
from agentworker.logs import Logger

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


async def every_interval(attempt: Callable[[], Awaitable[int | None]], *, interval: float, name: str, log: Logger,
                         done: Callable[[int], None], not_migrated_pause_s: float = 0.0) -> None:
    """Call ``attempt`` until cancelled, every ``interval`` seconds times a random factor in [0.5, 1] (the
    fleet's processes do not align), the first time after one pause: the loop of the work one process does
    at a time under a :class:`RedisLock` (sweeping runs, relaying events).

    ``attempt`` returns None when another process holds the lock (no news either way), else how much it
    did (``done`` is called with it when not 0). Never raises: PostgreSQL or Redis down, or a database not
    migrated yet (then ``not_migrated_pause_s`` more seconds), is logged once per outage as ``{name}
    paused`` / ``{name} is off`` and ``{name} resumed`` when it passes; a bug is logged and tried again."""
    failing: str | None = None

    def log_once(message: str, error: str) -> str:
        if failing != message:
            log.warning(message, error=error)
        return message

    while True:
        await asyncio.sleep(interval * random.uniform(0.5, 1.0))
        try:
            count = await attempt()
            if count is None:
                continue
            if failing is not None:
                log.info(f"{name} resumed")
                failing = None
            if count:
                done(count)
        except DatabaseNotMigrated as exc:
            failing = log_once(f"{name} is off until `agentworker migrate` runs", str(exc))
            await asyncio.sleep(not_migrated_pause_s)
        except (DatabaseError, RedisError, OSError) as exc:
            failing = log_once(f"{name} paused; will retry", str(exc) or repr(exc))
        except Exception as exc:  # a bug must not take the worker's jobs down with it
            log.exception(f"{name} failed", error=repr(exc))
