"""Reloading the quota file: noticing a change, validating it, and working out what it changes.

A Kubernetes ConfigMap mounted as a volume is updated by swapping a symlink (``..data``), so neither
the mtime of the path nor inotify on it is reliable: the watcher (:class:`~agentworker.config.QuotaFileWatch`,
in :mod:`agentworker.config` because the workers, the client and the CLI read the file through it too)
compares a hash of the content.

The file is read and validated in a thread (:class:`QuotaFileRead`): a big file takes seconds to parse,
and the supervisor's loop must go on answering ``/health`` and reaping workers meanwhile. It is
validated by the very function the workers use on SIGHUP, so a file the supervisor accepts is one they
accept, and one it refuses is never signalled to them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentworker.config import ConfigError, PoolQuota, QuotaConfig, QuotaFileWatch

__all__ = ["QuotaFileRead", "QuotaFileWatch", "ReloadPlan", "ReloadResult", "plan_reload",
           "worker_settings_differ"]

#: the pool settings a worker process reads at start; changing one means replacing the process.
#: The others (processes, memory_limit_mb, max_jobs_per_process, hang_timeout) are the supervisor's.
WORKER_POOL_FIELDS = ("shards", "concurrency", "job_timeout", "max_tries")


def worker_settings_differ(a: PoolQuota, b: PoolQuota) -> bool:
    return any(getattr(a, name) != getattr(b, name) for name in WORKER_POOL_FIELDS)


@dataclass(frozen=True, slots=True)
class ReloadPlan:
    """What a new quota file changes for the supervisor."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    #: pool -> (old process count, new process count)
    resized: dict[str, tuple[int, int]] = field(default_factory=dict)
    #: pools whose processes must be replaced one by one (worker settings changed)
    replaced: tuple[str, ...] = ()
    tenants_changed: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"added_pools": list(self.added), "removed_pools": list(self.removed),
                "resized_pools": {k: list(v) for k, v in self.resized.items()},
                "replaced_pools": list(self.replaced), "tenants_changed": self.tenants_changed}


def plan_reload(old: QuotaConfig, new: QuotaConfig) -> ReloadPlan:
    common = sorted(set(old.pools) & set(new.pools))
    return ReloadPlan(
        added=tuple(sorted(set(new.pools) - set(old.pools))),
        removed=tuple(sorted(set(old.pools) - set(new.pools))),
        resized={name: (old.pools[name].processes, new.pools[name].processes) for name in common
                 if old.pools[name].processes != new.pools[name].processes},
        replaced=tuple(name for name in common if worker_settings_differ(old.pools[name], new.pools[name])),
        tenants_changed=(old.tenants != new.tenants or old.tenant_defaults != new.tenant_defaults
                         or old.default_pool != new.default_pool),
    )


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """The outcome of one reload attempt (what ``POST /admin/reload`` answers)."""

    ok: bool
    trigger: str
    errors: tuple[str, ...] = ()
    plan: ReloadPlan | None = None

    def as_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"ok": self.ok, "trigger": self.trigger}
        if self.errors:
            body["errors"] = list(self.errors)
        if self.plan is not None:
            body["changes"] = self.plan.as_dict()
        return body


@dataclass(slots=True)
class _Reading:
    trigger: str
    waiting: list[asyncio.Future[ReloadResult] | None]
    outcome: asyncio.Future[QuotaConfig | ConfigError | None]


class QuotaFileRead:
    """At most one read of the quota file at a time, in a thread; the loop collects its outcome.

    :meth:`start` begins a read (``only_if_changed``: the poll of the file watcher, which reads nothing
    new most of the time); the loop is woken when it ends, and :meth:`take` then hands over the trigger,
    the futures waiting for the answer and the outcome: the new config, the :class:`ConfigError` that
    refuses the file (any failure at all becomes one: a reload never raises), or None (unchanged).
    """

    def __init__(self, watch: QuotaFileWatch, wake: Callable[[], None]) -> None:
        self.watch = watch
        self._wake = wake
        self._reading: _Reading | None = None

    @property
    def busy(self) -> bool:
        return self._reading is not None and not self._reading.outcome.done()

    def start(self, trigger: str, waiting: list[asyncio.Future[ReloadResult] | None], *,
              only_if_changed: bool = False) -> None:
        assert not self.busy, "one read at a time"
        read = self.watch.poll if only_if_changed else self.watch.load
        outcome = asyncio.ensure_future(asyncio.to_thread(self._read, read))
        outcome.add_done_callback(lambda _done: self._wake())
        self._reading = _Reading(trigger, waiting, outcome)

    def take(self) -> tuple[str, list[asyncio.Future[ReloadResult] | None], QuotaConfig | ConfigError | None] | None:
        """The finished read, once (None while none has finished)."""
        reading = self._reading
        if reading is None or not reading.outcome.done():
            return None
        self._reading = None
        return reading.trigger, reading.waiting, reading.outcome.result()

    def _read(self, read: Callable[[], QuotaConfig | None]) -> QuotaConfig | ConfigError | None:
        try:
            return read()
        except ConfigError as exc:
            return exc
        except Exception as exc:  # a bug in validation must not stop reloads, nor the loop
            return ConfigError(str(self.watch.path), [f"cannot load the file: {type(exc).__name__}: {exc}"])
