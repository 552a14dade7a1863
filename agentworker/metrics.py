"""Prometheus metrics of worker processes (the supervisor adds its own in supervisor/).

In production every worker writes its samples to its own file in ``PROMETHEUS_MULTIPROC_DIR`` (set by
the supervisor before the worker starts) and the supervisor serves them merged on ``/metrics``.

Tenant labels only name tenants listed in the quota file; every other tenant counts as ``other``, so
the number of series stays bounded however many tenants there are.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import Counter, Gauge, Histogram

from agentworker.config import QuotaConfig

OTHER_TENANT = "other"

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

JOBS_TOTAL = Counter(
    "agentworker_jobs_total", "Jobs finished, by outcome (success, failure, timeout, rejected, retry, "
    "cancelled (on request), interrupted (a stopping worker re-queued it), deferred, poisoned, tries_exhausted, "
    "unreadable); task: other for a task the worker does not "
    "serve.", ["pool", "task", "outcome"])
JOB_DURATION = Histogram(
    "agentworker_job_duration_seconds", "Time jobs ran, from start to finish.", ["pool", "task"],
    buckets=_DURATION_BUCKETS)
JOB_QUEUE_WAIT = Histogram(
    "agentworker_job_queue_wait_seconds", "Time from a job being due to it starting.", ["pool"],
    buckets=_WAIT_BUCKETS)
JOBS_IN_PROGRESS = Gauge(
    "agentworker_jobs_in_progress", "Jobs running now.", ["pool"], multiprocess_mode="livesum")
TENANT_JOBS_TOTAL = Counter(
    "agentworker_tenant_jobs_total", "Jobs finished per tenant named in the quota file (others: 'other').",
    ["pool", "tenant", "outcome"])
TENANT_JOBS_IN_PROGRESS = Gauge(
    "agentworker_tenant_jobs_in_progress", "Jobs running now per tenant named in the quota file.",
    ["pool", "tenant"], multiprocess_mode="livesum")
JOBS_DEFERRED = Counter(
    "agentworker_jobs_deferred_total", "Job starts put off: the tenant was at its max_concurrency, or a "
    "running job went back to wait for the tenant's LLM budget.",
    ["pool", "tenant"])
DEAD_LETTERS_TOTAL = Counter(
    "agentworker_dead_letters_total", "Queue entries moved to the pool's dead letters, by reason (non_utf8_id, "
    "missing_record, wrong_type, bad_record, bad_field).", ["pool", "reason"])
JOB_CRASH_RERUNS = Counter(
    "agentworker_job_crash_reruns_total", "Jobs started again because the worker running them died.", ["pool"])
JOB_LEASES_LOST = Counter(
    "agentworker_job_leases_lost_total", "Running jobs stopped because another worker took their lapsed lease.",
    ["pool"])

LLM_REQUESTS_TOTAL = Counter(
    "agentworker_llm_requests_total", "Chat model calls by outcome (success, timeout, error).",
    ["provider", "model", "outcome"])
LLM_REQUEST_DURATION = Histogram(
    "agentworker_llm_request_duration_seconds", "Time chat model calls took.", ["provider", "model"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60))
LLM_TOKENS_TOTAL = Counter(
    "agentworker_llm_tokens_total", "Tokens reported by providers (kind: input, output); tenant: a tenant the "
    "quota file names, else other.", ["provider", "model", "kind", "tenant"])
LLM_BUDGET_REMAINING = Gauge(
    "agentworker_llm_budget_remaining_tokens", "Tokens left in the tenant's llm_tokens window, as of its last "
    "model call in this process (tenants the quota file names).", ["tenant"], multiprocess_mode="mostrecent")
LLM_BUDGET_EXHAUSTED = Counter(
    "agentworker_llm_budget_exhausted_total", "Model calls refused because the tenant's llm_tokens budget had "
    "no room (each defers its job).", ["tenant"])
LLM_SLOT_WAIT = Histogram(
    "agentworker_llm_slot_wait_seconds", "Time model calls waited for one of the tenant's llm_concurrency "
    "slots.", ["tenant"], buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60))


#: every ``outcome`` of agentworker_jobs_total (a worker creates each series at 0 when it starts)
JOB_OUTCOMES = ("success", "failure", "timeout", "rejected", "retry", "cancelled", "interrupted", "deferred",
                "poisoned", "tries_exhausted", "unreadable")


def zero_job_series(pool: str, tasks: Collection[str], tenants: Collection[str]) -> None:
    """Create the job counters' series at 0, so a fresh deploy shows 0 rather than "No data"."""
    for outcome in JOB_OUTCOMES:
        for task in (*tasks, OTHER_TASK):
            JOBS_TOTAL.labels(pool, task, outcome)
        for tenant in (*tenants, OTHER_TENANT):
            TENANT_JOBS_TOTAL.labels(pool, tenant, outcome)


#: the ``task`` label of a job whose task this worker does not serve (a producer's mistake, or a hostile
#: one's flood of made-up names: they must not each make a series)
OTHER_TASK = "other"


def task_label(known: Collection[str], task: str | None) -> str:
    return task if task is not None and task in known else OTHER_TASK


def tenant_label(config: QuotaConfig, tenant_id: str | None) -> str:
    return tenant_id if tenant_id and tenant_id in config.tenants else OTHER_TENANT

SCHEDULE_DISPATCHES_TOTAL = Counter(
    "agentworker_schedule_dispatches_total", "Due times of tenant schedules by outcome: dispatched (a job was "
    "enqueued), duplicate (its job already existed), missed (passed over by the missed-run policy), "
    "over_quota (held back; dispatched later), error.", ["kind", "outcome"])
POLLS_TOTAL = Counter(
    "agentworker_polls_total", "Polls of external sources by outcome (success, error, backing_off, superseded).",
    ["outcome"])
POLL_ITEMS_TOTAL = Counter(
    "agentworker_poll_items_total", "New items found by polls, each starting its workflow once.")
WEBHOOKS_TOTAL = Counter(
    "agentworker_webhooks_total", "Incoming webhooks by outcome (accepted, duplicate, bad_signature, stale, "
    "unknown_source).", ["outcome"])
