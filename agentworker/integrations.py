"""What a tenant configures for its agents: SMTP, CRM, external MCP servers, its chat model, and the
signing secrets of its incoming webhook sources.

Saved through :meth:`agentworker.client.AgentWorkerClient.save_integration`, stored per tenant in
PostgreSQL (``agentworker.tenant_integrations``, under row-level security) and read by the tools and
agents of that tenant's jobs only. Secrets are :class:`pydantic.SecretStr` (their ``repr`` is masked),
sit in the stored JSON under keys the log filter masks (``password``, ``token``, ``api_key``,
``headers``), and are never put in an error message: :func:`parse_integration` reports the path and the
problem of a bad value, not the value. Settings may be given as YAML or JSON text, read with the safe
loader; text or dict, they are held to the input limits (``AGENTWORKER_MAX_DEFINITION_BYTES``,
``AGENTWORKER_MAX_YAML_DEPTH``, ``AGENTWORKER_MAX_YAML_ALIASES``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError

from agentworker.errors import AgentWorkerError
from agentworker.safe_yaml import DocumentRefused, check_value, load_yaml
from agentworker.settings import InputLimits

#: LLM calls and tool calls never wait longer than this (the seed's rule for LLM calls)
MAX_TIMEOUT_SECONDS = 60.0
INTEGRATION_KINDS = ("smtp", "crm", "mcp", "model", "webhook")
DEFAULT_NAME = "default"
MCP_SERVER_NAME_PATTERN = r"^[a-z][a-z0-9_]{0,30}$"
WEBHOOK_SOURCE_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
_HEADER_NAME_PATTERN = r"^[A-Za-z0-9-]{1,100}$"
_EMAIL_RE = re.compile(r"^[^@\s<>,;\"()\[\]]+@[^@\s<>,;\"()\[\]]+\.[^@\s<>,;\"()\[\]]+$")

Timeout = Annotated[float, Field(gt=0, le=MAX_TIMEOUT_SECONDS)]


class IntegrationError(AgentWorkerError, ValueError):
    """Settings that cannot be used: unknown kind, bad name or invalid values (never echoed)."""


def _email(value: str) -> str:
    if not _EMAIL_RE.fullmatch(value):
        raise ValueError("not an email address like name@example.com")
    return value


def _http_url(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL")
    return value.rstrip("/")


EmailAddress = Annotated[str, Field(max_length=254), AfterValidator(_email)]
HttpUrl = Annotated[str, Field(min_length=8, max_length=2000), AfterValidator(_http_url)]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def stored(self) -> dict[str, Any]:
        """The JSON stored in the database (secrets revealed: the table is the secret store)."""
        revealed: dict[str, Any] = _reveal(self.model_dump(mode="python", exclude_none=True))
        return revealed

    def masked(self) -> dict[str, Any]:
        """The JSON shown to people and logs: every secret replaced by ``***``."""
        masked: dict[str, Any] = _mask(self.model_dump(mode="python", exclude_none=True))
        return masked


class SmtpSettings(_Settings):
    """Where and as whom the tenant's email is sent."""

    host: str = Field(min_length=1, max_length=255)
    port: int = Field(default=587, ge=1, le=65535)
    username: str | None = None
    password: SecretStr | None = None
    from_address: EmailAddress
    #: starttls (upgrade after connecting, port 587), tls (implicit, port 465) or none (local relays only)
    security: Literal["starttls", "tls", "none"] = "starttls"
    timeout: Timeout = 30.0


class CrmSettings(_Settings):
    """The tenant's CRM HTTP API (see :mod:`agentworker.tools.crm` for the endpoints used)."""

    base_url: HttpUrl
    token: SecretStr
    timeout: Timeout = 15.0


class McpServerSettings(_Settings):
    """An external MCP server (streamable HTTP) whose tools the tenant's tool agent may use."""

    url: HttpUrl
    #: sent with every request (e.g. ``Authorization``); treated as secrets
    headers: dict[str, SecretStr] = Field(default_factory=dict)
    timeout: Timeout = 30.0
    #: tools of this server (names as the server gives them) that wait for a person's approval
    approval_required: list[str] = Field(default_factory=list)


class ModelSettings(_Settings):
    """The tenant's chat model: ``offline`` or a LangChain provider string, with its connection."""

    model: str = Field(default="offline", min_length=1, max_length=200)
    base_url: HttpUrl | None = None
    api_key: SecretStr | None = None
    #: seconds per request, at most 60
    timeout: Timeout = MAX_TIMEOUT_SECONDS
    #: retries of a failed or timed-out request (bounded)
    max_retries: int = Field(default=2, ge=0, le=5)
    #: ask the provider for a streamed (SSE) answer
    streaming: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    #: estimated tokens of conversation sent to the model; older turns are trimmed to fit
    context_tokens: int = Field(default=8000, ge=256, le=2_000_000)
    #: most tokens of one answer (sent to the provider); also what an LLM budget reserves for the answer
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)


