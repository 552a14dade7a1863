"""Token buckets per (tenant, source): how often one webhook source may call the ingress.

A bucket holds at most ``burst`` tokens and gains ``rate`` per second; a delivery takes one. The
buckets live in this process's memory (no Redis round trip for a request that may be junk), so with
several ingress replicas a source may make up to ``replicas × rate`` deliveries per second: the limit
protects the ingress and PostgreSQL from one noisy or hostile source, the tenant's own ``rate_limit``
(checked at enqueue) protects its workers.

**Bounded memory.** At most ``max_keys`` buckets are kept, least recently used first out. A bucket
that falls out starts full when its source returns, which is what it would have refilled to anyway
unless more than ``max_keys`` other sources called in between: the cost of a flood of distinct
sources is that a few buckets forget, never that memory grows.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

#: the buckets kept at once (about 100 bytes each)
MAX_BUCKETS = 10_000


class TokenBuckets:
    """``take(key)``: 0 when a token was taken, else the seconds until one will be there."""

    def __init__(self, rate: float, burst: int, *, max_keys: int = MAX_BUCKETS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not (rate > 0 and math.isfinite(rate)) or burst < 1 or max_keys < 1:
            raise ValueError(f"a token bucket needs a positive rate and burst, not rate={rate!r} burst={burst!r}")
        self.rate = rate
        self.burst = burst
        self.max_keys = max_keys
        self._clock = clock
        #: key -> (tokens left, clock time they were counted at)
        self._buckets: OrderedDict[tuple[str, str], tuple[float, float]] = OrderedDict()

    def take(self, key: tuple[str, str]) -> float:
        now = self._clock()
        tokens, since = self._buckets.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - since) * self.rate)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self.rate
        self._buckets[key] = (tokens, now)  # (re)inserted last: the most recently used
        while len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)
        return wait

    def __len__(self) -> int:
        return len(self._buckets)
