"""Agent pieces without processes: routing rules and the model's decision, approval decisions, events."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, ToolMessage

from agentworker.graphs.agent_events import AgentEvents
from agentworker.graphs.models import OfflineChatModel
from agentworker.graphs.router import decide_route, parse_model_route, rule_route
from agentworker.graphs.tool_agent import InvalidAgentDecision, to_hitl_decisions
from agentworker.tasks.agent_tasks import InvalidAgentInput, parse_agent_decisions

WORKFLOWS = ["expense-report", "onboarding"]


@pytest.mark.parametrize(("message", "agent", "workflow"), [
    ("Hi! How was your weekend?", "chat", None),
    ("What is on the agenda?", "chat", None),
    ("Please send the invoice to Ada", "tool", None),
    ("Schedule a call with the board on Friday", "tool", None),
    ("Add a note to Alan's contact", "tool", None),
    ("Start the Expense-Report for my trip", "workflow", "expense-report"),
    ("onboarding: new hire Grace, please create her accounts", "workflow", "onboarding"),
    ("the expense-reports folder is full", "chat", None),
])
def test_rules_route_scripted_messages(message: str, agent: str, workflow: str | None) -> None:
    decision = rule_route(message, WORKFLOWS)
    assert (decision.agent, decision.workflow_id, decision.decided_by) == (agent, workflow, "rules")


def test_the_models_answer_is_used_only_when_it_is_a_valid_decision() -> None:
    assert parse_model_route('Sure: {"agent": "tool", "reason": "an action"}', WORKFLOWS) is not None
    decided = parse_model_route('{"agent": "workflow", "workflow_id": "onboarding", "reason": "r"}', WORKFLOWS)
    assert decided is not None and (decided.agent, decided.workflow_id, decided.decided_by) == (
        "workflow", "onboarding", "model")
    for bad in ("chat", '{"agent": "teleport"}', '{"agent": "workflow", "workflow_id": "unknown"}', "{not json}"):
        assert parse_model_route(bad, WORKFLOWS) is None


class Failing(OfflineChatModel):
    async def _agenerate(self, *args: Any, **kwargs: Any) -> Any:
        raise TimeoutError("no answer")


async def test_a_failing_or_unhelpful_model_falls_back_to_the_rules() -> None:
    failing: BaseChatModel = Failing()
    assert (await decide_route(failing, "send it", WORKFLOWS)).decided_by == "rules"
    offline = await decide_route(OfflineChatModel(), "send it", WORKFLOWS)
    assert (offline.agent, offline.decided_by) == ("tool", "rules")


def test_decisions_are_parsed_and_matched_to_the_waiting_calls() -> None:
    assert parse_agent_decisions("approved") == [{"decision": "approve", "comment": None, "args": None}]
    parsed = parse_agent_decisions([{"decision": "reject", "comment": "no"}, {"decision": "edit", "args": {"a": 1}}])
    actions = [{"name": "send_email", "args": {}}, {"name": "crm_add_note", "args": {}}]
    assert to_hitl_decisions(parsed, actions) == [
        {"type": "reject", "message": "no"},
        {"type": "edit", "edited_action": {"name": "crm_add_note", "args": {"a": 1}}}]
    assert to_hitl_decisions(parse_agent_decisions("approve"), actions) == [{"type": "approve"}] * 2
    with pytest.raises(InvalidAgentDecision, match="2 tool call\\(s\\) wait for approval but 3 decisions"):
        to_hitl_decisions(parse_agent_decisions(["approve"] * 3), actions)
    with pytest.raises(InvalidAgentInput, match="an edit decision needs args"):
        parse_agent_decisions({"decision": "edit"})
    with pytest.raises(InvalidAgentInput, match=r"unknown key\(s\) \['why'\]"):
        parse_agent_decisions({"decision": "approve", "why": "x"})


async def test_agent_events_describe_tool_activity_once() -> None:
    published: list[tuple[str, dict[str, Any]]] = []

    async def emit(event: str, data: dict[str, Any]) -> None:
        published.append((event, data))

    events = AgentEvents(emit, {"agent": "tool", "run_id": "r1"})
    call = AIMessage(content="", id="m1", tool_calls=[{"name": "echo", "args": {"x": 1}, "id": "c1"}])
    await events.on_update({"model": {"messages": [call]}})
    await events.on_update({"model": {"messages": [call]}})
    await events.on_update({"tools": {"messages": [ToolMessage(content="ok", tool_call_id="c1", name="echo")]}})
    await events.on_update({"model": {"messages": [AIMessage(content="all done", id="m2")]}})
    assert published == [
        ("agent_tool_call", {"agent": "tool", "run_id": "r1", "tool": "echo", "args": {"x": 1}, "call_id": "c1"}),
        ("agent_tool_result", {"agent": "tool", "run_id": "r1", "tool": "echo", "call_id": "c1", "status": "success",
                               "output": "ok"}),
        ("agent_message", {"agent": "tool", "run_id": "r1", "content": "all done"})]
