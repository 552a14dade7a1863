"""The tenant store: each tenant's plan and limit overrides, changed through an API and applied
everywhere within a second.

The quota file sets pools, ``plans`` and the limits of the tenants it names; at SaaS scale a customer's
plan lives here instead, one row per tenant in PostgreSQL (``agentworker.tenant_settings``, migration
0006), set by :meth:`TenantStore.set` (``client.set_tenant``, ``agentworker tenants set``,
``PATCH /admin/tenants/{id}``). Every change is validated with the quota file's rules, recorded in
``agentworker.tenant_settings_audit`` (who, when, old and new entry) and copied to Redis.

**Precedence** of a key (:meth:`agentworker.config.QuotaConfig.resolve`): a stored override, then the
stored plan's keys, then the file's tenant entry (its own keys over its own ``plan``'s), then
``tenant_defaults`` (its own keys over the default plan's). A tenant the file names and the store
does not keeps working exactly as before.

**How a change reaches every process.** The row is the source of truth. After its commit the setter
writes the tenant's record ``agentworker:tenant:{id}`` (a hash: ``v`` version, ``entry`` JSON,
``plan``, ``claim``; ``lua/tenant_record.lua``, which keeps the highest version) and publishes the
tenant id on ``agentworker:tenant-changes``:

- the claim script reads ``plan`` and ``claim`` of a tenant it is about to start a job of, and lays them
  over the file's limits it already reads (the plans' are published beside them): ``max_concurrency``,
  ``weight`` and ``max_pending`` apply at the next claim, with nothing cached;
- Python processes (clients' admission and routing, the schedule dispatcher, workers' job timeouts and
  route checks) read records through a :class:`TenantDirectory`: a bounded LRU cache (10,000 tenants by
  default) whose entries live :data:`CACHE_TTL_S` (0.5 s) unless the process listens to the changes
  channel (workers do), then until a change is announced (and at most :data:`LISTENED_TTL_S`).

A change the setter could not copy (Redis down at that moment), and every record after Redis lost its
data, is copied by the tenant sync: one worker process at a time (Redis lock) reads the rows changed
since the sequence number recorded in ``agentworker:tenants:synced`` every :data:`SYNC_INTERVAL_S`;
with that key gone it copies the whole store again. Until then the file's limits apply to a stored
tenant whose record is missing (logged).

**Moving pools.** When a change routes the tenant elsewhere (a plan or an override with another pool),
its queued jobs are moved at once (``lua/move_tenant.lua``, due times kept); the record keeps the
previous queue, so a job a producer still on the old route enqueued there in the next instants runs
where it is, and the supervisor's stray sweep moves what is left (it routes through the directory too).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import json
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeGuard

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import keys
from agentworker.config import TENANT_KEYS, ConfigError, QuotaConfig, ResolvedTenant, StoredTenant
from agentworker.db.database import Database
from agentworker.job_leases import claim_layer, lua_source
from agentworker.logs import get_logger
from agentworker.redis_lock import RedisLock, every_interval
from agentworker.routing import Route, route_tenant, validate_tenant_id

__all__ = [
    "CACHE_TTL_S",
    "LISTENED_TTL_S",
    "SYNC_INTERVAL_S",
    "UNSET",
    "InvalidTenantChange",
    "TenantChange",
    "TenantDirectory",
    "TenantStore",
    "TenantView",
    "sync_forever",
    "sync_once",
    "write_record",
]

log = get_logger("agentworker.tenants")

#: how long a cached record is used by a process that does not listen to the changes channel
CACHE_TTL_S = 0.5
#: how long a cached record is used by a process that listens (a missed message is repaired by then)
LISTENED_TTL_S = 30.0
#: tenants a directory keeps (least recently used ones are dropped first)
CACHE_CAPACITY = 10_000
#: how often the tenant sync looks for rows Redis lacks
SYNC_INTERVAL_S = 1.0
#: rows changed this recently are copied again at every pass of the sync: a transaction that took its
#: sequence number before a later one's but committed after it is not skipped (``updated_at`` is the
#: clock at the write, just before the commit)
SYNC_SETTLE_S = 5.0
#: rows copied per round trip by the sync
SYNC_PAGE = 1_000
#: longest ``by`` (who made a change) kept in the audit trail
MAX_BY_CHARS = 200



class InvalidTenantChange(ConfigError):
    """A tenant-store change refused: ``errors`` holds one ``path: message`` per problem; nothing changed."""


@dataclass(frozen=True, slots=True)
class TenantView:
    """What :meth:`TenantStore.get` answers: the stored entry (if any) and the effective limits."""

    tenant_id: str
    stored: bool
    plan: str | None
    overrides: dict[str, Any]
    version: int
    updated_at: datetime | None
    updated_by: str | None
    pool: str
    shard: int
    queue: str
    #: every tenant key (``None``: no limit) and the effective ``job_timeout`` (pool's and tenant's tighter)
    limits: dict[str, Any]
    #: key -> where its value comes from (``override``, ``plan pro``, ``file``, ``tenant_defaults``, ...)
    sources: dict[str, str]

    def as_json(self) -> dict[str, Any]:
        return {"tenant_id": self.tenant_id, "stored": self.stored, "plan": self.plan,
                "overrides": self.overrides, "version": self.version,
                "updated_at": self.updated_at.isoformat() if self.updated_at else None,
                "updated_by": self.updated_by, "pool": self.pool, "shard": self.shard, "queue": self.queue,
                "limits": self.limits, "sources": self.sources}


@dataclass(frozen=True, slots=True)
class TenantChange:
    """One row of the audit trail: who changed the tenant's entry, when, from what to what (None: none)."""

    id: int
    tenant_id: str
    changed_at: datetime
    changed_by: str
    version: int
    old: dict[str, Any] | None
    new: dict[str, Any] | None

    def as_json(self) -> dict[str, Any]:
        return {"id": self.id, "tenant_id": self.tenant_id, "changed_at": self.changed_at.isoformat(),
                "changed_by": self.changed_by, "version": self.version, "old": self.old, "new": self.new}


