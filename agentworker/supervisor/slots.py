"""Pools and their numbered slots: the desired state the reconcile loop converges to."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from agentworker.config import PoolQuota
from agentworker.supervisor.backoff import RestartBackoff
from agentworker.supervisor.process import ExitRecord, WorkerHandle


@dataclass(kw_only=True)
class WorkerSlot:
    """One numbered place in a pool, held by one worker process at a time.

    ``current`` serves; ``incoming`` is its replacement while it starts (recycle, memory, reload: the new
    process starts first, and the old one drains only once the new one serves); ``retiring`` are old
    processes draining or being killed.
    """

    pool: str
    index: int
    backoff: RestartBackoff
    #: paces recycles for memory, which would otherwise loop when every new process starts over the limit
    memory_backoff: RestartBackoff
    current: WorkerHandle | None = None
    incoming: WorkerHandle | None = None
    incoming_reason: str | None = None
    retiring: list[WorkerHandle] = field(default_factory=list)
    restarts: int = 0
    last_exit: ExitRecord | None = None
    next_start_at: float = 0.0  # monotonic: when an empty slot may start a process
    replace_not_before: float = 0.0  # monotonic: when a replacement may start
    removed: bool = False  # the slot is going away (pool removed or shrunk): drain, never restart

    def handles(self) -> Iterator[WorkerHandle]:
        if self.current is not None:
            yield self.current
        if self.incoming is not None:
            yield self.incoming
        yield from self.retiring

    def forget(self, handle: WorkerHandle) -> str:
        """Drop a reaped process; return its role (current, incoming, retiring)."""
        if handle is self.current:
            self.current = None
            return "current"
        if handle is self.incoming:
            self.incoming = None
            self.incoming_reason = None
            return "incoming"
        self.retiring = [h for h in self.retiring if h is not handle]
        return "retiring"

    def retire(self, handle: WorkerHandle) -> None:
        """Move a process the supervisor has told to stop out of the current/incoming roles."""
        if handle is self.current:
            self.current = None
        elif handle is self.incoming:
            self.incoming = None
            self.incoming_reason = None
        if handle not in self.retiring:
            self.retiring.append(handle)

    def promote_incoming(self) -> None:
        """The handover: the replacement becomes the slot's current process (the old one is gone or retiring)."""
        self.current, self.incoming, self.incoming_reason = self.incoming, None, None


@dataclass(kw_only=True)
class PoolState:
    name: str
    quota: PoolQuota
    slots: list[WorkerSlot] = field(default_factory=list)
    removed: bool = False

    @property
    def serving(self) -> int:
        return sum(1 for s in self.slots if s.current is not None and s.current.serving)

    @property
    def failing_slots(self) -> list[WorkerSlot]:
        return [s for s in self.slots if s.backoff.failing]

    @property
    def replacing(self) -> bool:
        """A slot of the pool is handing over to a new process (reloads roll one slot at a time)."""
        return any(s.incoming is not None for s in self.slots)
