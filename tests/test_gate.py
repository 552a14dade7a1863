from __future__ import annotations

import asyncio

import pytest

from agentworker.pools.gate import ConcurrencyGate


async def test_cap_is_never_exceeded_and_slots_go_round_robin() -> None:
    gate = ConcurrencyGate(2)
    order: list[str] = []
    running = 0
    peak = 0

    async def job(shard: str) -> None:
        nonlocal running, peak
        assert await gate.acquire(shard)
        running += 1
        peak = max(peak, running)
        order.append(shard)
        await asyncio.sleep(0.001)
        running -= 1
        gate.release()

    async def shard_loop(shard: str, jobs: int) -> None:
        # Like a ShardWorker: one job at a time is waiting for a slot per shard.
        tasks = []
        for _ in range(jobs):
            ok = await gate.acquire(shard)
            assert ok
            gate.release()
            tasks.append(asyncio.create_task(job(shard)))
            await asyncio.sleep(0)
        await asyncio.gather(*tasks)

    # Shard "a" is flooded first; "b" and "c" arrive after it has filled the gate.
    await asyncio.gather(shard_loop("a", 30), shard_loop("b", 5), shard_loop("c", 5))
    assert peak <= 2
    assert gate.in_use == 0


async def test_waiting_lines_are_served_in_turn() -> None:
    gate = ConcurrencyGate(1)
    assert await gate.acquire("a")
    granted: list[str] = []

    async def wait(line: str) -> None:
        assert await gate.acquire(line)
        granted.append(line)

    waiters = [asyncio.create_task(wait(line)) for line in ["a", "a", "a", "b", "c"]]
    await asyncio.sleep(0)
    for _ in range(5):
        gate.release()
        await asyncio.sleep(0)
    await asyncio.gather(*waiters)
    # "a" queued three times first, but "b" and "c" each get a turn before a's second and third.
    assert granted == ["a", "b", "c", "a", "a"]


async def test_close_wakes_waiters_with_false_and_refuses_new() -> None:
    gate = ConcurrencyGate(1)
    assert await gate.acquire("a")
    waiter = asyncio.create_task(gate.acquire("b"))
    await asyncio.sleep(0)
    gate.close()
    assert await waiter is False
    assert await gate.acquire("c") is False


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    gate = ConcurrencyGate(1)
    assert await gate.acquire("a")
    waiter = asyncio.create_task(gate.acquire("b"))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    gate.release()
    assert gate.in_use == 0
    assert await gate.acquire("c")


def test_release_without_acquire_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        ConcurrencyGate(1).release()