# -- the Redis record ----------------------------------------------------------------------------------


def _entry_json(stored: StoredTenant | None) -> str:
    if stored is None:
        return ""
    return json.dumps({"plan": stored.plan, "overrides": dict(stored.overrides),
                       "previous_queue": stored.previous_queue}, sort_keys=True, separators=(",", ":"))


def _record_args(stored: StoredTenant | None, version: int, route: Route) -> list[str]:
    overrides = stored.overrides if stored is not None else {}
    claim = claim_layer(overrides.get("max_concurrency"), overrides.get("weight"), overrides.get("max_pending"))
    return [str(version), _entry_json(stored), (stored.plan or "") if stored else "", claim, route.pool,
            str(route.shard), keys.tenant_changes_channel()]


async def write_record(redis: Redis, tenant_id: str, stored: StoredTenant | None, version: int,
                       config: QuotaConfig) -> bool:
    """Write the tenant's record (``stored`` None: its entry was removed) unless Redis has that version or
    a newer one; announce it on the changes channel. True if written."""
    route = route_tenant(config, tenant_id, stored)
    written = await redis.eval(lua_source("tenant_record"), 1, keys.tenant_record(tenant_id),  # type: ignore[misc]
                               *_record_args(stored, version, route), tenant_id)
    return bool(written)


