"""The process-wide cap on jobs running at once, shared by every shard queue of a worker process.

ARQ caps jobs per ``Worker`` (one per queue); a process serving eight shards with ``max_jobs=20`` would
run 160 jobs. :class:`ConcurrencyGate` is the one cap of the process. When it is full, each shard with
work waits in its own line and freed slots go to the lines in turn (round-robin), so a flooded shard
cannot starve the others: every shard that has work gets a slot per round.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Hashable


class ConcurrencyGate:
    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self._limit = limit
        self._in_use = 0
        self._lines: OrderedDict[Hashable, deque[asyncio.Future[bool]]] = OrderedDict()
        self._closed = False

    @property
    def limit(self) -> int:
        return self._limit

    @property
    def in_use(self) -> int:
        return self._in_use

    @property
    def closed(self) -> bool:
        return self._closed

    def waiting(self) -> int:
        return sum(len(line) for line in self._lines.values())

    async def acquire(self, line: Hashable) -> bool:
        """Take a slot for ``line`` (a shard); False if the gate was closed meanwhile."""
        if self._closed:
            return False
        if self._in_use < self._limit and not self._lines:
            self._in_use += 1
            return True
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._lines.setdefault(line, deque()).append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled() and future.result():
                self.release()  # granted and cancelled in the same tick: hand the slot on
            else:
                self._forget(line, future)
            raise

    def take_free(self, most: int) -> int:
        """Take up to ``most`` more slots at once, only those nobody is waiting for; return how many."""
        if self._closed or self._lines or most <= 0:
            return 0
        taken = min(most, self._limit - self._in_use)
        if taken > 0:
            self._in_use += taken
        return max(0, taken)

    def release(self) -> None:
        """Return a slot; it goes to the next line in round-robin order."""
        if self._in_use <= 0:
            raise RuntimeError("release() without a matching acquire()")
        self._in_use -= 1
        self._grant()

    def close(self) -> None:
        """Refuse new slots and wake every waiter with False (used when draining)."""
        self._closed = True
        for line in self._lines.values():
            for future in line:
                if not future.done():
                    future.set_result(False)
        self._lines.clear()

    def _grant(self) -> None:
        while self._lines and self._in_use < self._limit and not self._closed:
            key, line = next(iter(self._lines.items()))
            future = line.popleft()
            if line:
                self._lines.move_to_end(key)  # this line had its turn; the others go first
            else:
                del self._lines[key]
            if future.done():
                continue
            self._in_use += 1
            future.set_result(True)

    def _forget(self, line: Hashable, future: asyncio.Future[bool]) -> None:
        waiting = self._lines.get(line)
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self._lines[line]
