"""The Redis side of a job's life after enqueue: claim, lease renewal, finish, release, dead letters.

Each step is one Lua script (``agentworker/lua/*.lua``), so it is atomic and costs one round trip. The
record formats are ARQ's (``arq:job:<id>``, ``arq:result:<id>``, ``arq:retry:<id>``,
``arq:in-progress:<id>``), so the client's ``JobHandle`` and stock ARQ tooling read them as before.

**Where queued jobs are** (per shard ``q = {pool}:{shard}``; docs/protocol.md for producers): each
tenant has its own queue ``agentworker:tq:{q}:{tenant}`` (job ids scored by due time), and the shard
knows its tenants by state: ``ready:{q}`` (first job due; scored by virtual time), ``waiting:{q}`` (first
job later; scored by its due time), ``capped:{q}`` (at ``max_concurrency``; scored by when to look
again). A claimed job leaves its tenant's queue for ``running:{q}`` (scored by lease deadline) until it
finishes or goes back. ``agentworker:queue:{pool}:{shard}`` is the shard's inbox for plain ARQ
producers, adopted by the claim. The claim picks tenants by weighted fair queuing (see claim.lua):
its cost depends on how many jobs it takes, never on any tenant's backlog.

What differs from ARQ is also how long a claim lives and who may end it:

* **A lease, not a timeout.** The in-progress key holds its *holder* (``{hostname}:{pid}`` of the worker
  process) and lives ``AGENTWORKER_JOB_LEASE_TTL`` seconds (default 10), renewed every third of that by
  the holder for all its jobs in one script (:data:`RENEW_LUA`). ``job_timeout`` is the job's deadline,
  enforced by the envelope; the lease only says "someone is alive and running it".
* **Each holder's jobs are listed** in ``agentworker:held:{holder}``. When the supervisor reaps a dead
  worker it runs :data:`RELEASE_HOLDER_LUA`: the dead holder's leases are dropped at once (tenant
  concurrency leases too) and the pool is woken, so the jobs run again within milliseconds. When a whole
  host is gone nobody releases them, and the leases lapse within one TTL.
* **A crash is not a try.** ``agentworker:attempt:{id}`` records the holder of the attempt in progress.
  A claim that finds a previous attempt never finished knows its worker died: it counts a *crash*
  (``crashes``) and gives back the try the dead attempt had taken. Past the pool's
  ``max_crash_retries`` the claim answers ``poisoned`` and the worker fails the job as ``JobPoisoned``.
* **Only the holder ends a run.** Finishing checks the lease is still ours: a worker whose lease lapsed
  (a blocked loop, a partition) and whose job another worker took over writes nothing — the new
  holder's outcome wins — and renewal tells it which jobs it lost so it can cancel them.
* **Cancel requests** (:mod:`agentworker.job_control`, ``cancel.lua``): a queued job is withdrawn from
  its queue at once; a running one's id joins ARQ's abort set (``arq:abort``), which its worker polls for
  the jobs it runs and the claim reads for each job it takes (the reply's last field); finishing a job
  drops it from that set.
* **Dead letters.** A queue entry that cannot be run (a record missing or of the wrong Redis type, found
  by the claim; a non-UTF-8 id or an undecodable record, found by the worker) is moved once, atomically,
  from the queue to the pool's hash ``agentworker:dead:{pool}`` with its reason (:data:`DEAD_LETTER_LUA`).

Scripts build per-job and per-tenant key names from ids (a claim cannot know in advance which tenants
it will serve): the prefixes are substituted from :mod:`agentworker.keys` and :mod:`agentworker.jobs`
when the scripts are loaded, so every name still has one definition. (This is why the layout assumes
one Redis, or Sentinel: not Redis Cluster.)
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from functools import cache
from importlib import resources

from arq.constants import abort_jobs_ss
from redis.asyncio import Redis

from agentworker import jobs, keys
from agentworker.config import QuotaConfig

#: how long a job's attempt record is kept after its last claim (it is deleted when the job finishes)
ATTEMPT_TTL_MS = 7 * 86_400_000
#: ARQ's expiry of the retry counter (arq.worker: 88,400 s)
RETRY_TTL_S = 88_400
#: a capped tenant is looked at again this often even if none of its jobs finishes (a lease that lapsed)
CAPPED_RECHECK_MS = 1_000

#: reasons a queue entry is dead-lettered (the label values of agentworker_dead_letters_total)
DEAD_LETTER_REASONS = ("non_utf8_id", "bad_id", "missing_record", "wrong_type", "bad_record", "bad_field")

_PREFIXES = {
    "%AW%": keys.PREFIX + ":", "%INPROG%": jobs.in_progress_key(""), "%ATTEMPT%": keys.job_attempt(""),
    "%JOB%": jobs.job_key(""), "%RETRY%": jobs.retry_key(""), "%ABORT%": abort_jobs_ss,
}


@cache
def lua_source(name: str) -> str:
    """A script of ``agentworker/lua``: the worker-side ones with the shared functions prepended and the
    key prefixes filled in. ``enqueue`` is the producers' script, self-contained, as shipped."""
    text = resources.files("agentworker").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
    # (depth, limits: names from the prefixes only)
    if name in ("claim", "finish", "release", "renew", "move_tenant", "cancel"):
        text = resources.files("agentworker").joinpath("lua", "_dispatch.lua").read_text(encoding="utf-8") \
            + "\n" + text
    for placeholder, prefix in _PREFIXES.items():
        text = text.replace(placeholder, prefix)
    return text


