"""Process settings from ``AGENTWORKER_*`` environment variables.

The quota file (:mod:`agentworker.config`) says *what* each tenant and pool may do; these settings say
*where* the services are and how the processes behave. URLs and secrets live here, never in the quota
file (which is a ConfigMap anyone with read access to the namespace can see).

=====================================  ==============================  ==========================================
variable                               default                         meaning
=====================================  ==============================  ==========================================
AGENTWORKER_CONFIG                     packaged default_quotas.yaml    the quota file
AGENTWORKER_REDIS_URL                  redis://127.0.0.1:6379/0        Redis for queues, events, leases
AGENTWORKER_DATABASE_URL               postgresql://postgres@127.0.0.1:5432/postgres   PostgreSQL
AGENTWORKER_LOG_LEVEL                  info                            debug, info, warning, error
AGENTWORKER_LOG_FORMAT                 json                            json (one object per line) or console
AGENTWORKER_SHUTDOWN_GRACE             25                              seconds running jobs get to finish on
                                                                       SIGTERM before they are re-queued
AGENTWORKER_POLL_INTERVAL              0.5                             seconds between queue polls of an idle
                                                                       worker
AGENTWORKER_KEEP_RESULT                86400                           seconds a result (and so an idempotency
                                                                       key) is kept
AGENTWORKER_MAX_PAYLOAD_BYTES          1048576                         largest accepted job payload (JSON)
AGENTWORKER_TENANT_LEASE_TTL           30                              seconds a tenant concurrency lease lives
                                                                       unless renewed (a killed holder's slot
                                                                       comes back after at most this)
AGENTWORKER_JOB_LEASE_TTL              10                              seconds a running job's lease (its
                                                                       in-progress key) lives unless its worker
                                                                       renews it: a job of a worker that died
                                                                       unseen runs again after at most this
AGENTWORKER_EVENT_STREAM_MAXLEN        10000                           events kept per tenant stream (approx.)
AGENTWORKER_TASK_MODULES               (none)                          extra comma-separated modules whose
                                                                       @task functions workers serve
AGENTWORKER_ADMIN_TOKEN                (none)                          bearer token of /admin/*; unset = off
AGENTWORKER_PORT                       8000                            HTTP port of the supervisor (``--port``)
AGENTWORKER_HTTP_HOST                  0.0.0.0                         address the supervisor's HTTP port binds
AGENTWORKER_RUN_DIR                    (a new temporary directory)     where workers write their status files
AGENTWORKER_METRICS_DIR                (a new temporary directory)     prometheus multiprocess files of the
                                                                       workers; locked by one supervisor for
                                                                       its life and emptied when it starts (a
                                                                       second one on it is refused at start)
AGENTWORKER_READY_TIMEOUT              2                               seconds /ready waits for Redis and for
                                                                       PostgreSQL before calling them down
AGENTWORKER_RESTART_BACKOFF_INITIAL    0.5                             seconds before the first restart of a
                                                                       slot; doubles on each quick failure
AGENTWORKER_RESTART_BACKOFF_MAX        30                              ceiling of that delay; a slot that keeps
                                                                       failing is retried this often, forever
AGENTWORKER_CONFIG_POLL_INTERVAL       2                               seconds between checks of the quota
                                                                       file's content (0 = no watching)
AGENTWORKER_WORKER_START_TIMEOUT       60                              seconds a new worker has to write its
                                                                       first heartbeat before it is hung
AGENTWORKER_ZYGOTE                     on                              on: workers are forked from a pre-imported
                                                                       parent (Linux); off: each starts afresh
AGENTWORKER_ZYGOTE_PRELOAD             (none)                          extra comma-separated modules the zygote
                                                                       imports before forking workers
AGENTWORKER_SCHEDULER                  on                              off: this process dispatches no tenant
                                                                       schedules (some other process must)
AGENTWORKER_MAX_CONFIG_BYTES           8388608 (8 MiB)                 largest quota file read (a bigger one is
                                                                       refused before it is parsed)
AGENTWORKER_MAX_YAML_ALIASES           100                             aliases (``*name``) one YAML document may
                                                                       use (quota file, definition, schedule...)
AGENTWORKER_MAX_YAML_DEPTH             64                              nesting levels of one YAML/JSON document
AGENTWORKER_MAX_DEFINITION_BYTES       1048576 (1 MiB)                 largest workflow definition, schedule or
                                                                       integration document (YAML/JSON, also
                                                                       once its aliases are expanded)
AGENTWORKER_MAX_DEFINITION_STEPS       200                             steps of one workflow definition
AGENTWORKER_MAX_TEMPLATE_OUTPUT_BYTES  1048576 (1 MiB)                 what one step's templates may render to
AGENTWORKER_MAX_PROMPT_BYTES           262144 (256 KiB)                largest prompt, message or instructions
                                                                       sent to a model (UTF-8 bytes)
AGENTWORKER_MAX_STEP_OUTPUT_BYTES      4194304 (4 MiB)                 largest output of one workflow step (JSON)
AGENTWORKER_MAX_EVENT_BYTES            65536 (64 KiB)                  largest event put in a tenant's stream;
                                                                       a bigger one keeps a truncated preview
AGENTWORKER_EGRESS_ALLOW               (none)                          comma-separated CIDRs and host:port pairs
                                                                       tenants' calls may reach though internal,
                                                                       e.g. 10.1.2.0/24,crm.internal:8443 (never
                                                                       the service's own Redis, PostgreSQL, port)
=====================================  ==============================  ==========================================
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agentworker.errors import AgentWorkerError
from agentworker.hosts import IPAddress, IPNetwork, ip_literal, split_host_port, unmapped

ENV_PREFIX = "AGENTWORKER_"


class SettingsError(AgentWorkerError, ValueError):
    """An ``AGENTWORKER_*`` variable holds a value that cannot be used."""


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """The size limits on what tenants and operators send in (the ``AGENTWORKER_MAX_*`` rows above).

    The defaults live here; :class:`Settings` has the same fields. Code handed a :class:`Settings` uses
    :attr:`Settings.limits`; code that is not (a template being rendered, a workflow definition parsed by
    a library caller) uses :meth:`from_env`, so every process of one deployment applies the same limits.
    """

    max_config_bytes: int = 8 * 1024 * 1024
    max_yaml_aliases: int = 100
    max_yaml_depth: int = 64
    max_definition_bytes: int = 1024 * 1024
    max_definition_steps: int = 200
    max_template_output_bytes: int = 1024 * 1024
    max_prompt_bytes: int = 256 * 1024
    max_step_output_bytes: int = 4 * 1024 * 1024
    max_event_bytes: int = 64 * 1024

    def __post_init__(self) -> None:
        for f in fields(self):
            value, least = getattr(self, f.name), _LIMIT_MINIMUMS.get(f.name, 1024)
            if not isinstance(value, int) or value < least:
                raise SettingsError(f"{ENV_PREFIX}{f.name.upper()}={value!r}: must be an integer >= {least}")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InputLimits:
        """The limits set by ``AGENTWORKER_MAX_*`` variables (defaults for the others)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw:
                values[f.name] = _convert(name, raw, f.type)
        return cls(**values)

    def refusal(self, name: str, problem: str) -> str:
        """One sentence refusing an input: ``problem``, then the limit it broke and its value."""
        return f"{problem}, over the limit {ENV_PREFIX}{name.upper()}={getattr(self, name)}"


