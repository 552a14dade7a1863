"""The hook through which workflow ``agent`` steps run the tool agent (:func:`.tool_agent.run_step_agent`).

The step's agent may use exactly the tools its definition lists, gets the tenant's chat model (or the
step's ``model``), at most ``max_iterations`` model calls, and model requests no longer than the step's
timeout (60 s at most). Side-effecting tool calls go through the ledger under the run and the step, so a
retried step does not repeat them. The output is ``{"text", "model", "tool_calls"}``.
"""

from __future__ import annotations

from typing import Any

from agentworker.tools.registry import ToolContext, UnknownTool


class AgentStepUnavailable(RuntimeError):
    """The agent step cannot run as defined (no database, or a tool the tenant does not have)."""


async def run_agent_step(*, context: ToolContext, instructions: str, tools: list[str], model: str | None,
                         max_iterations: int, timeout: float) -> Any:
    """Run an agent on ``instructions`` with ``tools`` and return its JSON output."""
    from agentworker.graphs.agent_runtime import AgentEnvironment
    from agentworker.graphs.tool_agent import run_step_agent

    if context.database is None:
        raise AgentStepUnavailable(f"step {context.step_id!r}: agent steps need the workflow's database")
    env = AgentEnvironment(tenant_id=context.tenant_id, database=context.database, emit=context.emit,
                           log=context.log, outbox=context.outbox)
    try:
        outcome = await run_step_agent(env, run_id=context.run_id, step_id=context.step_id,
                                       instructions=instructions, tools=tools, model=model,
                                       max_iterations=max_iterations, timeout=timeout)
    except UnknownTool as exc:
        raise AgentStepUnavailable(f"step {context.step_id!r}: {exc}") from None
    return {"text": outcome.reply, "model": outcome.model, "tool_calls": outcome.tool_calls}