def holder_id(pid: int | None = None) -> str:
    """The lease holder name of a worker process: the supervisor computes the same for its children."""
    return f"{socket.gethostname()}:{os.getpid() if pid is None else pid}"


def dead_letter_record(*, reason: str, detail: str, queue: str, score: float) -> bytes:
    """The JSON kept for one dead letter (the claim script writes the same fields)."""
    return json.dumps({"reason": reason, "detail": detail, "queue": queue, "score": score,
                       "ts": int(time.time() * 1000)}).encode()


async def release_holder(redis: Redis, holder: str, pool: str) -> int:
    """Release every job lease of a dead worker process at once; return how many it held."""
    released = await redis.eval(lua_source("release"), 1, keys.held_jobs(holder), holder,  # type: ignore[misc]
                                keys.wakeup_channel(pool))
    return int(released)


def limits_fields(config: QuotaConfig, pool: str) -> dict[str, str]:
    """What the claim script reads of the tenants of ``pool``: ``"{max_concurrency} {weight} {max_pending}"``
    (0 and -1 for none) per tenant the file names, ``*`` for the others, and ``plan:{name}`` per plan
    (:func:`claim_layer`), which a tenant of the tenant store (``agentworker:tenant:{id}``) lays over."""

    def value(tenant: str | None) -> str:
        limits = config.limits_of(tenant) if tenant is not None else config.default_limits
        pending = -1 if limits.max_pending is None else limits.max_pending
        return f"{limits.max_concurrency or 0} {limits.weight or 1:g} {pending}"

    fields = {tenant: value(tenant) for tenant in config.tenants if config.pool_of(tenant) == pool}
    fields["*"] = value(None)
    for name, plan in config.plans.items():  # every pool: a stored tenant may take any plan
        fields[f"plan:{name}"] = claim_layer(plan.max_concurrency, plan.weight, plan.max_pending)
    return fields


def claim_layer(max_concurrency: int | None, weight: float | None, max_pending: int | None) -> str:
    """A layer of limits over the file's for the claim script: ``"{max_concurrency} {weight}
    {max_pending}"`` with ``-`` for a key the layer does not set (a plan; a tenant's stored overrides)."""
    return " ".join("-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)
                    for v in (max_concurrency, weight, max_pending))


def quota_file_version(path: str | os.PathLike[str] | None) -> int:
    """The version of a quota file's limits: its modification time in ms (a ConfigMap update writes a new
    file, so newer content has a later time; restarting a process does not change it)."""
    if path is None:
        return 0
    try:
        return int(os.stat(path).st_mtime * 1000)
    except OSError:
        return 0


async def publish_limits(redis: Redis, config: QuotaConfig, pool: str, version_ms: int) -> bool:
    """Publish the pool's tenant limits for the claim script; False if a newer quota file's are kept.

    Every worker publishes its pool's at start and on reload, the supervisor all pools' with the routing
    table; the newest file (by :func:`quota_file_version`) wins, so two supervisors mid-rollout with
    different files do not flip each other's limits back and forth."""
    fields = limits_fields(config, pool)
    digest = hashlib.blake2b(json.dumps(fields, sort_keys=True).encode(), digest_size=16).hexdigest()
    flat = [item for pair in sorted(fields.items()) for item in pair]
    written = await redis.eval(lua_source("limits"), 1, keys.tenant_limits(pool), str(version_ms),  # type: ignore[misc]
                               digest, *flat)
    return bool(written)