_LIMIT_MINIMUMS = {"max_yaml_aliases": 0, "max_yaml_depth": 8, "max_definition_steps": 1}
_DEFAULT_LIMITS = InputLimits()


@dataclass(frozen=True, kw_only=True)
class Settings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    config: str | None = None
    log_level: str = "info"
    log_format: str = "json"
    shutdown_grace: float = 25.0
    poll_interval: float = 0.5
    keep_result: float = 86_400.0
    max_payload_bytes: int = 1_048_576
    tenant_lease_ttl: float = 30.0
    job_lease_ttl: float = 10.0
    event_stream_maxlen: int = 10_000
    task_modules: tuple[str, ...] = field(default_factory=tuple)
    admin_token: str | None = field(default=None, repr=False)
    port: int = 8000
    http_host: str = "0.0.0.0"  # all interfaces: the probes of Kubernetes come from outside the pod
    run_dir: str | None = None
    metrics_dir: str | None = None
    ready_timeout: float = 2.0
    restart_backoff_initial: float = 0.5
    restart_backoff_max: float = 30.0
    config_poll_interval: float = 2.0
    worker_start_timeout: float = 60.0
    zygote: str = "on"
    scheduler: str = "on"
    zygote_preload: tuple[str, ...] = field(default_factory=tuple)
    max_config_bytes: int = _DEFAULT_LIMITS.max_config_bytes
    max_yaml_aliases: int = _DEFAULT_LIMITS.max_yaml_aliases
    max_yaml_depth: int = _DEFAULT_LIMITS.max_yaml_depth
    max_definition_bytes: int = _DEFAULT_LIMITS.max_definition_bytes
    max_definition_steps: int = _DEFAULT_LIMITS.max_definition_steps
    max_template_output_bytes: int = _DEFAULT_LIMITS.max_template_output_bytes
    max_prompt_bytes: int = _DEFAULT_LIMITS.max_prompt_bytes
    max_step_output_bytes: int = _DEFAULT_LIMITS.max_step_output_bytes
    max_event_bytes: int = _DEFAULT_LIMITS.max_event_bytes
    egress_allow: tuple[str, ...] = field(default_factory=tuple)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read ``AGENTWORKER_*`` variables; ``overrides`` (e.g. from CLI flags) win over them."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            name = ENV_PREFIX + f.name.upper()
            raw = env.get(name)
            if raw is None or raw == "":
                continue
            values[f.name] = _convert(name, raw, f.type)
        values.update({k: v for k, v in overrides.items() if v is not None})
        settings = cls(**values)
        settings._check()
        return settings

    def _check(self) -> None:
        if self.log_level.lower() not in ("debug", "info", "warning", "error"):
            raise SettingsError(f"AGENTWORKER_LOG_LEVEL={self.log_level!r}: use debug, info, warning or error")
        if self.log_format not in ("json", "console"):
            raise SettingsError(f"AGENTWORKER_LOG_FORMAT={self.log_format!r}: use json or console")
        for name in ("shutdown_grace", "keep_result", "config_poll_interval"):
            if getattr(self, name) < 0:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be >= 0")
        if not 1.0 <= self.job_lease_ttl <= 3600:
            raise SettingsError("AGENTWORKER_JOB_LEASE_TTL must be from 1 to 3600 seconds")
        for name in ("poll_interval", "tenant_lease_ttl", "ready_timeout", "restart_backoff_initial",
                     "worker_start_timeout"):
            if getattr(self, name) <= 0:
                raise SettingsError(f"{ENV_PREFIX}{name.upper()} must be > 0")
        if self.max_payload_bytes < 1024:
            raise SettingsError("AGENTWORKER_MAX_PAYLOAD_BYTES must be >= 1024")
        if self.event_stream_maxlen < 1:
            raise SettingsError("AGENTWORKER_EVENT_STREAM_MAXLEN must be >= 1")
        if not 0 <= self.port <= 65535:
            raise SettingsError(f"AGENTWORKER_PORT={self.port}: must be from 0 to 65535")
        if self.restart_backoff_max < self.restart_backoff_initial:
            raise SettingsError("AGENTWORKER_RESTART_BACKOFF_MAX must be >= AGENTWORKER_RESTART_BACKOFF_INITIAL")
        if self.scheduler not in ("on", "off"):
            raise SettingsError(f"AGENTWORKER_SCHEDULER={self.scheduler!r}: use on or off")
        if self.zygote not in ("on", "off"):
            raise SettingsError(f"AGENTWORKER_ZYGOTE={self.zygote!r}: use on or off")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError("AGENTWORKER_REDIS_URL must start with redis://, rediss:// or unix://")
        check_database_url(self.database_url, "AGENTWORKER_DATABASE_URL")
        if self.egress_allow:
            parse_allow_list(self.egress_allow)
        _ = self.limits  # validates the AGENTWORKER_MAX_* values

    @property
    def limits(self) -> InputLimits:
        """The input size limits of these settings."""
        return InputLimits(**{f.name: getattr(self, f.name) for f in fields(InputLimits)})


_SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_SESSION_ATTRS = ("any", "primary", "standby", "prefer-standby", "read-write", "read-only")


def check_database_url(url: str, name: str) -> None:
    """Refuse, in one :class:`SettingsError` sentence naming ``name`` (the variable or option it came
    from), a PostgreSQL URL that asyncpg and psycopg would refuse anyway, but only when first used: the
    wrong scheme, a port that is not a number, a malformed query or an unknown ``sslmode`` or
    ``target_session_attrs``. It is not connected to. The message never includes the password."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
        raise SettingsError(f"{name} is not a valid URL: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres") or not url.startswith(f"{parts.scheme}://"):
        scheme = url.partition("://")[0][:20] if "://" in url else ""
        if scheme:
            raise SettingsError(f"{name} must start with postgresql:// or postgres://, not {scheme}://")
        raise SettingsError(f"{name} is not a URL: it must start with postgresql:// or postgres://")
    hosts = parts.netloc.rpartition("@")[2]
    for host in filter(None, hosts.split(",")):
        if host.startswith("["):
            closing = host.find("]")
            if closing < 0:
                raise SettingsError(f"{name}: host {host!r} opens an IPv6 address with [ and does not close it")
            port = host[closing + 1:].removeprefix(":")
        else:
            port = host.partition(":")[2]
        _check_port(unquote(port), name)
    try:
        query = parse_qs(parts.query, strict_parsing=True) if parts.query else {}
    except ValueError:
        raise SettingsError(f"{name}: the query string (after ?) is not key=value pairs joined by &") from None
    for key, allowed in (("sslmode", _SSL_MODES), ("target_session_attrs", _SESSION_ATTRS)):
        value = query.get(key, [None])[-1]
        if value is not None and value not in allowed:
            raise SettingsError(f"{name}: {key}={value!r} is not one of {', '.join(allowed)}")
    for port in ",".join(query.get("port", [])).split(","):
        _check_port(port, name)


def _check_port(port: str, name: str) -> None:
    if port and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise SettingsError(f"{name}: port {port[:20]!r} is not a number from 1 to 65535")


ALLOW_VARIABLE = "AGENTWORKER_EGRESS_ALLOW"
_HOST_NAME = re.compile(r"^[a-z0-9_]([a-z0-9_.-]{0,252})$")


@dataclass(frozen=True, slots=True)
class AllowList:
    """What ``AGENTWORKER_EGRESS_ALLOW`` opens to tenants (the egress guard, :mod:`agentworker.egress`)."""

    networks: tuple[IPNetwork, ...] = ()
    #: (address, port) pairs
    endpoints: frozenset[tuple[IPAddress, int]] = frozenset()
    #: (name, port) pairs
    names: frozenset[tuple[str, int]] = frozenset()


def parse_allow_list(entries: Iterable[str]) -> AllowList:
    """``AGENTWORKER_EGRESS_ALLOW``'s entries; :class:`SettingsError` names a bad one."""
    networks: list[IPNetwork] = []
    endpoints: set[tuple[IPAddress, int]] = set()
    names: set[tuple[str, int]] = set()
    for raw in entries:
        entry = raw.strip()
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        host, port = split_host_port(entry)
        if port is None or not host:
            raise SettingsError(f"{ALLOW_VARIABLE}: {entry!r} is neither a CIDR (10.1.2.0/24) nor a host:port "
                                "(crm.internal:8443)")
        literal = ip_literal(host)
        if literal is not None:
            endpoints.add((unmapped(literal), port))
        elif _HOST_NAME.match(host):
            names.add((host, port))
        else:
            raise SettingsError(f"{ALLOW_VARIABLE}: {entry!r} does not name a host")
    return AllowList(tuple(networks), frozenset(endpoints), frozenset(names))


def _convert(name: str, raw: str, kind: Any) -> Any:
    kind = str(kind)
    try:
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("int"):
            return int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not a number") from None
    if kind.startswith("tuple"):
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw
