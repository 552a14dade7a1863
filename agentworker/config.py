"""The quota file: pools of tenants, their processes, concurrency and timeouts.

The file is YAML (a Kubernetes ConfigMap in production)::

    default_pool: standard
    pools:
      standard: {shards: 8, processes: 2, concurrency: 20, job_timeout: 300}
    tenants:
      acme: {pool: premium, max_concurrency: 10, max_pending: 1000, job_timeout: 120, rate_limit: 50/s}

Every key is validated once, here, at the edge. Unknown keys and impossible values are refused with
the dotted path of the offending key (``pools.standard.concurrency: must be >= 1``); all errors of a
file are reported together so an operator fixes them in one pass.

``tenant_defaults`` (optional) holds the limits of tenants the file does not name, so a pool shared by
thousands of small tenants still keeps each of them within bounds.

Every process reads the file the same way (:meth:`QuotaFileWatch.load`, which :func:`load_config` uses):
at most ``AGENTWORKER_MAX_CONFIG_BYTES``, strict UTF-8, through the safe YAML loader
(:mod:`agentworker.safe_yaml`), then validated here. So the supervisor, its workers, the client and
``check-config`` accept or refuse the very same files, and a refusal is always a :class:`ConfigError`.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agentworker.errors import AgentWorkerError
from agentworker.safe_yaml import DocumentRefused, decode_utf8, load_yaml, one_line
from agentworker.settings import InputLimits

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_RATE_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
               "h": 3600.0, "hour": 3600.0}

DEFAULT_CONFIG_RESOURCE = "default_quotas.yaml"


class ConfigError(AgentWorkerError):
    """The quota file cannot be used. ``errors`` holds one ``path: message`` line per problem."""

    def __init__(self, source: str, errors: list[str]) -> None:
        self.source = source
        self.errors = errors
        super().__init__(f"{source}: " + "; ".join(errors))


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``count`` jobs per ``period_s`` seconds, enforced as a token bucket of ``count`` tokens."""

    count: float
    period_s: float

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        match = _RATE_RE.match(text)
        if not match:
            raise ValueError("must look like 50/s, 600/m or 1000/h")
        count = float(match.group(1))
        if count <= 0:
            raise ValueError("must allow at least some jobs (count > 0)")
        return cls(count=count, period_s=_RATE_UNITS[match.group(2)])

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}[self.period_s]
        count = int(self.count) if self.count.is_integer() else self.count
        return f"{count}/{unit}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


PositiveInt = Annotated[int, Field(ge=1)]


class PoolQuota(_Strict):
    """One quota profile: how many processes serve a pool's shards and how hard each may work."""

    shards: Annotated[int, Field(ge=1, le=1024)] = 8
    processes: Annotated[int, Field(ge=1, le=256)] = 2
    concurrency: Annotated[int, Field(ge=1, le=10_000)] = 20
    job_timeout: Annotated[float, Field(gt=0, le=86_400)] = 300
    max_tries: Annotated[int, Field(ge=1, le=100)] = 3
    memory_limit_mb: Annotated[int, Field(ge=32)] = 512
    max_jobs_per_process: PositiveInt = 10_000
    hang_timeout: Annotated[float, Field(gt=0, le=3600)] = 30
    #: re-runs a job gets after its worker died running it (kill -9, OOM, segfault, a hung loop); one more
    #: such death and the job is failed as JobPoisoned. Separate from max_tries, which counts the task's own
    #: failures and time-outs.
    max_crash_retries: Annotated[int, Field(ge=0, le=100)] = 5


class TenantLimits(_Strict):
    """Per-tenant limits; every one is optional (absent means: only the pool's limits apply)."""

    max_concurrency: PositiveInt | None = None
    max_pending: Annotated[int, Field(ge=0)] | None = None
    job_timeout: Annotated[float, Field(gt=0)] | None = None
    rate_limit: str | None = None
    #: fair-share weight inside the tenant's shard: a tenant of weight 2 gets twice the job starts of a
    #: tenant of weight 1 when both have more work than the pool can run (default 1)
    weight: Annotated[float, Field(gt=0, le=1000)] | None = None

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value is not None:
            RateLimit.parse(value)
        return value

    @property
    def rate(self) -> RateLimit | None:
        return RateLimit.parse(self.rate_limit) if self.rate_limit else None


class TenantQuota(TenantLimits):
    """A tenant named in the quota file: its pool and its own limits."""

    pool: str | None = None


