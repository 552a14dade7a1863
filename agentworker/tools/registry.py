"""Tools that workflow steps (and, later, agents) call, and the registry that finds them per tenant.

.. code-block:: python

    from agentworker.tools import ToolContext, tool

    @tool(side_effects=True, description="Post a message to the tenant's chat channel")
    async def post_message(ctx: ToolContext, args: dict) -> dict:
        ...   # use ctx.idempotency_key with the external API
        return {"posted": True}

A tool is an ``async def (ctx, args) -> JSON``. It is available to every tenant, or only to those named
in ``tenants``. A tool with ``side_effects=True`` is called through the side-effect ledger
(:mod:`agentworker.db.ledger`): once per (tenant, run, step, call), its stored result returned on a
repeat; ``ctx.idempotency_key`` is stable across retries, for the external system to drop repeats.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

NAME_RE = r"^[a-z][a-z0-9_.]{0,63}$"

EmitFunction = Callable[[str, dict[str, Any]], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class ToolContext:
    """What a tool call sees: its tenant, the run and step calling it, and a stable idempotency key."""

    tenant_id: str
    run_id: str
    step_id: str
    idempotency_key: str
    log: Any
    #: publish an event on the tenant's channel
    emit: EmitFunction


ToolFunction = Callable[[ToolContext, dict[str, Any]], Awaitable[Any]]
F = TypeVar("F", bound=ToolFunction)


class UnknownTool(LookupError):
    """No tool of that name is available to the tenant."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    func: ToolFunction
    side_effects: bool
    description: str = ""
    #: tenants allowed to call it; None for every tenant
    tenants: frozenset[str] | None = None

    def available_to(self, tenant_id: str) -> bool:
        return self.tenants is None or tenant_id in self.tenants


class ToolRegistry:
    def __init__(self) -> None:
        self._tools: dict[str, Tool] = {}

    def register(self, func: ToolFunction, *, name: str | None = None, side_effects: bool, description: str = "",
                 tenants: Iterable[str] | None = None) -> Tool:
        tool_name = name or func.__name__
        if not re.fullmatch(NAME_RE, tool_name):
            raise ValueError(f"invalid tool name {tool_name!r}: lowercase letters, digits, '_' and '.'")
        existing = self._tools.get(tool_name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"tool {tool_name!r} is already registered by {existing.func.__module__}")
        registered = Tool(name=tool_name, func=func, side_effects=side_effects,
                          description=description or (func.__doc__ or "").strip().split("\n")[0],
                          tenants=None if tenants is None else frozenset(tenants))
        self._tools[tool_name] = registered
        return registered

    def get(self, tenant_id: str, name: str) -> Tool:
        """The tool ``name`` if ``tenant_id`` may use it; else :class:`UnknownTool` naming what is available."""
        found = self._tools.get(name)
        if found is None or not found.available_to(tenant_id):
            names = ", ".join(t.name for t in self.available(tenant_id)) or "none"
            raise UnknownTool(f"tool {name!r} is not available to tenant {tenant_id!r} (available: {names})")
        return found

    def available(self, tenant_id: str) -> list[Tool]:
        return sorted((t for t in self._tools.values() if t.available_to(tenant_id)), key=lambda t: t.name)


TOOLS = ToolRegistry()


def tool(name: str | None = None, *, side_effects: bool, description: str = "",
         tenants: Iterable[str] | None = None) -> Callable[[F], F]:
    """Register an async function as a tool in :data:`TOOLS`."""

    def decorate(func: F) -> F:
        TOOLS.register(func, name=name, side_effects=side_effects, description=description, tenants=tenants)
        return func

    return decorate
