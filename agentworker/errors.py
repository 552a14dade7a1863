"""The root of agentworker's errors, and the error names that cross the wire.

Every error a user can catch or see — the backend using the client, someone running the CLI, a task or
tool author — derives from :class:`AgentWorkerError`, so ``except AgentWorkerError`` catches anything
agentworker raised on purpose. Each class lives with the code that raises it and keeps its built-in base
as well (``class InvalidTenantId(AgentWorkerError, ValueError)``): ``except ValueError`` keeps working.
The ones users import are re-exported by :mod:`agentworker` (``from agentworker import QuotaExceeded``).

A few exceptions are signals between two parts of the package and never leave it: they are listed in
:data:`INTERNAL_ERRORS` with what they become, and stay outside the tree on purpose (catching the root
must not catch a step's control flow).

A failed job, a failed run and a failed step carry the *name* of an error, not the object: the ``error``
field of a failed job's result (``JobFailed.error``), of ``job_failed`` and ``job_retrying`` events, of
a run's and a step's ``error`` record (``workflow_run_failed``, ``workflow_step_failed``) and of
``agent_run_failed``. The names agentworker itself produces are in :data:`WIRE_ERRORS`; any other name is
the class of an exception a task, step or tool raised (its own, a library's, or a Python built-in such
as ``ValueError``). The README's "Errors" table shows the same list (a test keeps them equal).

This module imports nothing: every module of the package, the supervisor's included, may import it.
"""

from __future__ import annotations

__all__ = ["INTERNAL_ERRORS", "WIRE_ERRORS", "AgentWorkerError"]


class AgentWorkerError(Exception):
    """The base of every error agentworker raises for a user to catch."""


#: name -> meaning of every error name agentworker puts on the wire itself (see the module docstring)
WIRE_ERRORS: dict[str, str] = {
    # -- a job that failed for good (its result, `job_failed`; recorded on the run it was driving too)
    "JobRejected": "The job was refused before its task ran: misrouted, an unknown task, or a payload that does "
                   "not fit the task (reason `rejected`).",
    "JobTimedOut": "The job ran past its timeout and was cancelled (reason `timeout`).",
    "JobPoisoned": "The job's worker died each time it ran it, more than the pool's `max_crash_retries` "
                   "(reason `poisoned`).",
    "JobTriesExhausted": "The job asked for another try after its last one, the pool's `max_tries` "
                         "(reason `tries_exhausted`).",
    "JobUnreadable": "The job's queue entry could not be read; it is in the pool's dead letters "
                     "(reason `unreadable`).",
    "JobCancelled": "The job was cancelled on request (`agentworker cancel`, `client.cancel`, the console): not "
                    "retried, a `job_cancelled` event; its workflow run ends `cancelled`.",
    # -- job control (the client, the CLI, the admin HTTP endpoints: agentworker.job_control)
    "JobNotFound": "Nothing is known of that job id (never enqueued, or its result has expired).",
    "JobNotCancellable": "The job has already finished (completed, failed or cancelled): there is nothing to "
                         "cancel.",
    "JobNotRetryable": "Only a failed or cancelled job can be retried, and only while its result (which keeps its "
                       "arguments) is kept.",
    "DatabaseUnavailable": "PostgreSQL could not be reached or dropped the connection (the built-in tasks retry "
                           "it while tries remain).",
    "DatabaseNotMigrated": "The database's schema is missing or older than the worker's: run "
                           "`agentworker migrate`.",
    "DatabaseError": "PostgreSQL cannot be used as it is (the login was refused, or the role bypasses "
                     "row-level security).",
    "QuotaExceeded": "A job that starts workflow runs (`poll_source`, `handle_webhook`) found the tenant over "
                     "`max_pending` or `rate_limit` on each of its tries.",
    # -- the built-in workflow and agent tasks
    "WorkflowRunFailed": "`execute_workflow` or `resume_run`: the run failed; the run's own `error` says why.",
    "WorkflowNotFound": "`execute_workflow`: the tenant has no workflow of that id.",
    "RunNotFound": "`resume_run`: the tenant has no run of that id.",
    "RunNotWaiting": "`resume_run`: the run is not waiting for an approval (or waits for several and no "
                     "`step_id` was given).",
    "InvalidDecision": "`resume_run`: the decision is not approve or reject.",
    "InvalidRunId": "A run id that is not a UUID.",
    "NotWaitingForApproval": "The run is not paused at the approval step the decision was for.",
    "InvalidAgentInput": "An agent task's payload has a bad field (an id, the prompt, the tools, a decision).",
    "AgentRunNotFound": "The tenant has no agent run of that id.",
    "InvalidAgentDecision": "The decisions given do not match the tool calls waiting for approval.",
    # -- the built-in scheduled tasks
    "PollSourceFailed": "`poll_source`: the source could not be read (unreachable, an HTTP error, or an answer "
                        "that is not the polling contract's).",
    "WebhookRejected": "`handle_webhook`: the call was refused before anything ran (bad signature, stale, bad "
                       "body, unknown source).",
    "InvalidReport": "`send_run_report`: the report's period (`period_hours`, `period_end`) is not usable.",
    # -- a run's error (`workflow_run_failed`, the run record); a failed step's error, with its `step_id`
    "RunOrphaned": "No job was left to continue the run; the run sweeper failed it (reason `orphaned`).",
    "RunTimedOut": "The run did not finish within its job's timeout.",
    "TemplateError": "A template (a step's inputs, the workflow's output) could not be rendered.",
    # -- a step's error (`workflow_step_failed`)
    "StepError": "The step failed in a way worth retrying under its retry policy (an HTTP error, an "
                 "unreachable URL).",
    "PermanentStepError": "The step failed in a way retrying cannot fix (bad rendered inputs, an unknown tool, "
                          "a refused address, a body too large).",
    "TimeoutError": "A step ran past its `timeout_seconds` (a step's error; elsewhere, a task's own).",
    # -- tools (tool steps, agents' tool calls, `agent_run_failed`)
    "ToolError": "A tool call failed; the message is one sentence safe to show.",
    "ToolInputError": "A tool's arguments do not fit its input model; the message names each bad field.",
    "ToolTimeout": "A tool call ran past the tool's timeout.",
    "ToolNotConfigured": "The tenant has not configured what the tool needs (SMTP, CRM, ...).",
    "UnknownTool": "No tool of that name is available to the tenant.",
    # -- chat models (`llm` steps, `agent_run_failed`)
    "ModelTimeout": "The chat model did not answer within its timeout.",
    "ModelSpecError": "The model name or its settings cannot be used.",
    "ModelProviderMissing": "The model's provider package is not installed on the worker.",
    "LlmCallTooLarge": "A model call whose estimated tokens alone are over the tenant's whole `llm_tokens` "
                       "budget: it can never run.",
}