class QuotaConfig(_Strict):
    """The whole quota file."""

    default_pool: str = "standard"
    pools: dict[str, PoolQuota] = Field(min_length=1)
    tenants: dict[str, TenantQuota] = Field(default_factory=dict)
    tenant_defaults: TenantLimits = Field(default_factory=TenantLimits)

    def pool_of(self, tenant_id: str) -> str:
        quota = self.tenants.get(tenant_id)
        return (quota.pool if quota and quota.pool else None) or self.default_pool

    def limits_of(self, tenant_id: str) -> TenantLimits:
        """The tenant's own limits, falling back key by key to ``tenant_defaults``."""
        quota = self.tenants.get(tenant_id)
        if quota is None:
            return self.tenant_defaults
        merged = self.tenant_defaults.model_dump()
        merged.update({k: v for k, v in quota.model_dump(exclude={"pool"}).items() if v is not None})
        return TenantLimits(**merged)

    def job_timeout_for(self, tenant_id: str) -> float:
        """The pool's job timeout, tightened by the tenant's own when it has one."""
        pool_timeout = self.pools[self.pool_of(tenant_id)].job_timeout
        tenant_timeout = self.limits_of(tenant_id).job_timeout
        return min(pool_timeout, tenant_timeout) if tenant_timeout else pool_timeout


def _as_number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _reference_problems(data: dict[str, Any]) -> list[str]:
    """Problems across keys (undefined pools, timeouts above the pool's, bad names), checked on the raw
    data so they are reported together with per-field errors rather than after those are fixed."""
    problems: list[str] = []
    pools = data.get("pools") if isinstance(data.get("pools"), dict) else {}
    assert isinstance(pools, dict)
    default_pool = data.get("default_pool", QuotaConfig.model_fields["default_pool"].default)

    def pool_timeout(name: str) -> float:
        raw = pools.get(name)
        value = _as_number(raw.get("job_timeout")) if isinstance(raw, dict) else None
        return value if value is not None else float(PoolQuota.model_fields["job_timeout"].default)

    for name in pools:
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            problems.append(f"pools.{name}: pool name must match {NAME_PATTERN}")
    if pools and default_pool not in pools:
        problems.append(f"default_pool: names pool {default_pool!r}, which is not defined")
    tenants = data.get("tenants") if isinstance(data.get("tenants"), dict) else {}
    assert isinstance(tenants, dict)
    for tenant_id, quota in tenants.items():
        where = f"tenants.{tenant_id}"
        if not isinstance(tenant_id, str) or not _NAME_RE.fullmatch(tenant_id):
            problems.append(f"{where}: tenant id must match {NAME_PATTERN}")
        if not isinstance(quota, dict):
            continue
        pool_name = quota.get("pool") or default_pool
        if pool_name not in pools:
            if quota.get("pool") is not None:
                problems.append(f"{where}.pool: names pool {pool_name!r}, which is not defined")
            continue
        timeout = _as_number(quota.get("job_timeout"))
        if timeout is not None and timeout > pool_timeout(pool_name):
            problems.append(f"{where}.job_timeout: {timeout:g}s is above pool {pool_name!r}'s job_timeout "
                            f"{pool_timeout(pool_name):g}s")
    defaults = data.get("tenant_defaults")
    default_timeout = _as_number(defaults.get("job_timeout")) if isinstance(defaults, dict) else None
    if default_timeout is not None:
        for pool_name in pools:
            if default_timeout > pool_timeout(pool_name):
                problems.append(f"tenant_defaults.job_timeout: {default_timeout:g}s is above pool "
                                f"{pool_name!r}'s job_timeout {pool_timeout(pool_name):g}s")
    return problems


_MESSAGES: dict[str, str] = {
    "extra_forbidden": "unknown key",
    "missing": "required key is missing",
    "int_parsing": "must be an integer",
    "int_from_float": "must be a whole number",
    "float_parsing": "must be a number",
    "bool_parsing": "must be true or false",
    "string_type": "must be a string",
    "dict_type": "must be a mapping",
    "model_type": "must be a mapping",
    "too_short": "must not be empty",
}


def _format_pydantic_error(error: Any) -> list[str]:
    loc = ".".join(str(part) for part in error["loc"])
    kind = error["type"]
    ctx = error.get("ctx") or {}
    if kind == "greater_than_equal":
        message = f"must be >= {ctx['ge']:g}"
    elif kind == "greater_than":
        message = f"must be > {ctx['gt']:g}"
    elif kind == "less_than_equal":
        message = f"must be <= {ctx['le']:g}"
    elif kind == "value_error":
        message = str(ctx.get("error", error["msg"]))
    else:
        message = _MESSAGES.get(kind, error["msg"])
    got = error.get("input")
    if kind not in ("extra_forbidden", "missing", "value_error") and not isinstance(got, dict | list):
        message += f" (got {got!r})"
    return [f"{loc or '(top level)'}: {message}"]


def parse_config(data: Any, *, source: str = "<quota file>") -> QuotaConfig:
    """Validate already-parsed YAML data; raise :class:`ConfigError` listing every problem."""
    if not isinstance(data, dict):
        raise ConfigError(source, ["(top level): must be a mapping with a 'pools' key"])
    errors: list[str] = []
    config: QuotaConfig | None = None
    try:
        config = QuotaConfig.model_validate(data)
    except ValidationError as exc:
        for error in exc.errors():
            errors.extend(_format_pydantic_error(error))
    errors.extend(_reference_problems(data))
    if errors or config is None:
        raise ConfigError(source, errors)
    return config


