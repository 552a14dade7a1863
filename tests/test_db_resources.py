"""Process-wide lazy resources of a worker (its database pools)."""

from __future__ import annotations

import asyncio

import pytest

from agentworker.tasks.context import ProcessResources


class _Resource:
    def __init__(self, fail_close: bool = False) -> None:
        self.closed = False
        self.fail_close = fail_close

    async def aclose(self) -> None:
        self.closed = True
        if self.fail_close:
            raise OSError("already gone")


async def test_made_once_on_first_use_retried_after_a_failure_and_closed_quietly() -> None:
    resources = ProcessResources()
    made: list[_Resource] = []
    attempts = 0

    async def factory() -> _Resource:
        nonlocal attempts
        attempts += 1
        if attempts == 1:
            raise ConnectionRefusedError("database down")
        await asyncio.sleep(0.01)
        made.append(_Resource(fail_close=True))
        return made[-1]

    with pytest.raises(ConnectionRefusedError):
        await resources.get("db", factory)
    got = await asyncio.gather(*(resources.get("db", factory) for _ in range(5)))
    assert len(made) == 1 and all(g is made[0] for g in got), "concurrent first uses make it once"
    other = await resources.get("other", lambda: asyncio.sleep(0, _Resource()))
    await resources.aclose()
    assert made[0].closed and other.closed
    await resources.aclose()  # nothing left: a no-op
