"""The hook through which workflow ``agent`` steps run a tool-using agent.

Agent steps are validated in definitions today; running them needs the tool agent (a later piece of
work replaces :func:`run_agent_step` with it). Until then an agent step fails with
:class:`AgentStepUnavailable`, saying so, and is not retried.
"""

from __future__ import annotations

from typing import Any

from agentworker.tools.registry import ToolContext


class AgentStepUnavailable(RuntimeError):
    """Agent steps cannot run in this version: the tool agent is not there yet."""


async def run_agent_step(*, context: ToolContext, instructions: str, tools: list[str], model: str | None,
                         max_iterations: int, timeout: float) -> Any:
    """Run an agent on ``instructions`` with ``tools`` and return its JSON output."""
    raise AgentStepUnavailable(
        f"step {context.step_id!r} is an agent step, and agent steps need the tool agent, which this version "
        "of agentworker does not have yet; use llm or tool steps instead")
