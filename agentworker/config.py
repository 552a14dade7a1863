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
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

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


_TOKENS_RE = re.compile(r"^\s*(\d+)\s*/\s*(m|min|minute|h|hour|d|day)\s*$")
_TOKEN_WINDOWS = {"m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600, "d": 86400, "day": 86400}


@dataclass(frozen=True, slots=True)
class TokenBudget:
    """``tokens`` model tokens (prompt and completion) per sliding window of ``window_s`` seconds."""

    tokens: int
    window_s: int

    @classmethod
    def parse(cls, text: str) -> TokenBudget:
        match = _TOKENS_RE.match(text)
        if not match:
            raise ValueError("must look like 50000/m, 200000/h or 2000000/d")
        tokens = int(match.group(1))
        if tokens < 1:
            raise ValueError("must allow at least one token")
        return cls(tokens=tokens, window_s=_TOKEN_WINDOWS[match.group(2)])

    def __str__(self) -> str:
        return f"{self.tokens}/{ {60: 'm', 3600: 'h', 86400: 'd'}[self.window_s] }"


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
    #: model tokens per sliding window (``200000/h``): over it the tenant's jobs wait (agentworker.llm_budget)
    llm_tokens: str | None = None
    #: model calls of the tenant in flight at once, across every process and host
    llm_concurrency: PositiveInt | None = None

    @field_validator("rate_limit")
    @classmethod
    def _check_rate(cls, value: str | None) -> str | None:
        if value is not None:
            RateLimit.parse(value)
        return value

    @field_validator("llm_tokens")
    @classmethod
    def _check_tokens(cls, value: str | None) -> str | None:
        if value is not None:
            TokenBudget.parse(value)
        return value

    @property
    def token_budget(self) -> TokenBudget | None:
        return TokenBudget.parse(self.llm_tokens) if self.llm_tokens else None

    @property
    def rate(self) -> RateLimit | None:
        return RateLimit.parse(self.rate_limit) if self.rate_limit else None


class PlanQuota(TenantLimits):
    """A named plan (``plans.{name}``): a set of the tenant keys a tenant takes by naming the plan."""

    pool: str | None = None


class TenantQuota(PlanQuota):
    """A tenant named in the quota file: its pool, its plan and its own limits (over its plan's)."""

    plan: str | None = None


class TenantDefaults(TenantLimits):
    """``tenant_defaults``: limits of every tenant, under its own; ``plan`` names the default plan."""

    plan: str | None = None


#: the keys a tenant entry, a plan or a stored override may set (``plan`` apart)
TENANT_KEYS: tuple[str, ...] = ("pool", *TenantLimits.model_fields)


@dataclass(frozen=True, slots=True)
class StoredTenant:
    """A tenant's entry in the tenant store (:mod:`agentworker.tenants`): its plan and its overrides.

    ``overrides`` holds only keys of :data:`TENANT_KEYS`, already validated; ``version`` grows by one at
    every change (it orders the Redis records that carry the entry to every process)."""

    tenant_id: str
    plan: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)
    version: int = 0
    #: the pool and shard the tenant's jobs went to before its last move ("pool:shard"; "" if none):
    #: a worker there still runs a job a producer enqueued just before the move reached it
    previous_queue: str = ""


@dataclass(frozen=True, slots=True)
class ResolvedTenant:
    """A tenant's effective pool and limits, and where each key came from."""

    tenant_id: str
    pool: str
    limits: TenantLimits
    #: key -> source: "tenant_defaults", "plan {name} (tenant_defaults)", "file", "plan {name} (file)",
    #: "plan {name}", "override", or "default_pool" for the pool
    sources: dict[str, str]
    plan: str | None