def _parse_record(tenant_id: str, version: Any, entry: Any) -> StoredTenant | None:
    """The stored entry a record holds; None for a removed entry or a record that cannot be read (it is
    ours, but Redis is shared: a record someone else wrote is ignored, with a log line)."""
    if not entry:
        return None
    try:
        data = json.loads(entry)
        overrides = data.get("overrides") or {}
        if not isinstance(overrides, dict) or any(key not in TENANT_KEYS for key in overrides):
            raise ValueError("unknown override keys")
        plan = data.get("plan")
        return StoredTenant(tenant_id, plan if isinstance(plan, str) and plan else None, overrides,
                            int(version or 0), str(data.get("previous_queue") or ""))
    except (ValueError, TypeError, AttributeError) as exc:
        log.warning("tenant record cannot be read; the quota file's limits apply", tenant_id=tenant_id,
                    key=keys.tenant_record(tenant_id), error=str(exc))
        return None


class TenantDirectory:
    """Reads tenants' stored entries from their Redis records, through a bounded cache (module docstring).

    :meth:`get` answers None for a tenant with no stored entry. :meth:`listen_forever` (run it as a task)
    drops an entry as soon as a change is announced, and lets entries live longer meanwhile."""

    def __init__(self, redis: Redis, *, capacity: int = CACHE_CAPACITY, ttl: float = CACHE_TTL_S) -> None:
        self.redis = redis
        self.capacity = capacity
        self.ttl = ttl
        self._cache: OrderedDict[str, tuple[float, StoredTenant | None]] = OrderedDict()
        self._listening = False
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._cache)

    def _fresh(self, tenant_id: str) -> tuple[bool, StoredTenant | None]:
        cached = self._cache.get(tenant_id)
        if cached is None:
            return False, None
        age = time.monotonic() - cached[0]
        if age > (LISTENED_TTL_S if self._listening else self.ttl):
            return False, None
        self._cache.move_to_end(tenant_id)
        return True, cached[1]

    def _keep(self, tenant_id: str, stored: StoredTenant | None) -> None:
        self._cache[tenant_id] = (time.monotonic(), stored)
        self._cache.move_to_end(tenant_id)
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)

    def cached(self, tenant_id: str, *, stale: bool = False) -> StoredTenant | None:
        """The entry if it is cached and fresh (``stale``: however old), else None, without a round trip
        (sync callers; a fallback while Redis is unreachable)."""
        if stale:
            cached = self._cache.get(tenant_id)
            return cached[1] if cached is not None else None
        return self._fresh(tenant_id)[1]

    async def get(self, tenant_id: str, *, fresh: bool = False) -> StoredTenant | None:
        """The tenant's stored entry (None: none). ``fresh``: read Redis even if cached."""
        if not fresh:
            hit, stored = self._fresh(tenant_id)
            if hit:
                self.hits += 1
                return stored
        self.misses += 1
        version, entry = await self.redis.hmget(keys.tenant_record(tenant_id), ["v", "entry"])  # type: ignore[misc]
        stored = _parse_record(tenant_id, version, entry)
        self._keep(tenant_id, stored)
        return stored

    async def get_many(self, tenant_ids: Iterable[str]) -> dict[str, StoredTenant | None]:
        """:meth:`get` for several tenants, the missing ones in one pipelined round trip."""
        out: dict[str, StoredTenant | None] = {}
        wanted = []
        for tenant_id in tenant_ids:
            hit, stored = self._fresh(tenant_id)
            if hit:
                out[tenant_id] = stored
            else:
                wanted.append(tenant_id)
        if wanted:
            async with self.redis.pipeline(transaction=False) as pipe:
                for tenant_id in wanted:
                    pipe.hmget(keys.tenant_record(tenant_id), ["v", "entry"])
                replies = await pipe.execute()
            for tenant_id, (version, entry) in zip(wanted, replies, strict=True):
                out[tenant_id] = _parse_record(tenant_id, version, entry)
                self._keep(tenant_id, out[tenant_id])
        return out

    def invalidate(self, tenant_id: str | None = None) -> None:
        """Drop one tenant's cached entry, or every one."""
        if tenant_id is None:
            self._cache.clear()
        else:
            self._cache.pop(tenant_id, None)

    async def resolve(self, config: QuotaConfig, tenant_id: str) -> ResolvedTenant:
        """The tenant's effective pool and limits under ``config`` and its stored entry."""
        return config.resolve(tenant_id, await self.get(tenant_id))

    async def route(self, config: QuotaConfig, tenant_id: str) -> Route:
        validate_tenant_id(tenant_id)
        return route_tenant(config, tenant_id, await self.get(tenant_id))

    async def listen_forever(self, *, retry_s: float = 1.0) -> None:
        """Drop entries as changes are announced, until cancelled. While not subscribed (Redis down) the
        cache falls back to its short TTL; on every (re)subscription it is emptied (changes may have
        been missed)."""
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(keys.tenant_changes_channel())
                self.invalidate()
                self._listening = True
                while True:
                    message = await pubsub.get_message(timeout=5.0)
                    if message is None or message.get("type") != "message":
                        continue
                    data = message.get("data")
                    self.invalidate(data.decode(errors="replace") if isinstance(data, bytes) else str(data))
            except (RedisError, OSError) as exc:
                if self._listening:
                    log.warning("tenant changes channel lost; cached entries live 0.5 s until it is back",
                                error=str(exc))
                self._listening = False
                await asyncio.sleep(retry_s)
            finally:
                self._listening = False
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]