#: ``module.Class`` -> why it does not derive from :class:`AgentWorkerError`: each is caught inside the
#: package and turned into something else before a user could see it
INTERNAL_ERRORS: dict[str, str] = {
    "agentworker.jobs.JobDeferred": "the worker puts the job back in its queue, due later, without spending a "
                                    "try (a `job_deferred` event)",
    "agentworker.llm_budget.LlmBudgetExhausted": "a JobDeferred: the tenant's token budget has no room now",
    "agentworker.health.common.Refused": "a tenant endpoint's refusal: the app answers it as its status code and "
                                       "JSON body",
    "agentworker.ingress.app.Refused": "a webhook delivery's refusal: the ingress answers it as its status code "
                                       "and one-sentence JSON body",
    "agentworker.cli.CommandError": "the CLI's own exit path: `main` prints it as one line and exits with its "
                                    "code",
    "agentworker.jobs.UnreadableJob": "the job decoder's signal: the worker dead-letters the entry and reports "
                                      "JobUnreadable",
    "agentworker.tasks.registry.PayloadError": "the envelope turns it into JobRejected",
    "agentworker.graphs.step_nodes.StepFailed": "a step node's signal to the run: its `error` (the step's own "
                                                "error name) becomes the run's",
    "agentworker.graphs.agent_step.AgentStepUnavailable": "the agent step kind turns it into PermanentStepError",
    "agentworker.schedules.sources.SourceError": "the poll turns it into PollSourceFailed",
    "agentworker.supervisor.directory_lock.DirectoryInUse": "the supervisor's start turns it into StartupError",
    "agentworker.supervisor.zygote.ZygoteError": "the supervisor kills the zygote and spawns the worker without "
                                                 "it",
    "agentworker.pools.zygote_process.UnsafeToFork": "the zygote reports it and exits; the supervisor "
                                                     "spawns without it",
}
