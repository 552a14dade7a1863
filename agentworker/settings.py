"""Process settings from ``AGENTWORKER_*`` environment variables.

The quota file (:mod:`agentworker.config`) says *what* each tenant and pool may do; these settings say
*where* the services are and how the processes behave. URLs and secrets live here, never in the quota
file (which is a ConfigMap anyone with read access to the namespace can see).

Every setting is declared once, below, as a field of :class:`Settings` (or :class:`InputLimits`) with
its type, default, bound and meaning (:func:`setting`); :func:`reference` reads those declarations, and
the README's "Settings (environment)" table and ``deploy/.env.example`` are checked against it by the
tests (``python -m agentworker.settings`` prints the README table).
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from agentworker.errors import AgentWorkerError
from agentworker.hosts import IPAddress, IPNetwork, ip_literal, split_host_port, unmapped

ENV_PREFIX = "AGENTWORKER_"


def setting(default: Any = None, meaning: str = "", *, shown: str | None = None, ge: float | None = None,
            gt: float | None = None, le: float | None = None, choices: tuple[str, ...] = (),
            factory: Any = None, secret: bool = False) -> Any:
    """A setting's declaration: its default (``shown`` when the value itself says little), bound
    (``ge``/``gt``/``le`` for numbers, ``choices`` for words) and meaning. :meth:`Settings.from_env`
    enforces the bound; :func:`reference` documents all of it."""
    metadata = {"meaning": meaning, "shown": shown, "ge": ge, "gt": gt, "le": le, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata, repr=not secret)
    return field(default=default, metadata=metadata, repr=not secret)


class SettingsError(AgentWorkerError, ValueError):
    """An ``AGENTWORKER_*`` variable holds a value that cannot be used."""


@dataclass(frozen=True, kw_only=True)
class InputLimits:
    """The size limits on what tenants and operators send in (the ``AGENTWORKER_MAX_*`` rows above).

    The defaults live here; :class:`Settings` has the same fields. Code handed a :class:`Settings` uses
    :attr:`Settings.limits`; code that is not (a template being rendered, a workflow definition parsed by
    a library caller) uses :meth:`from_env`, so every process of one deployment applies the same limits.
    """

    max_config_bytes: int = setting(8 * 1024 * 1024, "largest quota file read (a bigger one is refused before it "
                                    "is parsed)", shown="8388608 (8 MiB)", ge=1024)
    max_yaml_aliases: int = setting(100, "aliases (`*name`) one YAML document may use (quota file, definition, "
                                    "schedule...)", ge=0)
    max_yaml_depth: int = setting(64, "nesting levels of one YAML/JSON document", ge=8)
    max_definition_bytes: int = setting(1024 * 1024, "largest workflow definition, schedule or integration "
                                        "document (YAML/JSON, also once its aliases are expanded)",
                                        shown="1048576 (1 MiB)", ge=1024)
    max_definition_steps: int = setting(200, "steps of one workflow definition", ge=1)
    max_template_output_bytes: int = setting(1024 * 1024, "what one step's templates may render to",
                                             shown="1048576 (1 MiB)", ge=1024)
    max_prompt_bytes: int = setting(256 * 1024, "largest prompt, message or instructions sent to a model (UTF-8 "
                                    "bytes)", shown="262144 (256 KiB)", ge=1024)
    max_step_output_bytes: int = setting(4 * 1024 * 1024, "largest output of one workflow step (JSON)",
                                         shown="4194304 (4 MiB)", ge=1024)
    max_event_bytes: int = setting(64 * 1024, "largest event put in a tenant's stream; a bigger one keeps a "
                                   "truncated preview", shown="65536 (64 KiB)", ge=1024)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, least = getattr(self, f.name), f.metadata["ge"]
            if not isinstance(value, int) or value < least:
                raise SettingsError(f"{ENV_PREFIX}{f.name.upper()}={value!r}: must be an integer >= {least:g}")

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


_DEFAULT_LIMITS = InputLimits()
_LIMIT_FIELDS = {f.name: f for f in fields(InputLimits)}


def _limit(name: str) -> Any:
    """A field of :class:`Settings` declared as the :class:`InputLimits` one of the same name."""
    declared = _LIMIT_FIELDS[name]
    return field(default=getattr(_DEFAULT_LIMITS, name), metadata=declared.metadata)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """The process settings: each field is ``AGENTWORKER_{FIELD}`` (module docstring)."""

    config: str | None = setting(None, "the quota file", shown="packaged `default_quotas.yaml`")
    redis_url: str = setting("redis://127.0.0.1:6379/0", "Redis for queues, events and leases (redis://, "
                             "rediss:// or unix://)")
    database_url: str = setting("postgresql://postgres@127.0.0.1:5432/postgres", "PostgreSQL (postgresql:// "
                                "or postgres://)")
    log_level: str = setting("info", "log level", choices=("debug", "info", "warning", "error"))
    log_format: str = setting("json", "`json` (one object per line on stdout) or `console`",
                              choices=("json", "console"))
    shutdown_grace: float = setting(25.0, "seconds running jobs get on SIGTERM before they are re-queued", ge=0)
    poll_interval: float = setting(0.5, "seconds between polls of an idle shard (wake-ups make it a fallback)",
                                   gt=0)
    keep_result: float = setting(86_400.0, "seconds results, and so idempotency keys, are kept", ge=0)
    max_payload_bytes: int = setting(1_048_576, "largest accepted payload", ge=1024)
    tenant_lease_ttl: float = setting(30.0, "seconds a tenant concurrency lease lives without renewal (a killed "
                                      "holder's slot comes back after at most this)", gt=0)
    job_lease_ttl: float = setting(10.0, "seconds a running job's lease lives without renewal: a job of a "
                                   "worker that died unseen (its whole host gone) runs again after at most this",
                                   ge=1, le=3600)
    event_stream_maxlen: int = setting(10_000, "events kept per tenant stream (approximately)", ge=1)
    task_modules: tuple[str, ...] = setting(factory=tuple, meaning="extra comma-separated modules whose `@task` "
                                            "functions workers serve", shown="none")
    admin_token: str | None = setting(None, "bearer token of `/admin/*`; unset, those endpoints answer 404",
                                      shown="none", secret=True)
    status_token: str | None = setting(None, "bearer token of `/status`, `/status/*` and the console's data "
                                       "(the admin token is accepted too); unset, they are open", shown="none",
                                       secret=True)
    port: int = setting(8000, "HTTP port of the supervisor (`--port`): /health /ready /metrics /status /admin/*",
                        ge=0, le=65535)
    # all interfaces: the probes of Kubernetes come from outside the pod
    http_host: str = setting("0.0.0.0", "address the supervisor's HTTP port binds")
    run_dir: str | None = setting(None, "where workers write their status files", shown="a new temporary "
                                  "directory")
    metrics_dir: str | None = setting(None, "prometheus multiprocess files of the workers; locked by one "
                                      "supervisor for its life and emptied when it starts (a second one on it "
                                      "is refused at start)", shown="a new temporary directory")
    ready_timeout: float = setting(2.0, "seconds /ready waits for Redis and for PostgreSQL before calling them "
                                   "down", gt=0)
    restart_backoff_initial: float = setting(0.5, "seconds before the first restart of a failing slot; doubles "
                                             "on each quick failure", gt=0)
    restart_backoff_max: float = setting(30.0, "ceiling of that delay (at least the initial one); a slot that "
                                         "keeps failing is retried this often, forever", gt=0)
    config_poll_interval: float = setting(2.0, "seconds between checks of the quota file's content (0: no "
                                          "watching)", ge=0)
    worker_start_timeout: float = setting(60.0, "seconds a new worker has to write its first heartbeat before "
                                          "it is hung", gt=0)
    zygote: str = setting("on", "`on`: workers are forked from a pre-imported parent (Linux; see "
                          "docs/supervisor.md); `off`: each starts afresh", choices=("on", "off"))
    scheduler: str = setting("on", "`off`: this process's workers dispatch no tenant schedules (dispatch stays "
                             "exactly once however many run it; turn it off on some hosts only to save their "
                             "database queries)", choices=("on", "off"))
    zygote_preload: tuple[str, ...] = setting(factory=tuple, meaning="extra comma-separated modules that parent "
                                              "imports (your task modules' heavy dependencies)", shown="none")
    max_config_bytes: int = _limit("max_config_bytes")
    max_yaml_aliases: int = _limit("max_yaml_aliases")
    max_yaml_depth: int = _limit("max_yaml_depth")
    max_definition_bytes: int = _limit("max_definition_bytes")
    max_definition_steps: int = _limit("max_definition_steps")
    max_template_output_bytes: int = _limit("max_template_output_bytes")
    max_prompt_bytes: int = _limit("max_prompt_bytes")
    max_step_output_bytes: int = _limit("max_step_output_bytes")
    max_event_bytes: int = _limit("max_event_bytes")
    egress_allow: tuple[str, ...] = setting(factory=tuple, meaning="comma-separated CIDRs and `host:port` pairs "
                                            "tenants' outbound calls may reach although internal, e.g. "
                                            "`10.1.2.0/24,crm.internal:8443` (see the README's Egress); never "
                                            "opens the service's own Redis, PostgreSQL or HTTP port",
                                            shown="none")
    webhook_port: int = setting(8001, "HTTP port of the webhook ingress (`agentworker webhooks --port`), the one "
                                "that faces the internet", ge=0, le=65535)
    webhook_host: str = setting("0.0.0.0", "address the webhook ingress binds (`--host`)")
    webhook_max_body_bytes: int = setting(256 * 1024, "largest webhook body the ingress reads (a bigger one is "
                                          "refused 413, unread); at most half of AGENTWORKER_MAX_PAYLOAD_BYTES",
                                          shown="262144 (256 KiB)", ge=1024)
    webhook_body_timeout: float = setting(10.0, "seconds a webhook body may take to arrive (408 after)", gt=0)
    webhook_rate: float = setting(10.0, "webhook deliveries per second each tenant's source may make, per ingress "
                                  "process (a token bucket; 429 with Retry-After past it)", gt=0)
    webhook_burst: int = setting(50, "deliveries a source may make at once above that rate (the bucket's size)",
                                 ge=1)

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
        for f in fields(self):  # the bounds each field declares
            value, meta, name = getattr(self, f.name), f.metadata, ENV_PREFIX + f.name.upper()
            if meta.get("choices") and value not in meta["choices"] and (f.name != "log_level"
                                                                        or value.lower() not in meta["choices"]):
                raise SettingsError(f"{name}={value!r}: use {', '.join(meta['choices'][:-1])} or "
                                    f"{meta['choices'][-1]}")
            if isinstance(value, int | float) and not isinstance(value, bool) and not (
                    (meta.get("ge") is None or value >= meta["ge"]) and (meta.get("gt") is None or value > meta["gt"])
                    and (meta.get("le") is None or value <= meta["le"])):
                kind = "an integer " if isinstance(f.default, int) else ""
                raise SettingsError(f"{name}={value:g}: must be {kind}{_bound_text(meta)}")
        if self.restart_backoff_max < self.restart_backoff_initial:
            raise SettingsError("AGENTWORKER_RESTART_BACKOFF_MAX must be >= AGENTWORKER_RESTART_BACKOFF_INITIAL")
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


def _bound_text(meta: Mapping[str, Any]) -> str:
    parts = []
    if meta.get("ge") is not None:
        parts.append(f">= {meta['ge']:g}")
    if meta.get("gt") is not None:
        parts.append(f"> {meta['gt']:g}")
    if meta.get("le") is not None:
        parts.append(f"<= {meta['le']:g}")
    return " and ".join(parts)


@dataclass(frozen=True, slots=True)
class SettingDoc:
    """One setting as :func:`reference` documents it."""

    variable: str
    default: str
    bound: str
    meaning: str
    #: the default as an ``.env`` value ("" where there is none)
    value: str = ""


def reference() -> list[SettingDoc]:
    """Every setting, from its declaration, in declaration order."""
    docs = []
    for f in fields(Settings):
        meta = f.metadata
        if meta.get("shown") is not None:
            default = meta["shown"]
        elif f.default is None or f.default == ():
            default = "none"
        else:
            default = f"{f.default:g}" if isinstance(f.default, float) else str(f.default)
        bound = _bound_text(meta) if isinstance(f.default, int | float) and not isinstance(f.default, bool) else ""
        if meta.get("choices"):
            bound = " or ".join(f"`{c}`" for c in meta["choices"])
        value = "" if f.default is None or f.default == () or f.default is MISSING else (
            f"{f.default:g}" if isinstance(f.default, float) else str(f.default))
        docs.append(SettingDoc(ENV_PREFIX + f.name.upper(), default, bound, meta.get("meaning", ""), value))
    return docs


def markdown_table() -> str:
    """The README's settings table, generated from the declarations."""
    lines = ["| variable | default | bound | meaning |", "|---|---|---|---|"]
    for doc in reference():
        default = doc.default if doc.default in ("none",) or " " in doc.default or "`" in doc.default \
            else f"`{doc.default}`"
        lines.append(f"| `{doc.variable}` | {default} | {doc.bound} | {doc.meaning} |")
    return "\n".join(lines)


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


if __name__ == "__main__":  # the README table: python -m agentworker.settings
    print(markdown_table())
