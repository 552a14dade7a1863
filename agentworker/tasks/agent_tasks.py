"""The agent tasks: chat turns, tool agent runs and their approvals, and the message router.

* ``run_chat_agent(tenant_id, conversation_id, message)`` — one turn of a conversation with memory;
* ``run_tool_agent(tenant_id, instructions, run_id=None, tools=None, model=None, max_iterations=10)`` —
  a tool-using run; it may pause for approval (``status: "waiting_approval"``);
* ``resume_agent(tenant_id, run_id, decision)`` — a person's decision on the calls a run waits for;
* ``handle_message(tenant_id, conversation_id, message)`` — route a message to the chat agent, the tool
  agent or a workflow, then run it.

A retried job continues its own turn or run from the last checkpoint (its ids derive from the job id)
and never repeats a side effect (the ledger). LangChain, LangGraph and MCP are imported on the first
agent job, not with this module.

**Failures.** Agent runs have no status row: their end is the ``agent_run_failed`` event, with the
task's identity (``{"agent": "tool", "run_id"}``, or ``{"agent": "chat", "conversation_id"}`` for
``run_chat_agent`` and ``handle_message``), ``error`` and ``message``. The tasks publish it themselves
for every exception the agent run raises (on tries that will be retried too). When a job fails for
good, the tasks' ``on_final_failure`` hook publishes it once more, with the worker's ``reason``, unless
the task already published it for that very exception:

* ``error``: only when the exception did not come out of the agent run itself (invalid input, the
  router, the chat turn or the workflow ``handle_message`` ran — those raise past no except block);
* ``timeout``: always — the deadline cancels the task, and ``CancelledError`` is not an ``Exception``,
  so the task's except block never saw it;
* ``poisoned``, ``tries_exhausted``, ``rejected``: always — the task function did not run (or its
  worker died under it) on the try that ended the job.

``handle_message`` also fails the workflow run it may have been running in-process (keyed by its job
id), as ``execute_workflow``'s hook does.

**Cancel** (:mod:`agentworker.job_control`): a job cancelled on request publishes ``agent_cancelled``
(the same identity, ``error`` ``JobCancelled``, ``by``) instead of ``agent_run_failed``; its worker cancels
the run's task, so the agent stops at its next await (a model or tool call in flight is abandoned; a
side effect already recorded in the ledger stays done). A run paused for approval has no job to cancel.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from typing import TYPE_CHECKING, Any

from agentworker.db import DatabaseUnavailable
from agentworker.errors import AgentWorkerError
from agentworker.jobs import JobCancelled, JobDeferred
from agentworker.settings import InputLimits
from agentworker.tasks.context import JobContext
from agentworker.tasks.registry import task
from agentworker.tasks.workflow_tasks import execute_workflow, fail_job_run

if TYPE_CHECKING:
    from agentworker.graphs.agent_runtime import AgentOutcome

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
_DECISION_KEYS = frozenset({"decision", "comment", "args"})


class InvalidAgentInput(AgentWorkerError, ValueError):
    """A malformed id, message or decision."""


def _check_id(name: str, value: object) -> str:
    if not isinstance(value, str) or not re.fullmatch(ID_PATTERN, value):
        raise InvalidAgentInput(f"invalid {name} {value!r}: 1-128 letters, digits, '_', '.' or '-'")
    return value


def _check_text(name: str, value: object, limits: InputLimits) -> str:
    """A message or instructions for a model: a non-empty string within ``AGENTWORKER_MAX_PROMPT_BYTES``."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidAgentInput(f"{name} must be a non-empty string")
    size = len(value.encode("utf-8", errors="surrogatepass"))
    if size > limits.max_prompt_bytes:
        raise InvalidAgentInput(limits.refusal("max_prompt_bytes", f"{name} is {size} bytes"))
    return value


def job_digest(job_id: str) -> str:
    """A stable id derived from the job id: the same on every try of the job."""
    return hashlib.sha256(job_id.encode()).hexdigest()[:24]


#: set on an exception once its task has published agent_run_failed for it, so the final-failure hook
#: does not publish it twice (exceptions take no weak references: the mark rides on the exception)
_REPORTED_MARK = "_agentworker_agent_run_failed"


async def _failed(ctx: JobContext, identity: dict[str, Any], exc: BaseException) -> None:
    if isinstance(exc, JobDeferred | JobCancelled):  # waiting for the LLM budget, or cancelled: not failing
        return
    await ctx.emit_best_effort("agent_run_failed", {**identity, "error": type(exc).__name__, "message": str(exc)[:500]})
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, _REPORTED_MARK, True)