class QuotaConfig(_Strict):
    """The whole quota file."""

    default_pool: str = "standard"
    pools: dict[str, PoolQuota] = Field(min_length=1)
    plans: dict[str, PlanQuota] = Field(default_factory=dict)
    tenants: dict[str, TenantQuota] = Field(default_factory=dict)
    tenant_defaults: TenantDefaults = Field(default_factory=TenantDefaults)
    _resolved: dict[str, ResolvedTenant] = PrivateAttr(default_factory=dict)

    def resolve(self, tenant_id: str, stored: StoredTenant | None = None) -> ResolvedTenant:
        """The tenant's effective pool and limits. Each key is taken from the highest layer that sets
        it: a stored override, then the stored plan, then the file's tenant entry (its own keys over
        its ``plan``'s), then ``tenant_defaults`` (its own keys over its ``plan``'s); the pool falls
        back to ``default_pool``. A plan or pool the file no longer defines is skipped (its layer is
        empty), so editing the file never leaves a tenant without a pool."""
        if stored is None:
            named = tenant_id in self.tenants
            cached = self._resolved.get(tenant_id if named else "*")
            if cached is None:
                cached = self._resolve(tenant_id, None)
                if len(self._resolved) < 100_000:
                    self._resolved[tenant_id if named else "*"] = cached
            return cached if cached.tenant_id == tenant_id else ResolvedTenant(
                tenant_id, cached.pool, cached.limits, cached.sources, cached.plan)
        return self._resolve(tenant_id, stored)

    def _resolve(self, tenant_id: str, stored: StoredTenant | None) -> ResolvedTenant:
        layers: list[tuple[str, Mapping[str, Any]]] = []
        defaults = self.tenant_defaults
        if defaults.plan and defaults.plan in self.plans:
            layers.append((f"plan {defaults.plan} (tenant_defaults)", _set_keys(self.plans[defaults.plan])))
        layers.append(("tenant_defaults", _set_keys(defaults)))
        quota = self.tenants.get(tenant_id)
        if quota is not None:
            if quota.plan and quota.plan in self.plans:
                layers.append((f"plan {quota.plan} (file)", _set_keys(self.plans[quota.plan])))
            layers.append(("file", _set_keys(quota)))
        plan = quota.plan if quota is not None and quota.plan else defaults.plan
        if stored is not None:
            if stored.plan and stored.plan in self.plans:
                layers.append((f"plan {stored.plan}", _set_keys(self.plans[stored.plan])))
                plan = stored.plan
            layers.append(("override", stored.overrides))
        values: dict[str, Any] = {}
        sources: dict[str, str] = {"pool": "default_pool"}
        for source, layer in layers:
            for key, value in layer.items():
                if value is None or key not in TENANT_KEYS:
                    continue
                if key == "pool" and value not in self.pools:
                    continue
                values[key] = value
                sources[key] = source
        pool = values.pop("pool", self.default_pool)
        return ResolvedTenant(tenant_id, pool, TenantLimits(**values), sources, plan)

    @property
    def default_limits(self) -> TenantLimits:
        """The limits of a tenant the file does not name and the store has no entry for."""
        return self.resolve("").limits

    @property
    def default_tenant_pool(self) -> str:
        """The pool of a tenant the file does not name: the default plan's, else ``default_pool``."""
        return self.resolve("").pool

    def pool_of(self, tenant_id: str, stored: StoredTenant | None = None) -> str:
        return self.resolve(tenant_id, stored).pool

    def limits_of(self, tenant_id: str, stored: StoredTenant | None = None) -> TenantLimits:
        """The tenant's limits, key by key from the highest layer setting it (:meth:`resolve`)."""
        return self.resolve(tenant_id, stored).limits

    def job_timeout_for(self, tenant_id: str, stored: StoredTenant | None = None) -> float:
        """The pool's job timeout, tightened by the tenant's own when it has one."""
        resolved = self.resolve(tenant_id, stored)
        pool_timeout = self.pools[resolved.pool].job_timeout
        tenant_timeout = resolved.limits.job_timeout
        return min(pool_timeout, tenant_timeout) if tenant_timeout else pool_timeout

    def check_stored(self, tenant_id: str, plan: str | None, overrides: Mapping[str, Any]) -> StoredTenant:
        """Validate a tenant store entry with the quota file's rules; raise :class:`ConfigError`
        listing every problem by its path (``overrides.max_concurrency: must be >= 1 (got 0)``)."""
        source = f"tenant {tenant_id}"
        problems: list[str] = []
        if plan is not None and (not isinstance(plan, str) or plan not in self.plans):
            known = ", ".join(sorted(self.plans)) or "none"
            problems.append(f"plan: names plan {plan!r}, which is not defined (plans: {known})")
        if not isinstance(overrides, Mapping):
            raise ConfigError(source, ["overrides: must be a mapping"])
        clean: dict[str, Any] = {}
        try:
            checked = PlanQuota.model_validate(dict(overrides))
        except ValidationError as exc:
            for error in exc.errors():
                for line in _format_pydantic_error(error):
                    problems.append(f"overrides.{line}")
        else:
            clean = _set_keys(checked)
        pool = clean.get("pool")
        if pool is not None and pool not in self.pools:
            problems.append(f"overrides.pool: names pool {pool!r}, which is not defined")
        if problems:
            raise ConfigError(source, problems)
        stored = StoredTenant(tenant_id, plan, clean)
        resolved = self.resolve(tenant_id, stored)
        timeout = resolved.limits.job_timeout
        pool_timeout = self.pools[resolved.pool].job_timeout
        if timeout is not None and timeout > pool_timeout and resolved.sources.get("job_timeout") == "override":
            raise ConfigError(source, [f"overrides.job_timeout: {timeout:g}s is above pool {resolved.pool!r}'s "
                                       f"job_timeout {pool_timeout:g}s"])
        return stored


