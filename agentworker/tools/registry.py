"""Tools that workflow steps and agents call, and the registry that finds them per tenant.

.. code-block:: python

    from pydantic import BaseModel
    from agentworker.tools import ToolContext, tool

    class PostMessage(BaseModel):
        channel: str
        text: str

    @tool(side_effects=True, input_model=PostMessage, approval=True, timeout=20,
          description="Post a message to the tenant's chat channel")
    async def post_message(ctx: ToolContext, args: PostMessage) -> dict:
        ...   # use ctx.idempotency_key with the external API
        return {"posted": True}

A tool is an ``async def (ctx, args) -> JSON``. With ``input_model`` (a pydantic model) its arguments
are validated before it runs — a bad argument fails the call with :class:`ToolInputError`, one sentence
naming each bad field — and agents see the model's JSON schema; without one it gets the raw ``dict``.
Every call is cut at ``timeout`` seconds (:class:`ToolTimeout`). A tool is available to every tenant, or
only to those named in ``tenants``. A tool with ``side_effects=True`` is called through the side-effect
ledger (:mod:`agentworker.db.ledger`): once per (tenant, run, step, call), its stored result returned on
a repeat; ``ctx.idempotency_key`` is stable across retries, for the external system to drop repeats.
``approval=True`` makes the tool agent wait for a person's decision before each call.
"""

from __future__ import annotations

import asyncio
import functools
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import BaseModel, ValidationError

from agentworker.errors import AgentWorkerError
from agentworker.integrations import describe_errors
from agentworker.logs import Logger

if TYPE_CHECKING:
    from agentworker.db.database import Database
    from agentworker.event_outbox import EventOutbox

NAME_RE = r"^[a-z][a-z0-9_.]{0,63}$"
DEFAULT_TOOL_TIMEOUT = 30.0
MAX_TOOL_TIMEOUT = 300.0

EmitFunction = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool call sees: its tenant, the run and step calling it, and a stable idempotency key."""

    tenant_id: str
    run_id: str
    step_id: str
    idempotency_key: str
    log: Logger
    #: publish an event on the tenant's channel
    emit: EmitFunction
    #: the database of the tenant's rows (settings, calendar, outbox); None where no job provides one
    database: Database | None = None
    #: where :meth:`emit_once` records events; None where no job provides one
    outbox: EventOutbox | None = None

    async def emit_once(self, event: str, data: dict[str, Any]) -> None:
        """Publish an event this call promises, exactly once in the tenant's stream: inside a
        side-effecting call (the ledger runs it) the event is recorded in the ledger's transaction with
        an id derived from :attr:`idempotency_key` and ``event``, and published after the commit, retried
        until Redis takes it. A retried call whose first try was recorded is not run again, so it emits
        nothing; one that died before its commit emits the same event (same id) once. One event of each
        name per call. Elsewhere (no ledger, no outbox) it is :attr:`emit`: published once, best effort."""
        from agentworker.db.ledger import effect_transaction
        from agentworker.events import stable_event_id

        tx = effect_transaction()
        if tx is None or self.outbox is None or tx.tenant_id != self.tenant_id:
            await self.emit(event, data)
            return
        await self.outbox.promise(tx, event, data, stable_event_id(self.tenant_id, "effect", self.idempotency_key,
                                                                   event))


ToolFunction = Callable[[ToolContext, dict[str, Any]], Awaitable[Any]]
F = TypeVar("F", bound=Callable[..., Awaitable[Any]])


class UnknownTool(AgentWorkerError, LookupError):
    """No tool of that name is available to the tenant."""


class ToolError(AgentWorkerError):
    """A tool call failed; the message is one sentence safe to show (it never holds a credential)."""


class ToolInputError(ToolError, ValueError):
    """The arguments do not fit the tool's input model."""


class ToolTimeout(ToolError):
    """The tool call ran past its timeout."""