async def _failed_for_good(ctx: JobContext, identity: dict[str, Any], reason: str, error: BaseException) -> None:
    """The hooks' half of ``agent_run_failed`` (see the module's docstring); for reason ``cancelled``,
    ``agent_cancelled``. Never raises."""
    if reason == "cancelled":
        try:
            await ctx.emit_best_effort("agent_cancelled", {**identity, "error": type(error).__name__,
                                                           "message": str(error)[:500], "by": ctx.cancel.by})
        except Exception as exc:  # a hook must not raise
            ctx.log.exception("agent_cancelled not published", error=repr(exc))
        return
    if getattr(error, _REPORTED_MARK, False):
        return
    try:
        await ctx.emit_best_effort("agent_run_failed", {**identity, "error": type(error).__name__,
                                                        "message": str(error)[:500], "reason": reason})
    except Exception as exc:  # a hook must not raise
        ctx.log.exception("agent_run_failed not published", reason=reason, error=repr(exc))


def _chat_identity(payload: dict[str, Any]) -> dict[str, Any]:
    return {"agent": "chat", "conversation_id": payload.get("conversation_id")}


async def _chat_agent_failed(ctx: JobContext, payload: dict[str, Any], reason: str, error: BaseException) -> None:
    await _failed_for_good(ctx, _chat_identity(payload), reason, error)


async def _tool_agent_failed(ctx: JobContext, payload: dict[str, Any], reason: str, error: BaseException) -> None:
    run_id = payload.get("run_id")
    await _failed_for_good(ctx, {"agent": "tool", "run_id": run_id if run_id is not None
                                 else f"job-{job_digest(ctx.job_id)}"}, reason, error)


async def _resume_agent_failed(ctx: JobContext, payload: dict[str, Any], reason: str, error: BaseException) -> None:
    await _failed_for_good(ctx, {"agent": "tool", "run_id": payload.get("run_id")}, reason, error)


async def _handle_message_failed(ctx: JobContext, payload: dict[str, Any], reason: str,
                                 error: BaseException) -> None:
    await fail_job_run(ctx, reason, error)
    await _failed_for_good(ctx, _chat_identity(payload), reason, error)


# -- tasks ----------------------------------------------------------------------------------------------


@task(retry_on=(DatabaseUnavailable,), on_final_failure=_chat_agent_failed)
async def run_chat_agent(ctx: JobContext, tenant_id: str, conversation_id: str, message: str) -> dict[str, Any]:
    """Answer ``message`` in conversation ``conversation_id``; the reply is also an ``agent_message`` event."""
    _check_id("conversation_id", conversation_id)
    _check_text("message", message, ctx.runtime.settings.limits)
    from agentworker.graphs.chat_agent import run_chat_turn

    identity = {"agent": "chat", "conversation_id": conversation_id}
    try:
        scope = await ctx.scope(checkpoints=True)
        outcome = await run_chat_turn(scope, conversation_id=conversation_id, message=message,
                                      turn_id=job_digest(ctx.job_id))
    except Exception as exc:
        await _failed(ctx, identity, exc)
        raise
    return {"conversation_id": conversation_id, **outcome.to_dict()}


@task(retry_on=(DatabaseUnavailable,), on_final_failure=_tool_agent_failed)
async def run_tool_agent(ctx: JobContext, tenant_id: str, instructions: str, run_id: str | None = None,
                         tools: list[str] | None = None, model: str | None = None,
                         max_iterations: int = 10) -> dict[str, Any]:
    """Carry out ``instructions`` with the tenant's tools (only ``tools`` when given); pauses before tools
    that need approval. ``run_id`` defaults to one derived from the job id."""
    _check_text("instructions", instructions, ctx.runtime.settings.limits)
    run = _check_id("run_id", run_id) if run_id is not None else f"job-{job_digest(ctx.job_id)}"
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, str) for t in tools)):
        raise InvalidAgentInput("tools must be a list of tool names")
    if not isinstance(max_iterations, int) or not 1 <= max_iterations <= 50:
        raise InvalidAgentInput(f"max_iterations must be an integer from 1 to 50, got {max_iterations!r}")
    return await _tool_run(ctx, run, instructions=instructions, tools=tools, model=model,
                           max_iterations=max_iterations)


@task(retry_on=(DatabaseUnavailable,), on_final_failure=_resume_agent_failed)
async def resume_agent(ctx: JobContext, tenant_id: str, run_id: str, decision: Any) -> dict[str, Any]:
    """Answer the tool calls run ``run_id`` waits for: ``"approve"``, ``"reject"``,
    ``{"decision": "approve" | "reject" | "edit", "comment": ..., "args": {...}}``, or a list of these
    (one per waiting call, in order). Resuming a finished run returns it unchanged."""
    _check_id("run_id", run_id)
    return await _tool_run(ctx, run_id, decisions=parse_agent_decisions(decision))