# -- the store -----------------------------------------------------------------------------------------


#: "not given" for :meth:`TenantStore.set` 's ``plan`` (None means: no plan)
UNSET: Any = object()
_COLUMNS = "tenant_id, plan, overrides, version, seq, deleted, previous_queue, updated_at, updated_by"


def valid_by(by: object, *, blank_ok: bool = False) -> TypeGuard[str]:
    """``by`` — who made a change, or asked for an action — as every record of it takes it: a string of at
    most :data:`MAX_BY_CHARS` printable ASCII characters, not blank unless ``blank_ok``. The tenant store,
    job control (:mod:`agentworker.job_control`, where a blank ``by`` means "not said") and the admin
    endpoints all check it with this."""
    return (isinstance(by, str) and len(by) <= MAX_BY_CHARS and by.isascii() and by.isprintable()
            and (blank_ok or bool(by.strip())))


def _check_by(by: object) -> str:
    if not valid_by(by):
        raise InvalidTenantChange("tenant change", [
            f"by: must say who makes the change, 1-{MAX_BY_CHARS} printable ASCII characters (got {by!r})"])
    return by


def _overrides_of(raw: Any) -> dict[str, Any]:
    value = json.loads(raw) if isinstance(raw, str) else raw
    return dict(value) if isinstance(value, dict) else {}


def _stored_of(row: Any) -> StoredTenant | None:
    if row is None or row["deleted"]:
        return None
    return StoredTenant(row["tenant_id"], row["plan"], _overrides_of(row["overrides"]), int(row["version"]),
                        row["previous_queue"])


def _entry_of(stored: StoredTenant | None) -> dict[str, Any] | None:
    return None if stored is None else {"plan": stored.plan, "overrides": dict(stored.overrides)}


async def _locked_row(tx: Any, tenant_id: str) -> Any:
    """The tenant's row (None: never stored), locked until the end of ``tx``: changes are serialized."""
    return await tx.fetchrow(
        f"SELECT {_COLUMNS} FROM agentworker.tenant_settings WHERE tenant_id = $1 FOR UPDATE", tenant_id)


async def _audit(tx: Any, tenant_id: str, by: str, version: int, old: StoredTenant | None,
                 new: StoredTenant | None) -> None:
    """One row of the audit trail; no entry before (created) or after (removed) is SQL NULL."""
    await tx.execute(
        "INSERT INTO agentworker.tenant_settings_audit (tenant_id, changed_by, version, old, new) "
        "VALUES ($1, $2, $3, $4::jsonb, $5::jsonb)",
        tenant_id, by, version, *(None if entry is None else json.dumps(_entry_of(entry)) for entry in (old, new)))


