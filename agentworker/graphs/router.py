"""The entry graph: send an incoming message to the chat agent, the tool agent or one of the tenant's
workflows.

The model decides first: it is asked for ``{"agent": "chat" | "tool" | "workflow", "workflow_id": ...,
"reason": ...}``. An answer that is not that JSON, names an unknown workflow, or does not come (the
model failed or timed out) falls back to rules: a message naming one of the tenant's workflow ids goes
to that workflow; one asking for an action (send, email, schedule, book, create, update, add, note,
invite, cancel, remind) goes to the tool agent; anything else to the chat agent. The decision, who made
it and why is published as ``agent_routed`` before the chosen agent runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, TypedDict

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import HumanMessage, SystemMessage
from langgraph.graph import END, START, StateGraph

from agentworker.logs import Logger

AGENTS = ("chat", "tool", "workflow")
ACTION_WORDS = re.compile(r"\b(send|e-?mail|schedule|book|create|update|add|note|invite|cancel|remind)\b",
                          re.IGNORECASE)
ROUTER_PROMPT = (
    "Route the user's message to one agent and answer with JSON only, no other text: "
    '{{"agent": "chat" | "tool" | "workflow", "workflow_id": <one of the workflows, or null>, "reason": <short>}}. '
    "chat: conversation and questions. tool: the user asks for an action (send an email, book a meeting, "
    "update the CRM). workflow: the user asks to run one of these workflows: {workflows}.")


@dataclass(frozen=True, slots=True)
class RouteDecision:
    agent: str
    decided_by: str  # model | rules
    reason: str
    workflow_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rule_route(message: str, workflows: Sequence[str]) -> RouteDecision:
    """The rule-based choice (see the module's docstring)."""
    for workflow_id in sorted(workflows, key=len, reverse=True):
        if re.search(rf"(?<![\w.-]){re.escape(workflow_id)}(?![\w.-])", message, re.IGNORECASE):
            return RouteDecision("workflow", "rules", f"the message names workflow {workflow_id!r}", workflow_id)
    action = ACTION_WORDS.search(message)
    if action:
        return RouteDecision("tool", "rules", f"the message asks for an action ({action.group(0).lower()!r})")
    return RouteDecision("chat", "rules", "no workflow named and no action asked for")


def parse_model_route(text: str, workflows: Sequence[str]) -> RouteDecision | None:
    """The model's decision, or None when its answer is not a usable one."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        return None
    try:
        answer = json.loads(match.group(0))
    except ValueError:
        return None
    if not isinstance(answer, dict) or answer.get("agent") not in AGENTS:
        return None
    workflow_id = answer.get("workflow_id")
    if answer["agent"] == "workflow" and workflow_id not in workflows:
        return None
    reason = str(answer.get("reason") or "")[:300]
    return RouteDecision(answer["agent"], "model", reason,
                         workflow_id if answer["agent"] == "workflow" else None)


async def decide_route(model: BaseChatModel | None, message: str, workflows: Sequence[str],
                       log: Logger | None = None) -> RouteDecision:
    """Ask ``model`` (when there is one); fall back to :func:`rule_route`."""
    if model is not None:
        prompt = ROUTER_PROMPT.format(workflows=", ".join(workflows) or "(none)")
        try:
            answer = await model.ainvoke([SystemMessage(content=prompt), HumanMessage(content=message)])
        except Exception as exc:
            if log is not None:
                log.warning("router model failed; routing by rules", error=type(exc).__name__)
        else:
            decided = parse_model_route(answer.text, workflows)
            if decided is not None:
                return decided
    return rule_route(message, workflows)


class EntryState(TypedDict, total=False):
    message: str
    decision: dict[str, Any]
    result: dict[str, Any]


Handler = Callable[[str, RouteDecision], Awaitable[dict[str, Any]]]


def build_entry_graph(decide: Callable[[str], Awaitable[RouteDecision]],
                      handlers: Mapping[str, Handler]) -> Any:
    """``START -> route -> chat | tool | workflow -> END``; ``handlers`` run the chosen agent."""

    async def route(state: EntryState) -> dict[str, Any]:
        return {"decision": (await decide(state["message"])).to_dict()}

    def handler_node(agent: str) -> Callable[[EntryState], Awaitable[dict[str, Any]]]:
        async def node(state: EntryState) -> dict[str, Any]:
            decision = RouteDecision(**state["decision"])
            return {"result": await handlers[agent](state["message"], decision)}

        return node

    graph = StateGraph(EntryState)
    graph.add_node("route", route)
    for agent in AGENTS:
        graph.add_node(agent, handler_node(agent))  # type: ignore[arg-type]
        graph.add_edge(agent, END)
    graph.add_edge(START, "route")
    graph.add_conditional_edges("route", lambda state: state["decision"]["agent"], {a: a for a in AGENTS})
    return graph.compile()