@task(retry_on=(DatabaseUnavailable,), on_final_failure=_handle_message_failed)
async def handle_message(ctx: JobContext, tenant_id: str, conversation_id: str, message: str) -> dict[str, Any]:
    """Route ``message`` to the chat agent, the tool agent or one of the tenant's workflows, and run it."""
    _check_id("conversation_id", conversation_id)
    _check_text("message", message, ctx.runtime.settings.limits)
    from agentworker.db.workflow_index import list_workflow_ids
    from agentworker.graphs.agent_runtime import agent_model
    from agentworker.graphs.chat_agent import run_chat_turn
    from agentworker.graphs.models import OFFLINE
    from agentworker.graphs.router import RouteDecision, build_entry_graph, decide_route

    env = await ctx.scope(checkpoints=True)
    emit = ctx.emit_best_effort
    async with env.database.tenant(tenant_id) as tx:
        workflows = await list_workflow_ids(tx)
    chosen = await agent_model(env)
    turn = job_digest(ctx.job_id)

    async def decide(text: str) -> RouteDecision:
        # The offline model cannot choose: the rules do.
        model = None if chosen.spec == OFFLINE else chosen.model
        decision = await decide_route(model, text, workflows, ctx.log)
        await emit("agent_routed", {"conversation_id": conversation_id, **decision.to_dict()})
        return decision

    async def chat(text: str, decision: RouteDecision) -> dict[str, Any]:
        outcome = await run_chat_turn(env, conversation_id=conversation_id, message=text, turn_id=turn)
        return {"conversation_id": conversation_id, **outcome.to_dict()}

    async def tool(text: str, decision: RouteDecision) -> dict[str, Any]:
        return await _tool_run(ctx, f"msg-{turn}", instructions=text)

    async def workflow(text: str, decision: RouteDecision) -> dict[str, Any]:
        assert decision.workflow_id is not None
        return await execute_workflow(ctx, tenant_id=tenant_id, workflow_id=decision.workflow_id,
                                      trigger="message", input_data={"message": text,
                                                                     "conversation_id": conversation_id})

    graph = build_entry_graph(decide, {"chat": chat, "tool": tool, "workflow": workflow})
    state = await graph.ainvoke({"message": message})
    decision = state["decision"]
    return {"conversation_id": conversation_id, "routed_to": decision["agent"], "decided_by": decision["decided_by"],
            "reason": decision["reason"], "workflow_id": decision["workflow_id"], "result": state["result"]}


# -- internals ------------------------------------------------------------------------------------------


async def _tool_run(ctx: JobContext, run_id: str, **kwargs: Any) -> dict[str, Any]:
    from agentworker.graphs import tool_agent

    identity = {"agent": "tool", "run_id": run_id}
    try:
        scope = await ctx.scope(checkpoints=True)
        outcome: AgentOutcome = await tool_agent.run_tool_agent(scope, run_id=run_id, **kwargs)
    except Exception as exc:
        await _failed(ctx, identity, exc)
        raise
    return {"run_id": run_id, **outcome.to_dict()}


def parse_agent_decisions(decision: Any) -> list[dict[str, Any]]:
    """Our decisions as ``[{"decision", "comment", "args"}]``; :class:`InvalidAgentInput` for anything else."""
    items = decision if isinstance(decision, list) else [decision]
    if not items:
        raise InvalidAgentInput("decision list is empty: give one decision, or one per waiting tool call")
    parsed = []
    for item in items:
        if isinstance(item, str):
            item = {"decision": item}
        if not isinstance(item, dict):
            raise InvalidAgentInput(f"decision {item!r}: use 'approve', 'reject' or {{\"decision\": ..., ...}}")
        unknown = set(item) - _DECISION_KEYS
        if unknown:
            raise InvalidAgentInput(f"decision has unknown key(s) {sorted(unknown)}: use decision, comment and args")
        given = item.get("decision")
        value = {"approved": "approve", "rejected": "reject"}.get(str(given), given)
        if value not in ("approve", "reject", "edit"):
            raise InvalidAgentInput(f"decision {item.get('decision')!r}: use 'approve', 'reject' or 'edit'")
        if value == "edit" and not isinstance(item.get("args"), dict):
            raise InvalidAgentInput("an edit decision needs args: the tool's arguments to use instead")
        if item.get("comment") is not None and not isinstance(item["comment"], str):
            raise InvalidAgentInput(f"decision comment must be a string, got {item['comment']!r}")
        parsed.append({"decision": value, "comment": item.get("comment"), "args": item.get("args")})
    return parsed