class TenantStore:
    """The tenant store's operations (module docstring); ``config`` is the quota file to validate and
    resolve with (a callable, so a long-lived owner passes its current one)."""

    def __init__(self, database: Database, redis: Redis, config: Callable[[], QuotaConfig]) -> None:
        self.database = database
        self.redis = redis
        self.config = config

    async def get(self, tenant_id: str) -> TenantView:
        """The tenant's stored entry and effective limits (any valid tenant id has limits)."""
        validate_tenant_id(tenant_id)
        async with self.database.tenant(tenant_id) as tx:
            row = await tx.fetchrow(f"SELECT {_COLUMNS} FROM agentworker.tenant_settings WHERE tenant_id = $1",
                                    tenant_id)
        return self._view(tenant_id, row)

    def _view(self, tenant_id: str, row: Any) -> TenantView:
        config = self.config()
        stored = _stored_of(row)
        resolved = config.resolve(tenant_id, stored)
        route = route_tenant(config, tenant_id, stored)
        limits = resolved.limits.model_dump()
        limits["job_timeout"] = config.job_timeout_for(tenant_id, stored)
        sources = dict(resolved.sources)
        if resolved.limits.job_timeout is None or limits["job_timeout"] < resolved.limits.job_timeout:
            sources["job_timeout"] = f"pool {route.pool}"
        live = row is not None and not row["deleted"]
        return TenantView(
            tenant_id=tenant_id, stored=live, plan=stored.plan if stored else None,
            overrides=dict(stored.overrides) if stored else {}, version=int(row["version"]) if row else 0,
            updated_at=row["updated_at"] if row else None, updated_by=row["updated_by"] if row else None,
            pool=route.pool, shard=route.shard, queue=route.queue, limits=limits, sources=sources)

    async def set(self, tenant_id: str, *, by: str, plan: str | None = UNSET,
                  overrides: Mapping[str, Any] | None = None, unset: Iterable[str] = ()) -> TenantView:
        """Change the tenant's entry: ``plan`` (None: no plan; not given: unchanged), ``overrides`` merged
        over the stored ones, ``unset`` keys removed (``"plan"`` among them removes the plan). Validated
        with the quota file's rules (every problem at once, :class:`InvalidTenantChange`; nothing changes
        then); an accepted change is audited, copied to Redis and announced, and the tenant's queued jobs
        move if it now routes elsewhere. A change that changes nothing is not recorded."""
        validate_tenant_id(tenant_id)
        _check_by(by)
        overrides = dict(overrides or {})
        unset = list(unset)
        problems = [f"unset.{key}: unknown key (known: plan, {', '.join(TENANT_KEYS)})"
                    for key in unset if key != "plan" and key not in TENANT_KEYS]
        both = sorted(set(unset) & set(overrides))
        problems += [f"unset.{key}: also given a value in overrides" for key in both]
        if problems:
            raise InvalidTenantChange(f"tenant {tenant_id}", problems)
        config = self.config()
        async with self.database.tenant(tenant_id) as tx:
            row = await _locked_row(tx, tenant_id)
            old = _stored_of(row)
            new_plan = (old.plan if old else None) if plan is UNSET else plan
            if "plan" in unset:
                new_plan = None
            merged = {**(old.overrides if old else {}), **overrides}
            for key in unset:
                merged.pop(key, None)
            try:
                checked = config.check_stored(tenant_id, new_plan, merged)
            except ConfigError as exc:
                raise InvalidTenantChange(f"tenant {tenant_id}", exc.errors) from None
            if _entry_of(old) == _entry_of(checked) or (old is None and not checked.plan and not checked.overrides):
                return self._view(tenant_id, row)  # nothing changes (an empty entry is no entry): not recorded
            before, after = route_tenant(config, tenant_id, old), route_tenant(config, tenant_id, checked)
            previous = (f"{before.pool}:{before.shard}" if before.queue != after.queue
                        else (old.previous_queue if old else ""))
            version = (int(row["version"]) if row else 0) + 1
            new_row = await tx.fetchrow(
                f"""INSERT INTO agentworker.tenant_settings
                        (tenant_id, plan, overrides, version, seq, deleted, previous_queue, updated_at, updated_by)
                    VALUES ($1, $2, $3::jsonb, $4, nextval('agentworker.tenant_settings_seq'), false, $5,
                            clock_timestamp(), $6)
                    ON CONFLICT (tenant_id) DO UPDATE SET plan = EXCLUDED.plan, overrides = EXCLUDED.overrides,
                        version = EXCLUDED.version, seq = EXCLUDED.seq, deleted = false,
                        previous_queue = EXCLUDED.previous_queue, updated_at = clock_timestamp(),
                        updated_by = EXCLUDED.updated_by
                    RETURNING {_COLUMNS}""",
                tenant_id, checked.plan, json.dumps(dict(checked.overrides)), version, previous, by)
            await _audit(tx, tenant_id, by, version, old, checked)
        stored = _stored_of(new_row)
        log.info("tenant entry changed", tenant_id=tenant_id, by=by, version=version, plan=checked.plan,
                 overrides=dict(checked.overrides), pool=after.pool)
        await self._publish(tenant_id, stored, version, config, before, after)
        return self._view(tenant_id, new_row)

    async def remove(self, tenant_id: str, *, by: str) -> bool:
        """Remove the tenant's entry (the file's limits apply again); False if it had none."""
        validate_tenant_id(tenant_id)
        _check_by(by)
        config = self.config()
        async with self.database.tenant(tenant_id) as tx:
            row = await _locked_row(tx, tenant_id)
            old = _stored_of(row)
            if row is None or old is None:
                return False
            version = int(row["version"]) + 1
            before, after = route_tenant(config, tenant_id, old), route_tenant(config, tenant_id, None)
            previous = f"{before.pool}:{before.shard}" if before.queue != after.queue else old.previous_queue
            await tx.execute(
                "UPDATE agentworker.tenant_settings SET plan = NULL, overrides = '{}'::jsonb, version = $2, "
                "seq = nextval('agentworker.tenant_settings_seq'), deleted = true, previous_queue = $3, "
                "updated_at = clock_timestamp(), updated_by = $4 WHERE tenant_id = $1",
                tenant_id, version, previous, by)
            await _audit(tx, tenant_id, by, version, old, None)
        log.info("tenant entry removed", tenant_id=tenant_id, by=by, version=version)
        await self._publish(tenant_id, None, version, config, before, after)
        return True

    async def _publish(self, tenant_id: str, stored: StoredTenant | None, version: int, config: QuotaConfig,
                       before: Route, after: Route) -> None:
        """Copy a committed change to Redis and move the tenant's queued jobs if its route changed. Redis
        unreachable: the tenant sync copies it later (logged); the stray sweep moves the jobs."""
        from agentworker.rerouting import move_tenant  # rerouting routes through the directory: no cycle at import

        try:
            await write_record(self.redis, tenant_id, stored, version, config)
            if before.queue != after.queue:
                await move_tenant(self.redis, tenant_id, before.pool, before.shard, after)
            # A tenant parked at its cap is looked at again now (its cap may have grown), not in a second.
            if await self.redis.zadd(keys.capped_tenants(after.pool, after.shard), {tenant_id: 0}, xx=True, ch=True):
                await self.redis.publish(keys.wakeup_channel(after.pool), after.queue)
        except (RedisError, OSError) as exc:
            log.warning("tenant entry saved but not copied to Redis; the tenant sync copies it when Redis is "
                        "back", tenant_id=tenant_id, version=version, error=str(exc))

    async def list(self, *, after: str = "", limit: int = 100) -> builtins.list[TenantView]:
        """Stored tenants in id order, ``limit`` (1-5000) after the id ``after`` (paging)."""
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 5000:
            raise InvalidTenantChange("tenant list", [f"limit: must be an integer from 1 to 5000 (got {limit!r})"])
        rows = await self.database.fetch_without_tenant(
            "SELECT * FROM agentworker.tenant_settings_page($1, $2)", after, limit)
        return [self._view(row["tenant_id"], row) for row in rows]

    async def history(self, tenant_id: str, *, limit: int = 100) -> builtins.list[TenantChange]:
        """The tenant's audit trail, newest first (at most ``limit``, 1-5000)."""
        validate_tenant_id(tenant_id)
        if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 5000:
            raise InvalidTenantChange("tenant history", [f"limit: must be an integer from 1 to 5000 (got {limit!r})"])
        async with self.database.tenant(tenant_id) as tx:
            rows = await tx.fetch(
                "SELECT id, tenant_id, changed_at, changed_by, version, old, new "
                "FROM agentworker.tenant_settings_audit WHERE tenant_id = $1 ORDER BY id DESC LIMIT $2",
                tenant_id, limit)
        return [TenantChange(int(r["id"]), r["tenant_id"], r["changed_at"], r["changed_by"], int(r["version"]),
                             _json_or_none(r["old"]), _json_or_none(r["new"])) for r in rows]


