"""Finishes of jobs that end in the same event-loop turn go to Redis in one round trip.

Each finish stays its own script call (atomic per job, see ``agentworker/lua/finish.lua``); what is
shared is the trip: calls made while a batch is being assembled are sent together in one pipeline (no
MULTI), and each caller gets its own reply or error. Under load many jobs end in the same turn (a batch
claimed together tends to finish together); when idle, a finish waits for nothing but one loop turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from redis.asyncio import Redis
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError


class ScriptBatcher:
    """Runs one script for many callers, one pipeline per event-loop turn."""

    def __init__(self, redis: Redis, script: AsyncScript) -> None:
        self.redis = redis
        self.script = script
        self._pending: list[tuple[list[Any], list[Any], asyncio.Future[Any]]] = []
        self._flushing: set[asyncio.Task[None]] = set()

    async def __call__(self, *, keys: list[Any], args: list[Any]) -> Any:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((keys, args, future))
        if len(self._pending) == 1:
            task = asyncio.get_running_loop().create_task(self._flush())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        return await future

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # let every job ending in this turn join the batch
        batch, self._pending = self._pending, []
        if len(batch) == 1:
            keys, args, future = batch[0]
            try:
                result = await self.script(keys=keys, args=args)
            except Exception as exc:
                if not future.done():
                    future.set_exception(exc)
            else:
                if not future.done():
                    future.set_result(result)
            return
        try:
            # EVALSHA straight into the pipeline: redis-py's own script support would first send a SCRIPT
            # EXISTS with every batch. A Redis that lost the script (restarted) answers NOSCRIPT: it is
            # loaded and those calls are sent again.
            async with self.redis.pipeline(transaction=False) as pipe:
                for keys, args, _ in batch:
                    pipe.evalsha(self.script.sha, len(keys), *keys, *args)
                results = await pipe.execute(raise_on_error=False)
            missing = [i for i, result in enumerate(results) if isinstance(result, NoScriptError)]
            if missing:
                await self.redis.script_load(self.script.script)
                async with self.redis.pipeline(transaction=False) as pipe:
                    for i in missing:
                        keys, args, _ = batch[i]
                        pipe.evalsha(self.script.sha, len(keys), *keys, *args)
                    for i, result in zip(missing, await pipe.execute(raise_on_error=False), strict=True):
                        results[i] = result
        except Exception as exc:  # the whole trip failed (connection lost): every caller hears it
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, _, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
