"""Reloading the quota file: noticing a change, validating it, and working out what it changes.

A Kubernetes ConfigMap mounted as a volume is updated by swapping a symlink (``..data``), so neither
the mtime of the path nor inotify on it is reliable: the watcher compares a hash of the content.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agentworker.config import ConfigError, PoolQuota, QuotaConfig, load_config_text

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


class QuotaFileWatch:
    """Reads the quota file and tells whether its content changed since the last read."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen_hash: str | None = None

    def read(self) -> tuple[str, str]:
        """``(text, content hash)``; raises :class:`ConfigError` if the file cannot be read."""
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise ConfigError(str(self.path), [f"cannot read the file: {exc.strerror or exc}"]) from None
        return data.decode("utf-8", errors="replace"), hashlib.sha256(data).hexdigest()

    def changed(self) -> bool:
        """True once per new content (a file that cannot be read is no change: a ConfigMap swap can
        briefly leave no file behind the path)."""
        try:
            _text, digest = self.read()
        except ConfigError:
            return False
        return digest != self.seen_hash

    def load(self) -> QuotaConfig:
        """Read and validate; the content counts as seen either way, so a bad file is reported once."""
        text, digest = self.read()
        self.seen_hash = digest
        return load_config_text(text, source=str(self.path))