def _json_or_none(raw: Any) -> dict[str, Any] | None:
    value = json.loads(raw) if isinstance(raw, str) else raw
    return value if isinstance(value, dict) else None


# -- the sync: the store copied to Redis ---------------------------------------------------------------


async def sync_once(database: Database, redis: Redis, config: QuotaConfig) -> int:
    """Copy to Redis the rows changed since the sequence number in ``agentworker:tenants:synced`` (every
    row when that key is gone: Redis lost its data, or this is the first copy), and those changed in the
    last :data:`SYNC_SETTLE_S` seconds again (a transaction that took its number before a later one's
    but committed after it); return how many records were written (older versions are not rewritten)."""
    raw = await redis.get(keys.tenants_synced())
    floor = int(raw) if raw is not None and raw.isdigit() else 0
    cursor = floor
    written = 0
    script = redis.register_script(lua_source("tenant_record"))

    async def copy(rows: list[Any]) -> int:
        async with redis.pipeline(transaction=False) as pipe:
            for row in rows:
                stored = _stored_of(row)
                route = route_tenant(config, row["tenant_id"], stored)
                await script(keys=[keys.tenant_record(row["tenant_id"])],
                             args=[*_record_args(stored, int(row["version"]), route), row["tenant_id"]], client=pipe)
            replies = await pipe.execute()
        return sum(int(reply) for reply in replies)

    if raw is not None:
        written += await copy(await database.fetch_without_tenant(
            "SELECT * FROM agentworker.tenant_settings_recent($1, $2)", SYNC_SETTLE_S, 5000))
    while True:
        rows = await database.fetch_without_tenant(
            "SELECT * FROM agentworker.tenant_settings_since($1, $2)", cursor, SYNC_PAGE)
        if not rows:
            break
        written += await copy(rows)
        cursor = max(cursor, *(int(row["seq"]) for row in rows))
        if len(rows) < SYNC_PAGE:
            break
    if raw is None or cursor != floor:
        await redis.set(keys.tenants_synced(), str(cursor))
    return written


async def sync_forever(redis: Redis, database: Callable[[], Awaitable[Database]],
                       config: Callable[[], QuotaConfig], *, interval: float = SYNC_INTERVAL_S) -> None:
    """:func:`sync_once` every ``interval`` seconds in the one process holding the tenant-sync lock, until
    cancelled. Never raises (outages and a database not migrated yet are logged once)."""

    async def attempt() -> int | None:
        if not await RedisLock(redis, keys.tenant_sync_lock(), interval * 0.4).acquire():
            return None
        return await sync_once(await database(), redis, config())

    await every_interval(attempt, interval=interval, name="tenant sync", log=log, not_migrated_pause_s=30.0,
                         done=lambda copied: log.info("tenant records copied to Redis", records=copied))
