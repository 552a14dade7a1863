"""Restart delays: exponential, with jitter, capped, and never giving up."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

#: failures in a row after which a slot marks its pool failing (it keeps being retried)
FAILING_AFTER = 3
#: seconds a process must stay up for its start to count as a success (resets the backoff)
STABLE_AFTER = 10.0


@dataclass(kw_only=True)
class RestartBackoff:
    """Delay before a slot's next start after quick failures.

    The n-th failure in a row waits ``initial * 2**(n-1)`` seconds, capped at ``maximum``, times a
    jitter factor in [0.8, 1.0] so that slots failing together (a Redis or config problem) do not
    restart in lockstep; the range keeps successive delays growing until the cap. A process that
    stayed up :data:`STABLE_AFTER` seconds was a success: when it dies (an OOM kill, a crash after
    hours) it is replaced at once, and its failure counts as the first in a row, so a replacement that
    fails quickly again waits ``2 * initial``. Only failures in a row are paced.
    Unlike supervisord's FATAL state there is no last attempt: at the cap, the slot is retried every
    ``maximum`` seconds forever.
    """

    initial: float = 0.5
    maximum: float = 30.0
    failures: int = 0
    last_delay: float = 0.0
    rng: random.Random = field(default_factory=random.Random, repr=False)

    def failed(self, uptime: float) -> float:
        """Record a failure of a process that ran ``uptime`` seconds; return the delay to wait."""
        if uptime >= STABLE_AFTER:
            self.failures = 1
            self.last_delay = 0.0
            return 0.0
        self.failures += 1
        base = min(self.maximum, self.initial * 2 ** (self.failures - 1))
        self.last_delay = base * (0.8 + 0.2 * self.rng.random())
        return self.last_delay

    def succeeded(self) -> None:
        self.failures = 0
        self.last_delay = 0.0

    @property
    def failing(self) -> bool:
        return self.failures >= FAILING_AFTER
