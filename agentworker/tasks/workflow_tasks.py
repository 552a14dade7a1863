"""The workflow tasks: ``execute_workflow`` (the seed's message) and ``resume_run`` (an approval's answer).

``execute_workflow`` makes one run per job id: the job id (``{tenant}:execute_workflow:{key}``) is the
run's idempotency key, so a retried job finds its run instead of making another, returns it as it is when
it has finished or is waiting for approval, and otherwise continues it from its last checkpoint (completed
steps are not run again; side effects went through the ledger).

The worker connects to PostgreSQL on first use (a worker starts even when PostgreSQL is down); while it
is unreachable these jobs fail with :class:`~agentworker.db.DatabaseUnavailable`, retried with backoff
while the pool's ``max_tries`` allow. LangGraph is imported on the first workflow job, not with this module.

A job that fails for good, whatever the path (the task raised, timed out, was rejected, used up its
tries, or its worker died running it too often), ends the run it was driving as ``failed`` with
``{"error", "message", "reason"}`` and one ``workflow_run_failed`` (:func:`fail_job_run`, the tasks'
``on_final_failure`` hook); if PostgreSQL is down then, the run sweeper
(:mod:`agentworker.tasks.run_sweeper`) fails the run later.

**Cancel** (:mod:`agentworker.job_control`): a job cancelled on request ends the run it drives as
``cancelled`` (the same hook, reason ``cancelled``; its error ``{"error": "JobCancelled", ...}``) with one
``workflow_cancelled`` event; the step under way is closed ``interrupted``. The executor asks before it
starts each step (:meth:`JobContext.raise_if_cancelled
<agentworker.tasks.context.JobContext.raise_if_cancelled>`), so a cancel that arrives while a step runs
lets no later step start, even if the step finishes first. A run *waiting for approval* has no job: its
job has finished, so cancelling that job id is refused (``JobNotCancellable``); reject the approval
(``resume_run`` with ``reject``) to end such a run.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agentworker.db import Database, DatabaseError, DatabaseUnavailable, approvals, definitions, runs
from agentworker.db.database import TenantTransaction
from agentworker.db.runs import InvalidRunId, RunRecord, RunStatus, StepStatus
from agentworker.errors import AgentWorkerError
from agentworker.events import stable_event_id
from agentworker.tasks.context import JobContext
from agentworker.tasks.registry import task
from agentworker.workflows.definition import WORKFLOW_ID_PATTERN, parse_workflow

if TYPE_CHECKING:
    from agentworker.event_outbox import EventOutbox
    from agentworker.graphs.workflow_agent import RunOutcome

#: seconds kept back from the job's deadline to record a run that ran out of time
_RECORD_MARGIN_S = 1.0
_DECISION_KEYS = frozenset({"decision", "comment", "by"})


class WorkflowNotFound(AgentWorkerError, LookupError):
    """The tenant has no workflow of that id."""


class RunNotFound(AgentWorkerError, LookupError):
    """The tenant has no run of that id (another tenant's run is not found either)."""


class RunNotWaiting(AgentWorkerError, RuntimeError):
    """``resume_run`` for a run that is not waiting for an approval."""


class InvalidDecision(AgentWorkerError, ValueError):
    """A ``resume_run`` decision that is not approve or reject."""


class WorkflowRunFailed(AgentWorkerError, RuntimeError):
    """The run failed (a step used up its attempts, or the run ran out of time); recorded in the run."""


# -- process-wide resources -----------------------------------------------------------------------------


async def database_of(ctx: JobContext) -> Database:
    return await ctx.runtime.database()


# -- when a job fails for good --------------------------------------------------------------------------

#: seconds a final-failure hook waits for PostgreSQL (the worker gives the whole hook a few more)
_HOOK_DATABASE_BUDGET_S = 5.0


def final_failure_error(reason: str, error: BaseException) -> dict[str, Any]:
    """The ``error`` recorded on a run whose job failed for good (``reason``: the worker's, e.g. 'poisoned')."""
    return {"error": type(error).__name__, "message": str(error)[:500], "reason": reason}


async def fail_job_run(ctx: JobContext, reason: str, error: BaseException, *, run_id: str | None = None) -> None:
    """End the run ``ctx``'s job was driving as ``failed`` (``cancelled``, with ``workflow_cancelled``,
    for reason ``cancelled``): ``run_id``, or else the run whose idempotency
    key is the job id (the one ``execute_workflow`` makes). Only a run still ``running`` under this job
    changes, in one conditional ``UPDATE``: a run waiting for approval, finished, already failed by the
    task itself, or picked up by another job is left as it is and nothing is emitted. Never raises; with
    PostgreSQL down it logs, and the run sweeper fails the run once it is reachable again."""
    recorded = final_failure_error(reason, error)
    cancelled = reason == "cancelled"
    status = RunStatus.CANCELLED if cancelled else RunStatus.FAILED
    try:
        async with asyncio.timeout(_HOOK_DATABASE_BUDGET_S):
            database = await database_of(ctx)
            outbox = await ctx.runtime.event_outbox()
            async with database.tenant(ctx.tenant_id) as tx:
                target = run_id
                if target is None:
                    found = await runs.find_run_by_key(tx, ctx.job_id)
                    target = found.run_id if found is not None else None
                run = None if target is None else await runs.fail_running_run(tx, target, job_id=ctx.job_id,
                                                                               error=recorded, status=status)
                if run is not None:
                    event = "workflow_cancelled" if cancelled else "workflow_run_failed"
                    await promise_run_event(outbox, tx, run, event, run_event(run, status.value, None,
                                                                              {"error": recorded}))
    except (DatabaseError, TimeoutError, OSError) as exc:
        ctx.log.warning("run not marked failed; the run sweeper will", reason=reason, error=str(exc) or repr(exc))
        return
    except Exception as exc:  # a bug here must not reach the worker: log it with the job bound
        ctx.log.exception("marking the run failed raised", reason=reason, error=repr(exc))
        return
    if run is None:
        return
    ctx.log.warning("run cancelled with its job" if cancelled else "run failed with its job", run_id=run.run_id,
                    workflow_id=run.workflow_id, reason=reason)


async def _execute_workflow_failed(ctx: JobContext, payload: dict[str, Any], reason: str,
                                   error: BaseException) -> None:
    """Every reason: the job's run (keyed by the job id), if it exists and is still running."""
    await fail_job_run(ctx, reason, error)


async def _resume_run_failed(ctx: JobContext, payload: dict[str, Any], reason: str, error: BaseException) -> None:
    """Every reason: ``payload["run_id"]``, if it is still running under this job (a resume that failed
    before taking the run over, e.g. ``RunNotWaiting``, leaves it to the job that has it)."""
    try:
        run_id = str(runs.parse_run_id(payload.get("run_id")))
    except InvalidRunId:
        return
    await fail_job_run(ctx, reason, error, run_id=run_id)


# -- tasks ----------------------------------------------------------------------------------------------


@task(retry_on=(DatabaseUnavailable,), on_final_failure=_execute_workflow_failed)
async def execute_workflow(ctx: JobContext, tenant_id: str, workflow_id: str, trigger: str = "manual",
                           input_data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the latest version of ``workflow_id`` on ``input_data``; return the run's summary."""
    if not isinstance(workflow_id, str) or not re.fullmatch(WORKFLOW_ID_PATTERN, workflow_id):
        raise ValueError(f"invalid workflow_id {workflow_id!r}: 1-128 letters, digits, '_', '.' or '-'")
    if not isinstance(trigger, str) or not 1 <= len(trigger) <= 100:
        raise ValueError(f"invalid trigger {trigger!r}: a string of 1 to 100 characters")
    if input_data is None:
        input_data = {}
    if not isinstance(input_data, dict):
        raise ValueError(f"input_data must be a JSON object, got {type(input_data).__name__}")
    database = await database_of(ctx)
    outbox = await ctx.runtime.event_outbox()
    async with database.tenant(tenant_id) as tx:
        run = await runs.find_run_by_key(tx, ctx.job_id)
        created = False
        if run is None:
            stored = await definitions.get_definition(tx, workflow_id)
            if stored is None:
                raise WorkflowNotFound(f"workflow {workflow_id!r} is not defined for tenant {tenant_id!r}")
            run, created = await runs.create_run(tx, workflow_id=workflow_id, workflow_version=stored.version,
                                                 idempotency_key=ctx.job_id, trigger=trigger, input_data=input_data,
                                                 job_id=ctx.job_id)
            if created:
                await promise_run_event(outbox, tx, run, "workflow_run_started",
                                        run_event(run, "running", {"trigger": trigger}))
        elif run.status == RunStatus.RUNNING:
            await runs.count_attempt(tx, run.run_id, job_id=ctx.job_id)
        waiting = [a.step_id for a in await approvals.pending_approvals(tx, run.run_id)]
        stored = await definitions.get_definition(tx, run.workflow_id, run.workflow_version)
    if not created and run.status != RunStatus.RUNNING:
        ctx.log.info("run already advanced by an earlier try", run_id=run.run_id, status=run.status)
        return _summary(run, run.status, run.output, run.error, waiting)
    ctx.log.info("workflow run", run_id=run.run_id, workflow_id=run.workflow_id, new=created)
    assert stored is not None
    outcome = await _advance(ctx, database, run, stored.definition, resume=None)
    return await _record(ctx, database, run, outcome)


@task(retry_on=(DatabaseUnavailable,), on_final_failure=_resume_run_failed)
async def resume_run(ctx: JobContext, tenant_id: str, run_id: str, decision: Any,
                     step_id: str | None = None) -> dict[str, Any]:
    """Answer the approval a run waits for (``step_id`` when it waits for several) and continue it.

    ``decision``: ``"approve"`` or ``"reject"``, or ``{"decision": ..., "comment": ..., "by": ...}``.
    The first decision recorded for a step wins; resuming a finished run returns it unchanged.
    """
    answer = parse_decision(decision)
    database = await database_of(ctx)
    async with database.tenant(tenant_id) as tx:
        run = await runs.get_run(tx, run_id)
        if run is None:
            raise RunNotFound(f"run {run_id!r} not found for tenant {tenant_id!r}")
        if run.finished:
            return _summary(run, run.status, run.output, run.error)
        target = await _approval_to_resume(tx, run, step_id)
        record = await approvals.get_approval(tx, run.run_id, target)
        if record is not None and record.status == "pending":
            record = await approvals.decide(tx, run.run_id, target, approved=answer["approved"], decision=answer)
        assert record is not None
        # A decision recorded by an earlier try of this job (or another resume) wins over this one.
        answer = record.decision
        await runs.set_run_status(tx, run.run_id, RunStatus.RUNNING)
        await runs.count_attempt(tx, run.run_id, job_id=ctx.job_id)
        stored = await definitions.get_definition(tx, run.workflow_id, run.workflow_version)
    assert stored is not None
    ctx.log.info("resuming run", run_id=run.run_id, step_id=target, approved=answer["approved"])
    outcome = await _advance(ctx, database, run, stored.definition, resume=(target, answer))
    return await _record(ctx, database, run, outcome)


def parse_decision(decision: Any) -> dict[str, Any]:
    """``{"approved": bool, "comment": str | None, "by": str | None}`` from what ``resume_run`` was given."""
    if isinstance(decision, str):
        decision = {"decision": decision}
    if not isinstance(decision, dict):
        raise InvalidDecision(f"decision {decision!r}: use 'approve', 'reject' or {{\"decision\": ..., ...}}")
    unknown = set(decision) - _DECISION_KEYS
    if unknown:
        raise InvalidDecision(f"decision has unknown key(s) {sorted(unknown)}: use decision, comment and by")
    value = decision.get("decision")
    if value not in ("approve", "approved", "reject", "rejected"):
        raise InvalidDecision(f"decision {value!r}: use 'approve' or 'reject'")
    for key in ("comment", "by"):
        if decision.get(key) is not None and not isinstance(decision[key], str):
            raise InvalidDecision(f"decision {key} must be a string, got {decision[key]!r}")
    return {"approved": value.startswith("approve"), "comment": decision.get("comment"), "by": decision.get("by")}


# -- internals ------------------------------------------------------------------------------------------


async def _approval_to_resume(tx: Any, run: RunRecord, step_id: str | None) -> str:
    if step_id is not None:
        if await approvals.get_approval(tx, run.run_id, step_id) is None:
            raise RunNotWaiting(f"run {run.run_id} has no approval step {step_id!r} waiting")
        return step_id
    pending = await approvals.pending_approvals(tx, run.run_id)
    if len(pending) > 1:
        names = ", ".join(repr(p.step_id) for p in pending)
        raise RunNotWaiting(f"run {run.run_id} waits for several approvals ({names}); name one with step_id")
    if pending:
        return pending[0].step_id
    # Decided but not yet applied: an earlier try of this job recorded the decision and then stopped.
    for approval in await approvals.list_approvals(tx, run.run_id):
        latest = await runs.latest_step(tx, run.run_id, approval.step_id)
        if latest is not None and latest.status == StepStatus.WAITING_APPROVAL:
            return approval.step_id
    if run.status == RunStatus.WAITING_APPROVAL:
        raise RunNotWaiting(f"run {run.run_id} is waiting, but not for an undecided approval")
    raise RunNotWaiting(f"run {run.run_id} is {run.status}, not waiting for approval")


async def _advance(ctx: JobContext, database: Database, run: RunRecord, definition_json: dict[str, Any],
                   resume: tuple[str, dict[str, Any]] | None) -> RunOutcome:
    from agentworker.graphs.run_context import RunContext
    from agentworker.graphs.workflow_agent import RunOutcome, advance_run

    definition = parse_workflow(definition_json)
    scope = (await ctx.scope()).bind(run_id=run.run_id, workflow_id=run.workflow_id)
    context = RunContext(scope=scope, workflow_id=run.workflow_id, run_id=run.run_id, job_id=ctx.job_id,
                         check_cancelled=ctx.raise_if_cancelled)
    checkpoints = await ctx.runtime.checkpoints()
    budget = max(0.5, ctx.remaining - _RECORD_MARGIN_S)
    deadline = asyncio.timeout(budget)
    try:
        async with deadline:
            return await advance_run(definition, context, checkpoints, run_input=run.input, resume=resume)
    except TimeoutError:
        if not deadline.expired():
            raise
        return RunOutcome(RunStatus.FAILED, error={"error": "RunTimedOut",
                                                   "message": f"the run did not finish within its job's "
                                                              f"{ctx.timeout:g}s timeout"})


async def _record(ctx: JobContext, database: Database, run: RunRecord, outcome: RunOutcome) -> dict[str, Any]:
    outbox = await ctx.runtime.event_outbox()
    async with database.tenant(run.tenant_id) as tx:
        if outcome.status in (RunStatus.FAILED, RunStatus.REJECTED):
            await runs.interrupt_running_steps(tx, run.run_id)
        await runs.set_run_status(tx, run.run_id, outcome.status, output=outcome.output, error=outcome.error)
        if outcome.status in (RunStatus.COMPLETED, RunStatus.REJECTED):
            await promise_run_event(outbox, tx, run, "workflow_run_completed",
                                    run_event(run, outcome.status.value, outcome.output))
        elif outcome.status == RunStatus.FAILED:
            await promise_run_event(outbox, tx, run, "workflow_run_failed",
                                    run_event(run, "failed", None, {"error": outcome.error}))
    if outcome.status == RunStatus.FAILED:
        error = outcome.error or {}
        raise WorkflowRunFailed(f"run {run.run_id} of workflow {run.workflow_id!r} failed"
                                + (f" at step {error['step_id']!r}" if error.get("step_id") else "")
                                + f": {error.get('message', 'unknown error')}")
    return _summary(run, outcome.status, outcome.output, outcome.error, outcome.waiting_for)


async def promise_run_event(outbox: EventOutbox, tx: TenantTransaction, run: RunRecord, event: str,
                            data: dict[str, Any]) -> None:
    """Record a ``workflow_run_*`` event in ``tx`` (with the run's change) and publish it after the commit.
    A run starts once and ends once, so the run and the event name make its id."""
    await outbox.promise(tx, event, data, stable_event_id(run.tenant_id, "workflow", run.run_id, event))


def run_event(run: RunRecord, status: str, output: Any, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``data`` of a ``workflow_run_*`` event: the seed's shape, ``step_id`` null."""
    return {"workflow_id": run.workflow_id, "run_id": run.run_id, "step_id": None, "status": status,
            "output": output, **(extra or {})}


def _summary(run: RunRecord, status: str, output: Any, error: Any,
             waiting_for: Sequence[str] = ()) -> dict[str, Any]:
    """What the tasks return: the run's id, workflow, status, output or error, and the approvals it awaits."""
    return {"run_id": run.run_id, "workflow_id": run.workflow_id, "workflow_version": run.workflow_version,
            "status": str(status), "output": output, "error": error, "waiting_for": list(waiting_for)}
