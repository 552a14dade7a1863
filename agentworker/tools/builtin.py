"""Built-in tools that need no external service."""

from __future__ import annotations

from typing import Any

from agentworker.tools.registry import ToolContext, tool


@tool(side_effects=False)
async def echo(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Return the arguments unchanged."""
    return dict(args)


@tool(side_effects=True)
async def notify(ctx: ToolContext, args: dict[str, Any]) -> dict[str, Any]:
    """Publish a ``workflow_notification`` event (``args`` as its ``message``) on the tenant's channel and
    stream, once (:meth:`ToolContext.emit_once`: recorded with the call in the ledger, published after)."""
    await ctx.emit_once("workflow_notification", {"run_id": ctx.run_id, "step_id": ctx.step_id, "message": args,
                                                  "idempotency_key": ctx.idempotency_key})
    return {"notified": True, "idempotency_key": ctx.idempotency_key}
