"""The tool agent: LangChain's ``create_agent`` over the tenant's tools, asking a person before chosen ones.

A run (thread ``{tenant}:agent:{run_id}``) starts from instructions, calls tools — ours over MCP, the
tenant's external MCP servers — and pauses at ``HumanInTheLoopMiddleware`` before each tool marked
``approval`` (``send_email`` among ours; per server for external ones). The pause is a LangGraph
interrupt checkpointed in PostgreSQL: :func:`run_tool_agent` with ``decisions`` continues it from any
worker process, the same way workflows resume. Approve runs the call, reject answers the model in the
tool's place (the tool does not run), edit runs it with the person's arguments.

Workflow steps of kind ``agent`` use :func:`run_step_agent`: the same agent without a checkpoint and
without approval (the step's ``tools`` list is the definition author's authorization; a person's
go-ahead belongs in an approval step before it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from langchain_core.messages import HumanMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from agentworker.errors import AgentWorkerError
from agentworker.graphs.agent_events import AgentEvents, pending_actions
from agentworker.graphs.agent_runtime import (
    AgentOutcome,
    agent_config,
    agent_model,
    build_agent,
    drive,
    outcome_of,
)
from agentworker.tools.scope import TenantScope
from agentworker.tools.toolset import open_toolset

TOOL_AGENT_PROMPT = (
    "You are the tool agent of an organisation's assistant. Carry out the request with the tools you have, "
    "one step at a time, checking what each tool returns. When the work is done, answer in one or two "
    "sentences with what you did. If a person rejected a tool call, do not try it again.")
STEP_AGENT_PROMPT = (
    "You are one step of an automated workflow. Carry out the instructions with the tools you have, then "
    "answer with the result only.")


class AgentRunNotFound(AgentWorkerError, LookupError):
    """No agent run of that id for the tenant (another tenant's run is not found either)."""


class InvalidAgentDecision(AgentWorkerError, ValueError):
    """A decision that does not fit the calls waiting for approval."""


def agent_thread(tenant_id: str, run_id: str) -> str:
    return f"{tenant_id}:agent:{run_id}"


async def run_tool_agent(env: TenantScope, *, run_id: str, instructions: str | None = None,
                         decisions: list[dict[str, Any]] | None = None, tools: Sequence[str] | None = None,
                         model: str | None = None, max_iterations: int = 10) -> AgentOutcome:
    """Start run ``run_id`` with ``instructions``, continue it after a crash, or resume it with ``decisions``.

    A run that already finished, or already waits for approval, is returned as it is (a retried job
    changes nothing)."""
    if env.checkpoints is None:
        raise RuntimeError("the tool agent needs the checkpoint store")
    chosen = await agent_model(env, model)
    thread = agent_thread(env.tenant_id, run_id)
    events = AgentEvents(env.emit, {"agent": "tool", "run_id": run_id})
    config = agent_config(thread, max_iterations)
    async with open_toolset(env, run_id=f"agent:{run_id}", step_id="tools", names=tools) as toolset, \
            env.checkpoints.saver(env.tenant_id, thread) as saver:
        agent = build_agent(chosen, toolset, system_prompt=TOOL_AGENT_PROMPT, checkpointer=saver,
                            max_iterations=max_iterations, approval=True)
        snapshot = await agent.aget_state(config)
        payload: Any
        if decisions is not None:
            if snapshot.created_at is None:
                raise AgentRunNotFound(f"agent run {run_id!r} not found for tenant {env.tenant_id!r}")
            if snapshot.interrupts:
                actions = [a for pending in snapshot.interrupts for a in pending_actions(pending.value)]
                payload = Command(resume={"decisions": to_hitl_decisions(decisions, actions)})
                await events.publish("agent_approval_decided", {"decisions": decisions})
            elif snapshot.next:
                payload = None  # decided by an earlier try of this job, which stopped before the end
            else:
                return outcome_of(snapshot, chosen.spec)  # resuming a finished run changes nothing
        elif snapshot.created_at is None:
            if not instructions:
                raise AgentRunNotFound(f"agent run {run_id!r} not found for tenant {env.tenant_id!r}")
            payload = {"messages": [HumanMessage(content=instructions)]}
            await events.publish("agent_run_started", {"model": chosen.spec, "tools": toolset.names})
        elif snapshot.interrupts or not snapshot.next:
            return outcome_of(snapshot, chosen.spec)
        else:
            payload = None  # a retried job continues from the last checkpoint
        snapshot = await drive(agent, payload, config, events)
    outcome = outcome_of(snapshot, chosen.spec)
    if outcome.status == "completed":
        await events.publish("agent_run_completed", {"reply": outcome.reply})
    return outcome


def to_hitl_decisions(decisions: list[dict[str, Any]], actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Our decisions (``{"decision": "approve" | "reject" | "edit", "comment", "args"}``), one per waiting
    call — or one for all of them — as HumanInTheLoopMiddleware's."""
    if len(decisions) == 1 and len(actions) > 1:
        decisions = decisions * len(actions)
    if len(decisions) != len(actions):
        raise InvalidAgentDecision(f"{len(actions)} tool call(s) wait for approval but {len(decisions)} decisions "
                                   "were given: give one for all, or one per call in order")
    converted: list[dict[str, Any]] = []
    for decision, action in zip(decisions, actions, strict=True):
        kind = decision["decision"]
        if kind == "approve":
            converted.append({"type": "approve"})
        elif kind == "reject":
            converted.append({"type": "reject", **({"message": decision["comment"]} if decision.get("comment")
                                                   else {})})
        else:
            converted.append({"type": "edit", "edited_action": {"name": action["name"], "args": decision["args"]}})
    return converted


async def run_step_agent(env: TenantScope, *, run_id: str, step_id: str, instructions: str,
                         tools: Sequence[str], model: str | None, max_iterations: int,
                         timeout: float) -> AgentOutcome:
    """One workflow agent step: the tools named in ``tools`` only, no approval, no state kept."""
    chosen = await agent_model(env, model, timeout=timeout)
    events = AgentEvents(env.emit, {"agent": "step", "run_id": run_id, "step_id": step_id})
    config = agent_config(f"{env.tenant_id}:step:{run_id}:{step_id}", max_iterations)
    async with open_toolset(env, run_id=run_id, step_id=step_id, names=list(tools)) as toolset:
        agent = build_agent(chosen, toolset, system_prompt=STEP_AGENT_PROMPT, checkpointer=InMemorySaver(),
                            max_iterations=max_iterations, approval=False)
        snapshot = await drive(agent, {"messages": [HumanMessage(content=instructions)]}, config, events)
    return outcome_of(snapshot, chosen.spec)
