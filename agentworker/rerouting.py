"""Moving queued jobs when the quota file changes where tenants route.

Moving a tenant to another pool, changing a pool's ``shards``, changing ``default_pool`` or removing a
pool changes the queue of some tenants (:func:`agentworker.routing.route_tenant`). Jobs already queued
stay where the old routing put them, so the supervisor moves them (:func:`reroute`, after a reload):
each tenant's queue is moved whole, atomically, by one script (``agentworker/lua/move_tenant.lua``),
keeping every job's due time; the tenant becomes ready or waiting in its new shard. Running jobs are
not moved: they finish where they are, and one that goes back to its queue (a retry, a crash, a drain)
goes back to the shard it ran in. Those, and jobs a producer still on the old routing enqueued, are
moved by :func:`reroute_strays`, which the supervisor runs every minute over every shard it knows of.

Which tenants a reroute looks at: those the files name (their old and new routes are known), and,
for pools whose ``shards`` changed, the old ``default_pool`` when it changed and removed pools, every
tenant with queued work in one of their old shards (read from the shard's ready, waiting and capped
sets with ZSCAN, in pages). Inbox entries of a shard that no longer exists (jobs of plain ARQ producers
nobody will adopt there) move to the inbox of their tenant's new shard.

docs/supervisor.md ("Moving tenants and resharding") explains the order of a reload and its races.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from redis.asyncio import Redis

from agentworker import keys
from agentworker.config import PlanQuota, PoolQuota, QuotaConfig, StoredTenant, TenantQuota
from agentworker.job_leases import lua_source
from agentworker.logs import get_logger
from agentworker.routing import InvalidTenantId, Route, route_tenant

if TYPE_CHECKING:  # the directory is handed in: agentworker.tenants moves jobs with this module
    from agentworker.tenants import TenantDirectory

__all__ = ["STRAY_SCAN_PER_SET", "config_of_routing_table", "move_tenant", "reroute", "reroute_strays"]

log = get_logger("agentworker.rerouting")

#: members read per ZSCAN page (one round trip, then one pipelined batch of moves)
SCAN_PAGE = 500
#: tenants one stray sweep examines per state set (ready, waiting, capped) of a shard; a larger set is
#: swept over several passes, resuming where the last one stopped
STRAY_SCAN_PER_SET = 2_000

Shard = tuple[str, int]
#: a config any valid tenant id routes in (to tell valid ids)
_ANY_POOL = QuotaConfig(pools={"any": PoolQuota(shards=1)}, default_pool="any")


def _shards(config: QuotaConfig) -> set[Shard]:
    return {(pool, shard) for pool, quota in config.pools.items() for shard in range(quota.shards)}


def _route_or_none(config: QuotaConfig, tenant_id: str, stored: StoredTenant | None = None) -> Route | None:
    try:
        return route_tenant(config, tenant_id, stored)
    except (InvalidTenantId, KeyError):  # an id adopted from an inbox that is not a valid tenant id
        return None


def _move_keys(tenant_id: str, pool: str, shard: int, to: Route) -> list[str]:
    return [keys.tenant_queue(pool, shard, tenant_id), to.tenant_queue,
            keys.ready_tenants(pool, shard), keys.waiting_tenants(pool, shard), keys.capped_tenants(pool, shard),
            keys.ready_tenants(to.pool, to.shard), keys.waiting_tenants(to.pool, to.shard),
            keys.capped_tenants(to.pool, to.shard), keys.virtual_clock(to.pool, to.shard)]


def _move_args(tenant_id: str, to: Route) -> list[str]:
    return [tenant_id, keys.wakeup_channel(to.pool), to.queue, keys.shard_id(to.pool, to.shard)]


def _logged(tenant_id: str, pool: str, shard: int, to: Route, moved: int) -> int:
    if moved:
        log.info("tenant's queued jobs moved", tenant_id=tenant_id, from_queue=keys.queue(pool, shard),
                 to_queue=to.queue, jobs=moved)
    return moved


async def move_tenant(redis: Redis, tenant_id: str, pool: str, shard: int, to: Route) -> int:
    """Move every queued job of ``tenant_id`` in shard ``shard`` of ``pool`` to ``to``, atomically;
    return how many moved (0 if there were none, or they have moved already)."""
    moved = await redis.eval(lua_source("move_tenant"), 9, *_move_keys(tenant_id, pool, shard, to),  # type: ignore[misc]
                             *_move_args(tenant_id, to))
    return _logged(tenant_id, pool, shard, to, int(moved))


async def _stored(directory: TenantDirectory | None, tenant_ids: Iterable[str]) -> dict[str, StoredTenant | None]:
    """The tenant-store entries of ``tenant_ids`` (one round trip for those not cached; {} without a
    directory)."""
    if directory is None:
        return {}
    valid = [t for t in tenant_ids if _route_or_none(_ANY_POOL, t) is not None]
    return await directory.get_many(valid)


async def _move_batch(redis: Redis, pool: str, shard: int, moves: list[tuple[str, Route]]) -> int:
    """Move several tenants out of one shard in one round trip."""
    if not moves:
        return 0
    script = redis.register_script(lua_source("move_tenant"))
    async with redis.pipeline(transaction=False) as pipe:
        for tenant_id, to in moves:
            await script(keys=_move_keys(tenant_id, pool, shard, to), args=_move_args(tenant_id, to), client=pipe)
        replies = await pipe.execute()
    return sum(_logged(tenant_id, pool, shard, to, int(moved)) for (tenant_id, to), moved in zip(moves, replies,
                                                                                               strict=True))


async def _strays(config: QuotaConfig, pool: str, shard: int, members: Iterable[Any],
                  directory: TenantDirectory | None) -> list[tuple[str, Route]]:
    """The tenants among ``members`` of a state set of (pool, shard) that ``config`` (and their
    tenant-store entries) route elsewhere."""
    here = keys.queue(pool, shard)
    moves = []
    tenant_ids = [member.decode() if isinstance(member, bytes) else str(member) for member in members]
    stored = await _stored(directory, tenant_ids)
    for tenant_id in tenant_ids:
        route = _route_or_none(config, tenant_id, stored.get(tenant_id))
        if route is not None and route.queue != here:
            moves.append((tenant_id, route))
    return moves


async def _sweep_shard(redis: Redis, config: QuotaConfig, pool: str, shard: int, *, limit: int | None = None,
                       cursors: MutableMapping[str, int] | None = None,
                       directory: TenantDirectory | None = None) -> int:
    """Move the tenants with queued work in (pool, shard) that ``config`` routes elsewhere.

    ``limit``: examine at most that many tenants per state set, resuming from ``cursors`` (ZSCAN cursors
    by key, updated); None: the whole set. ZSCAN returns every member present for the whole scan at least
    once however the set changes meanwhile (claims re-score ready tenants all the time)."""
    moved = 0
    for key in (keys.ready_tenants(pool, shard), keys.waiting_tenants(pool, shard), keys.capped_tenants(pool, shard)):
        cursor = cursors.get(key, 0) if cursors is not None else 0
        examined = 0
        while True:
            page = SCAN_PAGE if limit is None else max(1, min(SCAN_PAGE, limit - examined))
            cursor, items = await redis.zscan(key, cursor, count=page)
            examined += len(items)
            strays = await _strays(config, pool, shard, (m for m, _ in items), directory)
            moved += await _move_batch(redis, pool, shard, strays)
            if cursor == 0 or (limit is not None and examined >= limit):
                break
        if cursors is not None:
            cursors[key] = cursor
    return moved


async def _move_inbox(redis: Redis, config: QuotaConfig, pool: str, shard: int,
                      directory: TenantDirectory | None = None) -> int:
    """Move the inbox entries of a shard ``config`` no longer has to their tenants' new shards' inboxes."""
    inbox = keys.queue(pool, shard)
    script = redis.register_script(lua_source("move_inbox"))
    moved = stuck = 0
    cursor = 0
    while True:
        cursor, items = await redis.zscan(inbox, cursor, count=SCAN_PAGE)
        args: list[str] = []
        ids = [member.decode(errors="replace") if isinstance(member, bytes) else str(member) for member, _ in items]
        stored = await _stored(directory, {job_id.split(":", 1)[0] for job_id in ids})
        for job_id in ids:
            tenant_id = job_id.split(":", 1)[0]
            route = _route_or_none(config, tenant_id, stored.get(tenant_id))
            if route is None:
                stuck += 1
                continue
            args += [job_id, route.queue, keys.wakeup_channel(route.pool)]
        if args:
            moved += int(await script(keys=[inbox], args=args))
        if cursor == 0:
            break
    if moved:
        log.info("inbox of a removed shard moved", queue=inbox, jobs=moved)
    if stuck:
        log.warning("entries left in the inbox of a removed shard: their ids name no valid tenant", queue=inbox,
                    entries=stuck)
    return moved


def _changed_shards(old: QuotaConfig, new: QuotaConfig) -> list[Shard]:
    """The old shards where tenants the new file does not name may no longer belong: all of them when a
    plan's pool or the default plan changed (tenant-store tenants of any shard may take a plan)."""
    plans_moved = ({n: p.pool for n, p in old.plans.items()} != {n: p.pool for n, p in new.plans.items()}
                   or old.default_tenant_pool != new.default_tenant_pool)
    changed = []
    for pool, quota in sorted(old.pools.items()):
        now = new.pools.get(pool)
        if plans_moved or now is None or now.shards != quota.shards or (pool == old.default_pool != new.default_pool):
            changed += [(pool, shard) for shard in range(quota.shards)]
    return changed


