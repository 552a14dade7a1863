"""Reloading the quota file: noticing a change, validating it, and working out what it changes.

A Kubernetes ConfigMap mounted as a volume is updated by swapping a symlink (``..data``), so neither
the mtime of the path nor inotify on it is reliable: the watcher compares a hash of the content.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agentworker.config import PoolQuota, QuotaConfig, QuotaFileWatch

__all__ = ["QuotaFileWatch", "ReloadPlan", "ReloadResult", "plan_reload", "worker_settings_differ"]

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