def load_config_text(text: str | bytes, *, source: str = "<quota file>",
                     limits: InputLimits | None = None) -> QuotaConfig:
    """Parse (safe YAML loader, within ``limits``; default: ``AGENTWORKER_MAX_*``) and validate."""
    limits = limits or InputLimits.from_env()
    try:
        data = load_yaml(text, what="the file", limits=limits, size_limit="max_config_bytes")
    except DocumentRefused as exc:
        raise ConfigError(source, [str(exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError(source, [f"not valid YAML: {one_line(exc)}"]) from None
    try:
        return parse_config(data, source=source)
    except RecursionError:  # parse_config is handed a depth-limited document; this is a last resort
        raise ConfigError(source, ["nested too deeply to validate"]) from None


def default_config_path() -> Path:
    """The quota file shipped inside the package."""
    return Path(str(resources.files("agentworker").joinpath(DEFAULT_CONFIG_RESOURCE)))


def resolve_config_path(path: str | os.PathLike[str] | None = None) -> Path:
    """``--config``, else ``AGENTWORKER_CONFIG``, else the packaged default quota file."""
    if path:
        return Path(path)
    from_env = os.environ.get("AGENTWORKER_CONFIG")
    if from_env:
        return Path(from_env)
    return default_config_path()


def load_config(path: str | os.PathLike[str] | None = None, *, limits: InputLimits | None = None) -> QuotaConfig:
    """Read and validate the quota file (see :func:`resolve_config_path` for which one), exactly as the
    supervisor's reload does. ``limits``: default ``AGENTWORKER_MAX_*`` from the environment."""
    return QuotaFileWatch(resolve_config_path(path), limits=limits).load()


class QuotaFileWatch:
    """Reads the quota file and tells whether its content changed since the last read.

    A Kubernetes ConfigMap mounted as a volume is updated by swapping a symlink (``..data``), so neither
    the mtime of the path nor inotify on it is reliable: the watch compares a hash of the content. Used by
    the supervisor (reload), the client (live admission limits and routing), the workers and the CLI
    (through :func:`load_config`): one way to read the file.

    Reading and validating a large file takes seconds: processes with an event loop call :meth:`load`
    and :meth:`poll` in a thread (``asyncio.to_thread``), never on the loop.
    """

    def __init__(self, path: Path, *, limits: InputLimits | None = None) -> None:
        """``limits``: default ``AGENTWORKER_MAX_*`` from the environment, read at each load (the
        supervisor and its workers share the environment, so they apply the same limits)."""
        self.path = path
        self.limits = limits
        self.seen_hash: str | None = None

    def read(self) -> tuple[bytes | int, str]:
        """``(content, content hash)``; when the file is over ``max_config_bytes`` it is not read: the
        content is its size and the hash is of its size and modification time. Raises
        :class:`ConfigError` if the file cannot be read."""
        limit = (self.limits or InputLimits.from_env()).max_config_bytes
        try:
            with self.path.open("rb") as file:
                stat = os.fstat(file.fileno())
                data = file.read(limit + 1) if stat.st_size <= limit else b""
        except OSError as exc:
            raise ConfigError(str(self.path), [f"cannot read the file: {exc.strerror or exc}"]) from None
        if stat.st_size > limit or len(data) > limit:
            size = max(stat.st_size, len(data))
            return size, f"over {limit} bytes: {size} {stat.st_mtime_ns} {stat.st_ino}"
        return data, hashlib.sha256(data).hexdigest()

    def changed(self) -> bool:
        """True once per new content (a file that cannot be read is no change: a ConfigMap swap can
        briefly leave no file behind the path)."""
        try:
            _data, digest = self.read()
        except ConfigError:
            return False
        return digest != self.seen_hash

    def load(self) -> QuotaConfig:
        """Read and validate; the content counts as seen either way, so a bad file is reported once.
        Any problem (unreadable, too big, not UTF-8, not YAML, too deep, too many aliases, invalid) is
        a :class:`ConfigError`."""
        data, digest = self.read()
        self.seen_hash = digest
        return self._validate(data)

    def poll(self) -> QuotaConfig | None:
        """:meth:`load` if the content changed since the last read, else None (one read either way; a
        file that cannot be read is no change)."""
        try:
            data, digest = self.read()
        except ConfigError:
            return None
        if digest == self.seen_hash:
            return None
        self.seen_hash = digest
        return self._validate(data)

    def _validate(self, data: bytes | int) -> QuotaConfig:
        limits = self.limits or InputLimits.from_env()
        source = str(self.path)
        if isinstance(data, int):
            raise ConfigError(source, [limits.refusal("max_config_bytes", f"the file is {data} bytes")])
        try:
            text = decode_utf8(data, "the file")
        except DocumentRefused as exc:
            raise ConfigError(source, [str(exc)]) from None
        return load_config_text(text, source=source, limits=limits)
