"""Tenant routing: which pool, shard and queue serve a tenant.

The rule is a contract with backends written in any language, so it is spelled out exactly:

1. the tenant id must match ``^[a-z0-9][a-z0-9_-]{0,62}$``;
2. ``key`` = the first 8 bytes, read as a big-endian unsigned 64-bit integer, of the BLAKE2b digest
   (default 64-byte digest size, no key, no salt) of the UTF-8 tenant id;
3. ``shard = jump_consistent_hash(key, shards)`` (Lamping & Veach, 2014, "A Fast, Minimal Memory,
   Consistent Hash Algorithm");
4. the queue is ``agentworker:queue:{pool}:{shard}``; the pool is the tenant's in the tenant store
   (``pool`` of its record ``agentworker:tenant:{id}``, :mod:`agentworker.tenants`), else its own in
   the quota file, else its plan's, else the default plan's, else ``default_pool``.

``tests/data/routing_vectors.json`` holds reference answers for other implementations to check against.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from agentworker import keys
from agentworker.config import NAME_PATTERN, QuotaConfig, StoredTenant, TenantLimits
from agentworker.errors import AgentWorkerError

_TENANT_RE = re.compile(NAME_PATTERN)
_MASK64 = (1 << 64) - 1
_JUMP_MULTIPLIER = 2862933555777941757


class InvalidTenantId(AgentWorkerError, ValueError):
    """A tenant id that does not match the routing rule's pattern."""

    def __init__(self, tenant_id: object) -> None:
        self.tenant_id = tenant_id
        super().__init__(
            f"invalid tenant id {tenant_id!r}: must be 1-63 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )


def validate_tenant_id(tenant_id: object) -> str:
    """Return ``tenant_id`` unchanged if it is valid, else raise :class:`InvalidTenantId`."""
    # fullmatch, because re's "$" also matches before a trailing newline.
    if not isinstance(tenant_id, str) or not _TENANT_RE.fullmatch(tenant_id):
        raise InvalidTenantId(tenant_id)
    return tenant_id


def tenant_hash_key(tenant_id: str) -> int:
    """First 8 bytes of BLAKE2b-512 of the UTF-8 tenant id, as a big-endian unsigned integer."""
    digest = hashlib.blake2b(tenant_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big")


def jump_consistent_hash(key: int, buckets: int) -> int:
    """Lamping & Veach's jump consistent hash of a 64-bit ``key`` into ``buckets`` buckets."""
    if buckets < 1:
        raise ValueError("buckets must be >= 1")
    key &= _MASK64
    b, j = -1, 0
    while j < buckets:
        b = j
        key = (key * _JUMP_MULTIPLIER + 1) & _MASK64
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of(tenant_id: str, shards: int) -> int:
    """The shard (0-based) of a tenant in a pool of ``shards`` queues."""
    return jump_consistent_hash(tenant_hash_key(validate_tenant_id(tenant_id)), shards)


@dataclass(frozen=True, slots=True)
class Route:
    tenant_id: str
    pool: str
    shard: int
    queue: str

    @property
    def tenant_queue(self) -> str:
        """The sorted set holding this tenant's queued jobs inside its shard (see docs/protocol.md)."""
        return keys.tenant_queue(self.pool, self.shard, self.tenant_id)


def route_tenant(config: QuotaConfig, tenant_id: str, stored: StoredTenant | None = None) -> Route:
    """Where the jobs of ``tenant_id`` go under ``config`` (and its tenant-store entry, if it has one:
    :mod:`agentworker.tenants`)."""
    validate_tenant_id(tenant_id)
    pool = config.pool_of(tenant_id, stored)
    shard = shard_of(tenant_id, config.pools[pool].shards)
    return Route(tenant_id=tenant_id, pool=pool, shard=shard, queue=keys.queue(pool, shard))


#: the format of the published routing table. Versions only add keys (a key never changes meaning), so a
#: reader accepts any version from the first that has what it needs; 2 added the tenants' limits.
ROUTING_TABLE_VERSION = 2


def routing_table(config: QuotaConfig) -> dict[str, Any]:
    """The routing table the supervisor publishes at ``agentworker:routing`` (JSON; docs/protocol.md).

    It carries the rule's parameters (pools and their shard counts, explicit tenant pools) rather than
    a line per tenant, since the tenant set is open: any valid id routes to the default pool. With them
    come the limits of each tenant the file names (``tenant_limits``: its own, else ``tenant_defaults``')
    and of every other tenant (``tenant_defaults``), so a producer in another language passes the same
    admission limits to the enqueue script as the Python client does. ``tenants`` stays tenant -> pool:
    :func:`agentworker.rerouting.config_of_routing_table` reads the previous routing back from it.
    """
    return {
        "version": ROUTING_TABLE_VERSION,
        "rule": "shard = jump_consistent_hash(be_uint64(blake2b_512(utf8(tenant_id))[0:8]), shards)",
        "queue_format": keys.QUEUE_FORMAT,
        "tenant_pattern": NAME_PATTERN,
        "default_pool": config.default_tenant_pool,
        "pools": {
            name: {"shards": pool.shards, "queues": [keys.queue(name, s) for s in range(pool.shards)]}
            for name, pool in sorted(config.pools.items())
        },
        "tenants": {
            tenant_id: config.pool_of(tenant_id) for tenant_id in sorted(config.tenants)
        },
        "tenant_limits": {
            tenant_id: _published_limits(config.limits_of(tenant_id)) for tenant_id in sorted(config.tenants)
        },
        "tenant_defaults": _published_limits(config.default_limits),
        # the keys each plan sets (None: not set by the plan), for tenants of the tenant store
        "plans": {name: {"pool": plan.pool, **_published_limits(plan)} for name, plan in sorted(config.plans.items())},
    }


def _published_limits(limits: TenantLimits) -> dict[str, Any]:
    """A tenant's limits as producers use them: ``None`` where the file sets none; ``rate_limit`` as the
    token bucket the enqueue script takes (``count`` tokens refilled over ``period_ms``)."""
    rate = limits.rate
    return {
        "max_pending": limits.max_pending,
        "rate_limit": None if rate is None else {
            "count": int(rate.count) if rate.count.is_integer() else rate.count,
            "period_ms": int(rate.period_s * 1000),
        },
        "max_concurrency": limits.max_concurrency,
        "weight": limits.weight,
        "job_timeout": limits.job_timeout,
    }


def routing_table_json(config: QuotaConfig) -> str:
    return json.dumps(routing_table(config), sort_keys=True, separators=(",", ":"))
