"""The leases one worker process holds: one per running job, plus tenant concurrency leases.

* **Job leases** (see :mod:`agentworker.job_leases`): the in-progress key of each running job holds this
  process's holder id and lives ``AGENTWORKER_JOB_LEASE_TTL`` seconds; the ids are listed in the
  holder's set so the supervisor can release them the moment it reaps this process.
* **Tenant leases** (``max_concurrency`` across every process and replica): a Redis sorted set per tenant
  holds one lease per running job (member ``{job id}@{holder}``, score: expiry in ms of Redis' own clock),
  taken in the claim script only if fewer than the cap remain, so concurrent workers cannot overshoot.
  A job that finds its tenant at the cap is left in its queue for a later poll (deferred, not failed,
  and without spending one of its tries).

Both kinds are taken by the claim and dropped by the finish script (one round trip each); this class
renews them all in one script every third of the shorter TTL. A holder killed with SIGKILL stops
renewing: its supervisor releases its leases at once, and without one they lapse after their TTL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import jobs, keys
from agentworker.job_leases import holder_id, lua_source
from agentworker.logs import get_logger

log = get_logger(__name__)

#: called with the ids of jobs whose lease another holder has taken over (or that are gone)
LeasesLost = Callable[[list[str]], None]


class Leases:
    """Every lease this process holds, renewed together."""

    def __init__(self, redis: Redis, *, job_ttl_s: float = 10.0, tenant_ttl_s: float = 30.0,
                 holder: str | None = None) -> None:
        self.redis = redis
        self.job_ttl_ms = max(1000, int(job_ttl_s * 1000))
        self.ttl_ms = max(1, int(tenant_ttl_s * 1000))  # tenant leases
        self.holder = holder or holder_id()
        self.held_key = keys.held_jobs(self.holder)
        self._renew = redis.register_script(lua_source("renew"))
        # job id -> (its shard's running set, the tenant whose concurrency lease it holds, if any)
        self._jobs: dict[str, tuple[str, str | None]] = {}

    @property
    def held(self) -> int:
        return len(self._jobs)

    @property
    def renew_interval_s(self) -> float:
        return min(self.job_ttl_ms, self.ttl_ms) / 3000

    def member(self, job_id: str) -> str:
        """The job's member in its tenant's lease set (per holder: a reader never touches another's)."""
        return f"{job_id}@{self.holder}"

    def track(self, job_id: str, running_key: str, tenant_with_lease: str | None) -> None:
        self._jobs[job_id] = (running_key, tenant_with_lease)

    def forget(self, job_id: str) -> None:
        self._jobs.pop(job_id, None)

    def tenant_lease_of(self, job_id: str) -> str | None:
        held = self._jobs.get(job_id)
        return held[1] if held is not None else None

    async def renew_all(self) -> list[str]:
        """Renew every lease; return the ids of jobs this process no longer holds."""
        held = list(self._jobs.items())
        if not held:
            return []
        tenant_held = [(job_id, tenant) for job_id, (_, tenant) in held if tenant is not None]
        lease_keys = [self.held_key]
        for job_id, (running_key, _) in held:
            lease_keys += [jobs.in_progress_key(job_id), running_key]
        lease_keys += [keys.tenant_leases(tenant) for _, tenant in tenant_held]
        lost = await self._renew(keys=lease_keys, args=[
            self.holder, self.job_ttl_ms, len(held), self.ttl_ms, *[job_id for job_id, _ in held],
            *[self.member(job_id) for job_id, _ in tenant_held]])
        return [j.decode() if isinstance(j, bytes) else str(j) for j in lost]

    async def renew_forever(self, on_lost: LeasesLost) -> None:
        """Renew until cancelled; Redis errors are logged, not fatal (the leases lapse if it lasts)."""
        failing = False
        while True:
            await asyncio.sleep(self.renew_interval_s)
            try:
                lost = await self.renew_all()
            except (RedisError, OSError) as exc:
                if not failing:
                    log.warning("lease renewal failed; retrying", error=str(exc))
                failing = True
                continue
            if failing:
                log.info("lease renewal recovered")
            failing = False
            if lost:
                on_lost(lost)
