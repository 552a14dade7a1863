"""What the chat agent, the tool agent and agent steps share: the tenant's model, the agent graph, the
loop that streams it into events, and the outcome read back from its state.

An agent is LangChain's ``create_agent`` over the tools of :func:`agentworker.tools.toolset.open_toolset`
with our middleware (model deadline, context window, a cap on model calls, and — for the tool agent —
human approval). Its state is checkpointed in PostgreSQL under a thread of the tenant
(``{tenant}:chat:{conversation}``, ``{tenant}:agent:{run}``), so a retried job continues where the last
checkpoint left it and any worker process can resume a paused run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import HumanInTheLoopMiddleware, ModelCallLimitMiddleware
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage

from agentworker.db import integrations as integration_rows
from agentworker.graphs.agent_events import AgentEvents, pending_actions
from agentworker.graphs.agent_middleware import ContextWindowMiddleware, ModelDeadlineMiddleware
from agentworker.graphs.budget_callback import LlmBudgetCallback
from agentworker.graphs.models import tenant_chat_model
from agentworker.integrations import DEFAULT_NAME, ModelSettings
from agentworker.metrics import OTHER_TENANT
from agentworker.tools.scope import TenantScope
from agentworker.tools.toolset import AgentToolset

_PREVIEW = 2000
#: what a person may answer to an approval request
APPROVAL_DECISIONS = ["approve", "edit", "reject"]


@dataclass(frozen=True, slots=True)
class AgentOutcome:
    """Where an agent run stands after a job advanced it."""

    status: str  # completed | waiting_approval
    reply: str
    model: str
    #: the current turn's tool calls: tool, args, call_id, status, output
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    #: the tool calls waiting for a decision (name, args, description)
    waiting_for: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "reply": self.reply, "model": self.model, "tool_calls": self.tool_calls,
                "waiting_for": self.waiting_for}


async def load_model_settings(env: TenantScope) -> ModelSettings:
    """The tenant's model settings (the offline model when it has saved none)."""
    async with env.database.tenant(env.tenant_id) as tx:
        config = await integration_rows.get_integration(tx, "model", DEFAULT_NAME)
    return ModelSettings() if config is None else ModelSettings.model_validate(config)


@dataclass(frozen=True, slots=True)
class AgentModel:
    model: BaseChatModel
    spec: str
    settings: ModelSettings


async def agent_model(env: TenantScope, override: str | None = None,
                      timeout: float | None = None) -> AgentModel:
    """The one place a job's chat models are made (workflow ``llm`` steps, the chat and tool agents, the
    router): the tenant's model settings (its key and endpoint; ``override`` a step's or a request's
    model), its metrics label, and its LLM budget on every call (:mod:`agentworker.llm_budget`)."""
    settings = await load_model_settings(env)
    spec = override or settings.model
    budget = env.llm_budget
    callbacks = [LlmBudgetCallback(budget, spec)] if budget is not None else []
    model, spec = tenant_chat_model(settings, override=override, timeout=timeout,
                                    tenant=budget.metric_tenant if budget is not None else OTHER_TENANT,
                                    callbacks=callbacks)
    return AgentModel(model=model, spec=spec, settings=settings)


def build_agent(chosen: AgentModel, toolset: AgentToolset, *, system_prompt: str, checkpointer: Any,
                max_iterations: int, approval: bool) -> Any:
    """The agent graph. With ``approval`` the approval middleware is always there (possibly gating
    nothing), so the graph a run paused in and the graph that resumes it have the same nodes."""
    middleware: list[Any] = [
        ModelDeadlineMiddleware(chosen.spec, chosen.settings.timeout, chosen.settings.max_retries),
        ContextWindowMiddleware(chosen.settings.context_tokens),
        ModelCallLimitMiddleware(run_limit=max_iterations, exit_behavior="end"),
    ]
    if approval:
        gated = sorted(toolset.approval_required & set(toolset.names))
        interrupt_on: dict[str, Any] = {name: {"allowed_decisions": APPROVAL_DECISIONS} for name in gated}
        middleware.append(HumanInTheLoopMiddleware(interrupt_on=interrupt_on))
    return create_agent(chosen.model, toolset.tools, system_prompt=system_prompt, middleware=middleware,
                        checkpointer=checkpointer)


def agent_config(thread: str, max_iterations: int) -> dict[str, Any]:
    # Each model call and each tool round is a superstep, plus the middleware's own nodes.
    return {"configurable": {"thread_id": thread}, "recursion_limit": 4 * max_iterations + 10}


async def drive(agent: Any, payload: Any, config: dict[str, Any], events: AgentEvents) -> Any:
    """Run the agent until it ends or pauses, publishing its activity; return its final state."""
    async for chunk in agent.astream(payload, config, stream_mode="updates", durability="sync"):
        await events.on_update(chunk)
    return await agent.aget_state(config)


def outcome_of(snapshot: Any, spec: str) -> AgentOutcome:
    """The outcome of the latest turn in an agent's state."""
    messages: list[Any] = list((snapshot.values or {}).get("messages", []))
    start = 0
    for index in range(len(messages) - 1, -1, -1):
        if isinstance(messages[index], HumanMessage):
            start = index + 1
            break
    turn = messages[start:]
    results = {m.tool_call_id: m for m in turn if isinstance(m, ToolMessage)}
    calls: list[dict[str, Any]] = []
    reply = ""
    for message in turn:
        if not isinstance(message, AIMessage):
            continue
        for call in message.tool_calls:
            result = results.get(call.get("id") or "")
            calls.append({"tool": call["name"], "args": call["args"], "call_id": call.get("id"),
                          "status": "pending" if result is None else result.status,
                          "output": None if result is None else result.text[:_PREVIEW]})
        if message.text and not message.tool_calls:
            reply = message.text
    waiting = [action for pending in snapshot.interrupts for action in pending_actions(pending.value)]
    return AgentOutcome(status="waiting_approval" if waiting else "completed", reply=reply, model=spec,
                        tool_calls=calls, waiting_for=waiting)
