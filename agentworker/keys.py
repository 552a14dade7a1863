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
    """The ARQ queue (a sorted set of job ids scored by due time in ms) of one shard of a pool."""
    return QUEUE_FORMAT.format(pool=pool, shard=shard)


def event_channel(tenant_id: str) -> str:
    """Pub/sub channel of a tenant's live events."""
    return f"{PREFIX}:events:{tenant_id}"


def event_stream(tenant_id: str) -> str:
    """Capped stream of a tenant's events, for backends catching up after downtime."""
    return f"{PREFIX}:stream:{tenant_id}"


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