class ToolNotConfigured(ToolError, ValueError):
    """The tenant has not configured what the tool needs (SMTP, CRM, ...); retrying cannot help."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    #: validates, applies the timeout, runs the tool: what workflow steps and agents call
    func: ToolFunction
    side_effects: bool
    description: str = ""
    #: tenants allowed to call it; None for every tenant
    tenants: frozenset[str] | None = None
    input_model: type[BaseModel] | None = None
    #: the tool agent asks a person before each call
    approval: bool = False
    timeout: float = DEFAULT_TOOL_TIMEOUT

    def available_to(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants

    def input_schema(self) -> dict[str, Any]:
        """The JSON schema of the arguments (any object when the tool has no input model)."""
        if self.input_model is None:
            return {"type": "object", "additionalProperties": True}
        return self.input_model.model_json_schema()


def _wrap(name: str, func: Callable[..., Awaitable[Any]], input_model: type[BaseModel] | None,
          timeout: float) -> ToolFunction:
    @functools.wraps(func)
    async def call(ctx: ToolContext, args: dict[str, Any]) -> Any:
        value: Any = args
        if input_model is not None:
            if isinstance(args, input_model):
                value = args
            else:
                try:
                    value = input_model.model_validate(args)
                except ValidationError as exc:
                    raise ToolInputError(f"tool {name!r}: invalid arguments: {describe_errors(exc)}") from None
        try:
            async with asyncio.timeout(timeout):
                return await func(ctx, value)
        except TimeoutError:
            raise ToolTimeout(f"tool {name!r} did not finish within {timeout:g}s") from None

    return call


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, func: Callable[..., Awaitable[Any]], *, name: str | None = None, side_effects: bool,
                 description: str = "", tenants: Iterable[str] | None = None,
                 input_model: type[BaseModel] | None = None, approval: bool = False,
                 timeout: float = DEFAULT_TOOL_TIMEOUT) -> Tool:
        tool_name = name or func.__name__
        if not re.fullmatch(NAME_RE, tool_name):
            raise ValueError(f"invalid tool name {tool_name!r}: lowercase letters, digits, '_' and '.'")
        if not 0 < timeout <= MAX_TOOL_TIMEOUT:
            raise ValueError(f"tool {tool_name!r}: timeout must be in (0, {MAX_TOOL_TIMEOUT:g}] seconds")
        existing = self._tools.get(tool_name)
        if existing is not None and existing.func.__wrapped__ is not func:  # type: ignore[attr-defined]
            raise ValueError(f"tool {tool_name!r} is already registered by {existing.func.__module__}")
        registered = Tool(name=tool_name, func=_wrap(tool_name, func, input_model, timeout),
                          side_effects=side_effects,
                          description=description or (func.__doc__ or "").strip().split("\n")[0],
                          tenants=None if tenants is None else frozenset(tenants), input_model=input_model,
                          approval=approval, timeout=timeout)
        self._tools[tool_name] = registered
        return registered

    def get(self, tenant_id: str, name: str) -> Tool:
        """The tool ``name`` if ``tenant_id`` may use it; else :class:`UnknownTool` naming what is available."""
        found = self._tools.get(name)
        if found is None or not found.available_to(tenant_id):
            names = ", ".join(t.name for t in self.available(tenant_id)) or "none"
            raise UnknownTool(f"tool {name!r} is not available to tenant {tenant_id!r} (available: {names})")
        return found

    def all(self) -> list[Tool]:
        """Every registered tool, whoever may use it."""
        return sorted(self._tools.values(), key=lambda t: t.name)

    def available(self, tenant_id: str) -> list[Tool]:
        return sorted((t for t in self._tools.values() if t.available_to(tenant_id)), key=lambda t: t.name)


TOOLS = ToolRegistry()


def tool(name: str | None = None, *, side_effects: bool, description: str = "",
         tenants: Iterable[str] | None = None, input_model: type[BaseModel] | None = None,
         approval: bool = False, timeout: float = DEFAULT_TOOL_TIMEOUT) -> Callable[[F], F]:
    """Register an async function as a tool in :data:`TOOLS`."""

    def decorate(func: F) -> F:
        TOOLS.register(func, name=name, side_effects=side_effects, description=description, tenants=tenants,
                       input_model=input_model, approval=approval, timeout=timeout)
        return func

    return decorate