def _signing_secret(value: SecretStr) -> SecretStr:
    if not 16 <= len(value.get_secret_value()) <= 500:
        raise ValueError("must be 16 to 500 characters")
    return value


class WebhookSettings(_Settings):
    """An incoming webhook source (the integration's name): its signing secret and the workflow each
    delivery starts (see :mod:`agentworker.schedules.webhooks` for the signature scheme)."""

    secret: Annotated[SecretStr, AfterValidator(_signing_secret)]
    workflow_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
    #: carries ``sha256=<hex HMAC-SHA256>``
    signature_header: str = Field(default="X-Signature", pattern=_HEADER_NAME_PATTERN)
    #: carries the Unix time the provider signed at; covered by the signature
    timestamp_header: str = Field(default="X-Signature-Timestamp", pattern=_HEADER_NAME_PATTERN)
    #: seconds a signed timestamp stays acceptable; 0: no timestamp, the signature covers the body alone
    tolerance_seconds: int = Field(default=300, ge=0, le=86_400)
    #: carries the provider's delivery id, the deduplication key (without it: the body's digest)
    delivery_header: str = Field(default="X-Delivery-Id", pattern=_HEADER_NAME_PATTERN)


SETTINGS_BY_KIND: dict[str, type[_Settings]] = {
    "smtp": SmtpSettings, "crm": CrmSettings, "mcp": McpServerSettings, "model": ModelSettings,
    "webhook": WebhookSettings,
}


def check_kind_and_name(kind: str, name: str) -> None:
    if kind not in SETTINGS_BY_KIND:
        raise IntegrationError(f"unknown integration kind {kind!r}: use one of {', '.join(INTEGRATION_KINDS)}")
    if kind == "mcp":
        if not isinstance(name, str) or not re.fullmatch(MCP_SERVER_NAME_PATTERN, name):
            raise IntegrationError(f"invalid MCP server name {name!r}: 1-31 lowercase letters, digits or '_', "
                                   "starting with a letter")
    elif kind == "webhook":
        if not isinstance(name, str) or not re.fullmatch(WEBHOOK_SOURCE_PATTERN, name):
            raise IntegrationError(f"invalid webhook source name {name!r}: 1-63 lowercase letters, digits, '_' "
                                   "or '-', starting with a letter")
    elif name != DEFAULT_NAME:
        raise IntegrationError(f"a tenant has one {kind} integration: its name is {DEFAULT_NAME!r}, not {name!r}")


def parse_integration(kind: str, config: Any, name: str = DEFAULT_NAME, *,
                      limits: InputLimits | None = None) -> _Settings:
    """Validate ``config`` (a dict, or YAML or JSON text) for ``kind``; :class:`IntegrationError` names
    each bad key, never its value. ``limits``: default ``AGENTWORKER_MAX_*`` from the environment."""
    check_kind_and_name(kind, name)
    limits = limits or InputLimits.from_env()
    if isinstance(config, _Settings):
        config = config.stored()
    try:
        if isinstance(config, str | bytes):
            config = load_yaml(config, what=f"the {kind} integration", limits=limits, size_limit="max_definition_bytes")
        check_value(config, what=f"the {kind} integration", limits=limits, size_limit="max_definition_bytes")
    except DocumentRefused as exc:
        raise IntegrationError(f"invalid {kind} settings: {exc}") from None
    except yaml.YAMLError as exc:  # its message quotes the text, which may hold a secret: only where
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise IntegrationError(f"invalid {kind} settings: not valid YAML or JSON{where}") from None
    if not isinstance(config, dict):
        raise IntegrationError(f"{kind} settings must be an object, got {type(config).__name__}")
    try:
        return SETTINGS_BY_KIND[kind].model_validate(config)
    except ValidationError as exc:
        raise IntegrationError(f"invalid {kind} settings: {describe_errors(exc)}") from None


def describe_errors(exc: ValidationError) -> str:
    """``path: problem; ...`` without the offending input (it may be a password)."""
    parts = []
    for error in exc.errors(include_input=False, include_url=False):
        path = ".".join(str(p) for p in error["loc"]) or "(root)"
        parts.append(f"{path}: {error['msg']}")
    return "; ".join(parts)


def _reveal(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return value.get_secret_value()
    if isinstance(value, dict):
        return {k: _reveal(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_reveal(v) for v in value]
    return value


def _mask(value: Any) -> Any:
    if isinstance(value, SecretStr):
        return "***"
    if isinstance(value, dict):
        return {k: _mask(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_mask(v) for v in value]
    return value
