"""Prometheus metrics of worker processes (the supervisor adds its own in supervisor/).

In production every worker writes its samples to its own file in ``PROMETHEUS_MULTIPROC_DIR`` (set by
the supervisor before the worker starts) and the supervisor serves them merged on ``/metrics``.

Tenant labels only name tenants listed in the quota file; every other tenant counts as ``other``, so
the number of series stays bounded however many tenants there are.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from agentworker.config import QuotaConfig

OTHER_TENANT = "other"

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900)
_WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)

JOBS_TOTAL = Counter(
    "agentworker_jobs_total", "Jobs finished, by outcome (success, failure, timeout, rejected, retry, "
    "cancelled, poisoned, tries_exhausted, unreadable).", ["pool", "task", "outcome"])
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
    "agentworker_jobs_deferred_total", "Job starts put off because the tenant was at its max_concurrency.",
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
    "agentworker_llm_tokens_total", "Tokens reported by providers (kind: input, output).",
    ["provider", "model", "kind"])


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
