"""The asyncpg pool and the tenant-scoped transaction, the only way the code reaches tenant rows.

Row-level security on every tenant table compares ``tenant_id`` with the transaction's
``agentworker.tenant_id`` setting. :meth:`Database.tenant` sets it with ``set_config(..., true)`` (so it
dies with the transaction and never leaks to the next user of the pooled connection) and switches the
transaction to the role ``agentworker_app``. That role is created by ``agentworker migrate`` without
SUPERUSER or BYPASSRLS: a superuser would skip the policies, so every connection of the pool first does
``SET ROLE agentworker_app`` and checks the role it got cannot bypass them. The user in
``AGENTWORKER_DATABASE_URL`` must therefore be a superuser or a member of ``agentworker_app``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from agentworker.db.urls import redact_url
from agentworker.routing import validate_tenant_id

APP_ROLE = "agentworker_app"
SCHEMA = "agentworker"
TENANT_SETTING = "agentworker.tenant_id"
#: The newest migration the code expects; older databases are refused with "run agentworker migrate".
REQUIRED_MIGRATION = 4

_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)


class DatabaseError(Exception):
    """PostgreSQL cannot be used as it is (unreachable, not migrated, or a role that bypasses RLS)."""


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL could not be reached or dropped the connection; worth retrying later."""


class DatabaseNotMigrated(DatabaseError):
    """The schema is missing or older than this code; ``agentworker migrate`` fixes it."""


def is_connection_error(exc: BaseException) -> bool:
    """True for errors that mean the server or the connection went away (not a bad query)."""
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    return isinstance(exc, asyncpg.InterfaceError) and "closed" in str(exc)


class TenantTransaction:
    """A transaction in which only ``tenant_id``'s rows exist. Obtain one from :meth:`Database.tenant`."""

    __slots__ = ("_conn", "tenant_id")

    def __init__(self, conn: asyncpg.Connection | PoolConnectionProxy, tenant_id: str) -> None:
        self._conn = conn
        self.tenant_id = tenant_id

    async def execute(self, query: str, *args: Any) -> str:
        with _unavailable_on_connection_loss():
            return str(await self._conn.execute(query, *args))

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        with _unavailable_on_connection_loss():
            return list(await self._conn.fetch(query, *args))

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        with _unavailable_on_connection_loss():
            return await self._conn.fetchrow(query, *args)

    async def fetchval(self, query: str, *args: Any) -> Any:
        with _unavailable_on_connection_loss():
            return await self._conn.fetchval(query, *args)


@contextmanager
def _unavailable_on_connection_loss(url: str = "PostgreSQL") -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        if is_connection_error(exc):
            raise DatabaseUnavailable(f"lost the connection to {url}: {exc}") from exc
        raise


class Database:
    """A pool of connections acting as ``agentworker_app``; hand out tenant-scoped transactions."""

    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self.url = redact_url(url)

    @asynccontextmanager
    async def tenant(self, tenant_id: str) -> AsyncIterator[TenantTransaction]:
        """A transaction that sees and writes only ``tenant_id``'s rows; committed when the block ends
        without an exception, rolled back otherwise. Lost connections raise :class:`DatabaseUnavailable`."""
        validate_tenant_id(tenant_id)
        in_body = False
        try:
            async with self._pool.acquire() as conn, conn.transaction():
                # set_config(..., true) is SET LOCAL: gone at commit or rollback.
                await conn.execute("SELECT set_config('role', $1, true), set_config($2, $3, true)",
                                   APP_ROLE, TENANT_SETTING, tenant_id)
                in_body = True
                yield TenantTransaction(conn, tenant_id)
                in_body = False
        except Exception as exc:
            # The block's own errors pass unchanged (its queries convert connection loss themselves).
            if not in_body and not isinstance(exc, DatabaseError) and is_connection_error(exc):
                raise DatabaseUnavailable(f"lost PostgreSQL at {self.url}: {exc}") from exc
            raise

    async def fetch_without_tenant(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """One read-only query in a transaction with no tenant set, where row-level security hides every
        tenant row: only a SECURITY DEFINER index made for it (``agentworker.due_schedules``,
        ``agentworker.idle_running_runs``) answers."""
        with _unavailable_on_connection_loss(self.url):
            async with self._pool.acquire() as conn, conn.transaction(readonly=True):
                await conn.execute("SELECT set_config('role', $1, true)", APP_ROLE)
                return list(await conn.fetch(query, *args))

    async def close(self) -> None:
        await self._pool.close()

    async def aclose(self) -> None:
        await self.close()


async def _prepare_connection(conn: asyncpg.Connection) -> None:
    for jsontype in ("json", "jsonb"):
        await conn.set_type_codec(jsontype, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
    await conn.execute(f"SET ROLE {APP_ROLE}")
    bypasses = await conn.fetchval("SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user")
    if bypasses:
        raise DatabaseError(f"role {APP_ROLE} can bypass row-level security (SUPERUSER or BYPASSRLS); "
                            "refusing to use it")


async def open_database(url: str, *, max_size: int = 10, connect_timeout: float = 5.0) -> Database:
    """Connect (one connection at once, to fail fast) and check the schema is migrated.

    Raises :class:`DatabaseUnavailable` when the server cannot be reached, :class:`DatabaseNotMigrated`
    when ``agentworker migrate`` has not been run (or the URL's user may not act as ``agentworker_app``).
    """
    shown = redact_url(url)
    try:
        pool = await asyncpg.create_pool(url, min_size=1, max_size=max(1, max_size), timeout=connect_timeout,
                                         init=_prepare_connection, max_inactive_connection_lifetime=300)
    except DatabaseError:
        raise
    except asyncpg.InvalidAuthorizationSpecificationError as exc:
        raise DatabaseError(f"PostgreSQL at {shown} refused the login: {exc}") from None
    except (asyncpg.InvalidParameterValueError, asyncpg.UndefinedObjectError) as exc:
        raise DatabaseNotMigrated(f"cannot act as role {APP_ROLE} on {shown} ({exc}); run `agentworker migrate` "
                                  f"and make the URL's user a member of {APP_ROLE}") from None
    except asyncpg.InsufficientPrivilegeError as exc:
        raise DatabaseNotMigrated(f"the user of {shown} may not act as role {APP_ROLE} ({exc}); "
                                  f"GRANT {APP_ROLE} TO that user") from None
    except Exception as exc:
        if is_connection_error(exc):
            raise DatabaseUnavailable(f"cannot reach PostgreSQL at {shown}: {exc or type(exc).__name__}") from exc
        raise
    try:
        async with pool.acquire() as conn:
            version = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_migrations")
    except (asyncpg.UndefinedTableError, asyncpg.InvalidSchemaNameError, asyncpg.InsufficientPrivilegeError):
        version = None
    except Exception:
        await pool.close()
        raise
    if version is None or version < REQUIRED_MIGRATION:
        await pool.close()
        raise DatabaseNotMigrated(f"the database at {shown} is not migrated to version {REQUIRED_MIGRATION} "
                                  f"(found {version}); run `agentworker migrate`")
    return Database(pool, url)
