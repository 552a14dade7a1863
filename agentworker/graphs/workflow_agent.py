"""The workflow executor: a definition compiled to a LangGraph ``StateGraph``, checkpointed in PostgreSQL.

Each step is a node (:mod:`.step_nodes`); a step without ``depends_on`` starts from ``START``, a step
with one dependency follows it, a step with several waits for all of them (LangGraph's join edge), and
steps nothing depends on lead to ``END``. Steps with no path between them run in the same superstep, in
parallel. The graph's shape and node names come from the definition alone, so any worker process can
continue a run from its checkpoint (thread ``{tenant_id}:{run_id}``): after a crash (the job is retried
and the graph resumes after its last checkpointed superstep) or after an approval (``resume_run``).
Checkpoints are written before each next superstep starts (``durability="sync"``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

from langgraph.graph import END, START, StateGraph
from langgraph.types import Command

from agentworker.db.runs import RunStatus
from agentworker.errors import AgentWorkerError
from agentworker.graphs.checkpoints import CheckpointStore, thread_id
from agentworker.graphs.run_context import RunContext
from agentworker.graphs.step_nodes import RunState, StepFailed, make_node
from agentworker.workflows.definition import WorkflowDefinition
from agentworker.workflows.templates import TemplateError, render


class NotWaitingForApproval(AgentWorkerError, RuntimeError):
    """``resume_run`` named a step the run is not paused at."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    """Where a run stands after a job advanced it."""

    status: RunStatus
    output: Any = None
    error: dict[str, Any] | None = None
    #: approval steps the run is paused at
    waiting_for: tuple[str, ...] = field(default=())


def build_graph(definition: WorkflowDefinition, run: RunContext, checkpointer: Any) -> Any:
    """Compile ``definition`` into a graph whose nodes act for ``run``."""
    graph = StateGraph(RunState)
    for step in definition.steps:
        # LangGraph types nodes by the state schema; ours are typed by RunState, which it cannot infer here.
        graph.add_node(step.id, cast(Any, make_node(step, run)))
    for step in definition.steps:
        if not step.depends_on:
            graph.add_edge(START, step.id)
        elif len(step.depends_on) == 1:
            graph.add_edge(step.depends_on[0], step.id)
        else:
            graph.add_edge(list(step.depends_on), step.id)
    for sink in definition.sinks():
        graph.add_edge(sink, END)
    return graph.compile(checkpointer=checkpointer)


async def advance_run(definition: WorkflowDefinition, run: RunContext, checkpoints: CheckpointStore, *,
                      run_input: Any, resume: tuple[str, dict[str, Any]] | None = None) -> RunOutcome:
    """Start, continue or (with ``resume=(step_id, decision)``) resume the run, until it ends or pauses."""
    thread = thread_id(run.tenant_id, run.run_id)
    config: dict[str, Any] = {"configurable": {"thread_id": thread},
                              "recursion_limit": len(definition.steps) + 10}
    async with checkpoints.saver(run.tenant_id, thread) as saver:
        graph = build_graph(definition, run, saver)
        snapshot = await graph.aget_state(config)
        payload: Any
        if resume is not None:
            step_id, decision = resume
            matching = [i for i in snapshot.interrupts
                        if isinstance(i.value, dict) and i.value.get("step_id") == step_id]
            if not matching:
                raise NotWaitingForApproval(f"run {run.run_id} is not paused at approval step {step_id!r}")
            payload = Command(resume={matching[0].id: decision})
        elif snapshot.created_at is None:
            payload = {"input": run_input, "outputs": {}}
        else:
            payload = None  # continue from the last checkpoint
        try:
            await graph.ainvoke(payload, config, durability="sync")
        except StepFailed as exc:
            return RunOutcome(RunStatus.FAILED, error={**exc.error, "step_id": exc.step_id})
        snapshot = await graph.aget_state(config)
    if snapshot.interrupts:
        waiting = tuple(str(i.value.get("step_id")) for i in snapshot.interrupts if isinstance(i.value, dict))
        return RunOutcome(RunStatus.WAITING_APPROVAL, waiting_for=waiting)
    values = snapshot.values
    outputs: dict[str, Any] = values.get("outputs") or {}
    if values.get("halted"):
        return RunOutcome(RunStatus.REJECTED, output={"rejected_at": values["halted"]})
    if definition.output is None:
        return RunOutcome(RunStatus.COMPLETED, output={sink: outputs.get(sink) for sink in definition.sinks()})
    try:
        output = render(definition.output, {"input": values.get("input"), "steps": outputs})
    except TemplateError as exc:
        return RunOutcome(RunStatus.FAILED, error={"error": "TemplateError", "message": f"output: {exc}"})
    return RunOutcome(RunStatus.COMPLETED, output=output)
