"""The hook through which workflow ``agent`` steps run the tool agent (:func:`.tool_agent.run_step_agent`).

The step's agent may use exactly the tools its definition lists, gets the tenant's chat model (or the
step's ``model``), at most ``max_iterations`` model calls, and model requests no longer than the step's
timeout (60 s at most). Side-effecting tool calls go through the ledger under the run and the step, so a
retried step does not repeat them. The output is ``{"text", "model", "tool_calls"}``.
"""

from __future__ import annotations

from typing import Any

from agentworker.tools.registry import UnknownTool
from agentworker.tools.scope import TenantScope


class AgentStepUnavailable(RuntimeError):
    """The agent step cannot run as defined (a tool the tenant does not have)."""


async def run_agent_step(scope: TenantScope, *, run_id: str, step_id: str, instructions: str, tools: list[str],
                         model: str | None, max_iterations: int, timeout: float) -> Any:
    """Run an agent on ``instructions`` with ``tools`` and return its JSON output."""
    from agentworker.graphs.tool_agent import run_step_agent

    try:
        outcome = await run_step_agent(scope, run_id=run_id, step_id=step_id, instructions=instructions, tools=tools,
                                       model=model, max_iterations=max_iterations, timeout=timeout)
    except UnknownTool as exc:
        raise AgentStepUnavailable(f"step {step_id!r}: {exc}") from None
    return {"text": outcome.reply, "model": outcome.model, "tool_calls": outcome.tool_calls}
