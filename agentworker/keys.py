"""Every Redis key and channel name agentworker uses, in one place.

Names under ``agentworker:`` are ours. ARQ's own keys (``arq:job:<id>``, ``arq:result:<id>``,
``arq:in-progress:<id>``, ``arq:retry:<id>``) are global per Redis database, which is why job ids embed
the tenant; :mod:`agentworker.jobs` builds them from ARQ's own constants.
"""

from __future__ import annotations

PREFIX = "agentworker"
QUEUE_FORMAT = PREFIX + ":queue:{pool}:{shard}"
ROUTING = PREFIX + ":routing"


def queue(pool: str, shard: int) -> str:
    """The name of one shard of a pool. It is also the shard's *inbox*: a sorted set of job ids scored by
    due time (ms), where a plain ARQ producer's ``enqueue_job`` puts jobs; workers adopt them into their
    tenants' queues (see docs/protocol.md). Our own enqueue script writes the tenant queue directly."""
    return QUEUE_FORMAT.format(pool=pool, shard=shard)


def shard_id(pool: str, shard: int) -> str:
    """``{pool}:{shard}``: the part every per-shard key below ends with (scripts build names from it)."""
    return f"{pool}:{shard}"


def tenant_queue(pool: str, shard: int, tenant_id: str) -> str:
    """Sorted set of one tenant's queued (not running) job ids in one shard, scored by due time (ms)."""
    return f"{PREFIX}:tq:{pool}:{shard}:{tenant_id}"


def ready_tenants(pool: str, shard: int) -> str:
    """Sorted set of the shard's tenants whose first job is due, scored by their virtual time."""
    return f"{PREFIX}:ready:{pool}:{shard}"


def waiting_tenants(pool: str, shard: int) -> str:
    """Sorted set of the shard's tenants whose first job is not due yet, scored by its due time (ms)."""
    return f"{PREFIX}:waiting:{pool}:{shard}"


def capped_tenants(pool: str, shard: int) -> str:
    """Sorted set of the shard's tenants at their max_concurrency, scored by when to look again (ms)."""
    return f"{PREFIX}:capped:{pool}:{shard}"


def running_jobs(pool: str, shard: int) -> str:
    """Sorted set of the shard's running job ids, scored by their lease deadline (ms, Redis clock)."""
    return f"{PREFIX}:running:{pool}:{shard}"


def virtual_clock(pool: str, shard: int) -> str:
    """The shard's virtual time: where a tenant that becomes ready starts."""
    return f"{PREFIX}:vclock:{pool}:{shard}"


def tenant_limits(pool: str) -> str:
    """Hash of the limits the claim script reads: tenant -> ``"{max_concurrency} {weight} {max_pending}"``
    (0 = none), ``*`` for tenants the file does not name, ``_version`` / ``_digest`` of the file."""
    return f"{PREFIX}:limits:{pool}"


def event_channel(tenant_id: str) -> str:
    """Pub/sub channel of a tenant's live events."""
    return f"{PREFIX}:events:{tenant_id}"


def event_stream(tenant_id: str) -> str:
    """Capped stream of a tenant's events, for backends catching up after downtime."""
    return f"{PREFIX}:stream:{tenant_id}"


def published_event_ids(tenant_id: str) -> str:
    """Sorted set of the ids of a tenant's promised events already in its stream (id -> publication number),
    bounded like the stream: what keeps a re-published event out of the stream a second time."""
    return f"{PREFIX}:stream-ids:{tenant_id}"


def pending(tenant_id: str) -> str:
    """Sorted set of a tenant's enqueued, not yet started job ids, scored by their expiry (ms)."""
    return f"{PREFIX}:pending:{tenant_id}"


def rate_bucket(tenant_id: str) -> str:
    """Hash holding a tenant's rate-limit token bucket."""
    return f"{PREFIX}:rate:{tenant_id}"


def tenant_leases(tenant_id: str) -> str:
    """Sorted set of running-job leases of a tenant (member: job id, score: lease expiry in ms)."""
    return f"{PREFIX}:leases:{tenant_id}"


def wakeup_channel(pool: str) -> str:
    """Pub/sub channel on which enqueuers tell a pool's workers that a job has landed."""
    return f"{PREFIX}:wakeup:{pool}"


def held_jobs(holder: str) -> str:
    """Set of the job ids one worker process (``holder``) holds leases on; the supervisor releases it."""
    return f"{PREFIX}:held:{holder}"


def job_attempt(job_id: str) -> str:
    """Hash of a job's attempts: ``holder`` while one runs, ``crashes`` (runs whose worker died)."""
    return f"{PREFIX}:attempt:{job_id}"


def dead_letters(pool: str) -> str:
    """Hash of a pool's dead letters: raw job id -> JSON ``{reason, detail, queue, score, ts}``."""
    return f"{PREFIX}:dead:{pool}"


def run_sweeper_lock() -> str:
    """Lock held by the one worker process sweeping orphaned workflow runs at a time."""
    return f"{PREFIX}:lock:run-sweeper"


def event_relay_lock() -> str:
    """Lock held by the one worker process relaying stale event outbox rows at a time."""
    return f"{PREFIX}:lock:event-relay"


def tenant_record(tenant_id: str) -> str:
    """Hash: the tenant's tenant-store entry as every process reads it (agentworker.tenants)."""
    return f"{PREFIX}:tenant:{tenant_id}"


def tenant_changes_channel() -> str:
    """Pub/sub channel: a tenant id whose tenant-store entry just changed (drop it from caches)."""
    return f"{PREFIX}:tenant-changes"


def tenants_synced() -> str:
    """String: the tenant store's change sequence number up to which Redis holds every record."""
    return f"{PREFIX}:tenants:synced"


def tenant_sync_lock() -> str:
    """The lock of the process copying tenant-store changes into Redis."""
    return f"{PREFIX}:lock:tenant-sync"


def llm_token_log(tenant_id: str) -> str:
    """Sorted set: the tenant's model-call reservations in its token window (call id -> time ms)."""
    return f"{PREFIX}:llm:log:{tenant_id}"


def llm_token_amounts(tenant_id: str) -> str:
    """Hash: tokens of each reservation of :func:`llm_token_log` (call id -> tokens)."""
    return f"{PREFIX}:llm:amounts:{tenant_id}"


def llm_token_total(tenant_id: str) -> str:
    """String: the sum of :func:`llm_token_amounts` (the tokens of the current window)."""
    return f"{PREFIX}:llm:total:{tenant_id}"


def llm_budget_exhausted(tenant_id: str) -> str:
    """String with a TTL of one window: set when the tenant's budget was first found exhausted."""
    return f"{PREFIX}:llm:exhausted:{tenant_id}"


def llm_slots(tenant_id: str) -> str:
    """Sorted set: the tenant's model calls in flight (call id -> lease expiry ms)."""
    return f"{PREFIX}:llm:slots:{tenant_id}"


def catalog_tasks() -> str:
    """Hash: task names the workers serve -> when last published (ms) (agentworker.catalog)."""
    return f"{PREFIX}:catalog:tasks"


def catalog_tools() -> str:
    """Hash: tool names the workers serve -> ``*`` or the tenants it is restricted to (agentworker.catalog)."""
    return f"{PREFIX}:catalog:tools"


def admission_refusals() -> str:
    """Hash: jobs refused at admission, ``"{pool} {limit}"`` -> count (the enqueue and claim scripts)."""
    return f"{PREFIX}:refusals"