def _set_keys(model: BaseModel) -> dict[str, Any]:
    """The tenant keys a layer sets (``None``: not set), ``plan`` apart."""
    return {key: value for key, value in model.model_dump(exclude={"plan"}).items()
            if value is not None and key in TENANT_KEYS}


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
    plans = data.get("plans") if isinstance(data.get("plans"), dict) else {}
    assert isinstance(plans, dict)

    def plan_pool(name: object) -> Any:
        plan = plans.get(name) if isinstance(name, str) else None
        return plan.get("pool") if isinstance(plan, dict) else None

    defaults = data.get("tenant_defaults")
    default_plan = defaults.get("plan") if isinstance(defaults, dict) else None
    if default_plan is not None and default_plan not in plans:
        problems.append(f"tenant_defaults.plan: names plan {default_plan!r}, which is not defined")
    for name, plan in plans.items():
        where = f"plans.{name}"
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            problems.append(f"{where}: plan name must match {NAME_PATTERN}")
        if not isinstance(plan, dict):
            continue
        pool_name = plan.get("pool") or plan_pool(default_plan) or default_pool
        if pool_name not in pools:
            if plan.get("pool") is not None:
                problems.append(f"{where}.pool: names pool {pool_name!r}, which is not defined")
            continue
        timeout = _as_number(plan.get("job_timeout"))
        if timeout is not None and timeout > pool_timeout(pool_name):
            problems.append(f"{where}.job_timeout: {timeout:g}s is above pool {pool_name!r}'s job_timeout "
                            f"{pool_timeout(pool_name):g}s")
    tenants = data.get("tenants") if isinstance(data.get("tenants"), dict) else {}
    assert isinstance(tenants, dict)
    for tenant_id, quota in tenants.items():
        where = f"tenants.{tenant_id}"
        if not isinstance(tenant_id, str) or not _NAME_RE.fullmatch(tenant_id):
            problems.append(f"{where}: tenant id must match {NAME_PATTERN}")
        if not isinstance(quota, dict):
            continue
        if quota.get("plan") is not None and quota.get("plan") not in plans:
            problems.append(f"{where}.plan: names plan {quota.get('plan')!r}, which is not defined")
        pool_name = quota.get("pool") or plan_pool(quota.get("plan")) or plan_pool(default_plan) or default_pool
        if pool_name not in pools:
            if quota.get("pool") is not None:
                problems.append(f"{where}.pool: names pool {pool_name!r}, which is not defined")
            continue
        timeout = _as_number(quota.get("job_timeout"))
        if timeout is not None and timeout > pool_timeout(pool_name):
            problems.append(f"{where}.job_timeout: {timeout:g}s is above pool {pool_name!r}'s job_timeout "
                            f"{pool_timeout(pool_name):g}s")
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
