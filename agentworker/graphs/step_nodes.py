"""The graph node of each workflow step: skip if done, render inputs, attempt with retries and a timeout,
record every attempt in the step table, emit the step events; approval steps pause with ``interrupt``.

Before a step starts, the node asks whether its job's cancel was requested
(:attr:`RunContext.check_cancelled`): :class:`~agentworker.jobs.JobCancelled` then ends the run, and no
later step starts.

LangGraph re-runs an interrupted node from its first line when the run resumes, and a run retried after
a crash re-runs the nodes of the superstep that was cut short. So everything a node does before it
finishes is idempotent: a step with a completed record is skipped (its stored output reused), the
approval request is an upsert, and side effects go through the ledger.

The step events are promised (:mod:`agentworker.event_outbox`): each is recorded in the transaction
that records the step change it reports and published after that commits, with an id derived from the
run, the step, the attempt and the event name — a re-run or a relayed copy is the same event, and the
tenant's stream keeps it once.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypedDict

from langgraph.types import interrupt

from agentworker.db import approvals, runs
from agentworker.db.database import DatabaseError
from agentworker.db.runs import StepStatus
from agentworker.graphs.run_context import RunContext
from agentworker.graphs.step_kinds import PermanentStepError, execute
from agentworker.jobs import JobDeferred
from agentworker.workflows.definition import ApprovalStep, StepBase
from agentworker.workflows.templates import TemplateError, render


def _merge_outputs(left: dict[str, Any] | None, right: dict[str, Any] | None) -> dict[str, Any]:
    return {**(left or {}), **(right or {})}


def _first_halt(left: str | None, right: str | None) -> str | None:
    return left or right


class RunState(TypedDict, total=False):
    input: Any
    #: step id -> output of every finished step
    outputs: Annotated[dict[str, Any], _merge_outputs]
    #: the approval step whose rejection ended the run
    halted: Annotated[str | None, _first_halt]


class StepFailed(Exception):
    """A step failed for good (its attempts used up, or an error retrying cannot fix)."""

    def __init__(self, step_id: str, error: dict[str, Any]) -> None:
        self.step_id = step_id
        self.error = error
        super().__init__(f"step {step_id!r} failed: {error.get('message')}")


def error_of(exc: BaseException, message: str | None = None) -> dict[str, Any]:
    return {"error": type(exc).__name__, "message": message or str(exc) or type(exc).__name__}


Node = Callable[[RunState], Awaitable[dict[str, Any]]]


def make_node(step: StepBase, run: RunContext) -> Node:
    async def node(state: RunState) -> dict[str, Any]:
        async with run.database.tenant(run.tenant_id) as tx:
            done = await runs.completed_step(tx, run.run_id, step.id)
            if done is None and state.get("halted"):
                attempt = await runs.start_step(tx, run.run_id, step.id, kind=step.kind, input_data=None,
                                                job_id=run.job_id, status=StepStatus.SKIPPED)
                await runs.finish_step(tx, run.run_id, step.id, attempt, StepStatus.SKIPPED)
        if done is not None:
            run.log.info("step already completed; not run again", step_id=step.id)
            return {"outputs": {step.id: done.output}}
        if state.get("halted"):
            return {}
        if run.check_cancelled is not None:  # a cancelled job starts no further step
            await run.check_cancelled()
        context = {"input": state.get("input"), "steps": state.get("outputs") or {}}
        if isinstance(step, ApprovalStep):
            return await _approval(step, run, context)
        return await _attempts(step, run, context)

    node.__name__ = f"step_{step.id}"
    return node


def _render(step: StepBase, context: dict[str, Any]) -> dict[str, Any]:
    return {name: render(value, context) for name, value in step.templated_values()}


async def _attempts(step: StepBase, run: RunContext, context: dict[str, Any]) -> dict[str, Any]:
    policy = step.retry
    for number in range(1, policy.max_attempts + 1):
        values: dict[str, Any] | None = None
        render_error: TemplateError | None = None
        try:
            values = _render(step, context)
        except TemplateError as exc:
            render_error = exc
        async with run.database.tenant(run.tenant_id) as tx:
            attempt = await runs.start_step(tx, run.run_id, step.id, kind=step.kind, input_data=values,
                                            job_id=run.job_id)
            await run.promise(tx, "workflow_step_started", run.event(step.id, "running", attempt=attempt),
                              step.id, attempt)
        retryable = True
        deadline = asyncio.timeout(step.timeout_seconds)
        try:
            if render_error is not None:
                raise PermanentStepError(f"cannot render the inputs: {render_error}")
            assert values is not None
            async with deadline:
                output = await execute(step, values, run)
            json.dumps(output)
        except (DatabaseError, JobDeferred):
            # the job is retried (or waits for its tenant's LLM budget, no try spent); this attempt's row
            # stays 'running' and is marked interrupted when the job runs again
            raise
        except TimeoutError as exc:
            expired = deadline.expired()
            error = error_of(exc, f"step {step.id!r} timed out after {step.timeout_seconds:g}s" if expired else None)
        except (PermanentStepError, TypeError, ValueError) as exc:
            retryable = False
            error = error_of(exc)
        except Exception as exc:
            error = error_of(exc)
        else:
            async with run.database.tenant(run.tenant_id) as tx:
                await runs.finish_step(tx, run.run_id, step.id, attempt, StepStatus.COMPLETED, output=output)
                await run.promise(tx, "workflow_step_completed", run.event(step.id, "success", output), step.id,
                                  attempt)
            return {"outputs": {step.id: output}}
        will_retry = retryable and number < policy.max_attempts
        async with run.database.tenant(run.tenant_id) as tx:
            await runs.finish_step(tx, run.run_id, step.id, attempt, StepStatus.FAILED, error=error)
            await run.promise(tx, "workflow_step_failed", run.event(step.id, "failed", None, attempt=attempt,
                                                                    error=error, will_retry=will_retry),
                              step.id, attempt)
        run.log.warning("step failed", step_id=step.id, attempt=attempt, will_retry=will_retry, **error)
        if not will_retry:
            raise StepFailed(step.id, error)
        await asyncio.sleep(policy.delay_after(number))
    raise AssertionError("unreachable: max_attempts >= 1")


async def _approval(step: ApprovalStep, run: RunContext, context: dict[str, Any]) -> dict[str, Any]:
    try:
        values = _render(step, context)
    except TemplateError:
        return await _attempts(step, run, context)  # records and reports the render error like other steps
    request = {"message": values["message"], "details": values["details"]}
    async with run.database.tenant(run.tenant_id) as tx:
        approval, _ = await approvals.request_approval(tx, run.run_id, step.id, request)
        latest = await runs.latest_step(tx, run.run_id, step.id)
        if latest is not None and latest.status == StepStatus.WAITING_APPROVAL:
            attempt = latest.attempt
        else:
            attempt = await runs.start_step(tx, run.run_id, step.id, kind=step.kind, input_data=request,
                                            job_id=run.job_id, status=StepStatus.WAITING_APPROVAL)
        if approval.status == "pending":
            # Not on the re-run that follows resume_run (it decided the approval first); a re-run before
            # the decision makes the same event again (same id: the stream keeps one).
            await run.promise(tx, "workflow_waiting_for_approval",
                              run.event(step.id, "waiting_approval", request, attempt=attempt), step.id, attempt)
    decision = interrupt({"step_id": step.id, **request})
    approved = bool(decision.get("approved")) if isinstance(decision, dict) else False
    output = {"approved": approved, "comment": decision.get("comment") if isinstance(decision, dict) else None,
              "by": decision.get("by") if isinstance(decision, dict) else None}
    async with run.database.tenant(run.tenant_id) as tx:
        await runs.finish_step(tx, run.run_id, step.id, attempt,
                               StepStatus.COMPLETED if approved else StepStatus.REJECTED, output=output)
        await run.promise(tx, "workflow_step_completed",
                          run.event(step.id, "success" if approved else "rejected", output), step.id, attempt)
    update: dict[str, Any] = {"outputs": {step.id: output}}
    if not approved:
        update["halted"] = step.id
    return update