async def reroute(redis: Redis, old: QuotaConfig, new: QuotaConfig, *,
                  directory: TenantDirectory | None = None) -> int:
    """Move the queued jobs of every tenant whose route differs between ``old`` and ``new`` (each under
    its tenant-store entry, read through ``directory``) to its new queue; return how many jobs moved.
    Safe to repeat: what has moved already is not moved again."""
    moved = 0
    moves: dict[Shard, list[tuple[str, Route]]] = {}
    named = sorted(set(old.tenants) | set(new.tenants))
    stored = await _stored(directory, named)
    for tenant_id in named:
        entry = stored.get(tenant_id)
        before, after = _route_or_none(old, tenant_id, entry), route_tenant(new, tenant_id, entry)
        if before is not None and before.queue != after.queue:
            moves.setdefault((before.pool, before.shard), []).append((tenant_id, after))
    for (pool, shard), batch in sorted(moves.items()):
        moved += await _move_batch(redis, pool, shard, batch)
    new_shards = _shards(new)
    for pool, shard in _changed_shards(old, new):
        moved += await _sweep_shard(redis, new, pool, shard, directory=directory)
        if (pool, shard) not in new_shards:
            moved += await _move_inbox(redis, new, pool, shard, directory)
    return moved


async def reroute_strays(redis: Redis, config: QuotaConfig, *, shards: Iterable[Shard] = (),
                         cursors: MutableMapping[str, int] | None = None,
                         limit: int = STRAY_SCAN_PER_SET, directory: TenantDirectory | None = None) -> int:
    """The safety net: in every shard of ``config`` and of ``shards`` (those of earlier files), move the
    tenants with queued work that ``config`` routes elsewhere, and empty the inboxes of shards ``config``
    no longer has. Examines at most ``limit`` tenants per state set of a shard; keep ``cursors`` between
    calls so a larger set is covered over several. Returns how many jobs moved."""
    current = _shards(config)
    moved = 0
    for pool, shard in sorted(current | set(shards)):
        moved += await _sweep_shard(redis, config, pool, shard, limit=limit, cursors=cursors, directory=directory)
        if (pool, shard) not in current:
            moved += await _move_inbox(redis, config, pool, shard, directory)
    return moved


def config_of_routing_table(raw: bytes | str | None) -> QuotaConfig | None:
    """The routing part of the quota file a routing table (``agentworker:routing``) was published from:
    enough for :func:`route_tenant`, and so for :func:`reroute` from it. None if it cannot be read."""
    if raw is None:
        return None
    try:
        table = json.loads(raw)
        config = QuotaConfig(
            default_pool=table["default_pool"],
            pools={name: PoolQuota(shards=int(pool["shards"])) for name, pool in table["pools"].items()},
            tenants={tenant: TenantQuota(pool=pool) for tenant, pool in table["tenants"].items()},
            plans={name: PlanQuota(pool=plan.get("pool")) for name, plan in (table.get("plans") or {}).items()
                   if isinstance(plan, dict) and (plan.get("pool") is None or plan.get("pool") in table["pools"])},
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    if config.default_pool not in config.pools or any(config.pool_of(t) not in config.pools for t in config.tenants):
        return None
    return config
