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

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager, suppress
from typing import Any

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction

from agentworker.db.urls import redact_url
from agentworker.errors import AgentWorkerError
from agentworker.logs import get_logger
from agentworker.routing import validate_tenant_id

APP_ROLE = "agentworker_app"
SCHEMA = "agentworker"
TENANT_SETTING = "agentworker.tenant_id"
#: The newest migration the code expects; older databases are refused with "run agentworker migrate".
REQUIRED_MIGRATION = 8

_log = get_logger("agentworker.db")

#: What asyncpg raises when the server or the connection went away: SQLSTATE class 08
#: (``PostgresConnectionError``: ``ConnectionDoesNotExistError``, ``ConnectionFailureError``, ...), class 57
#: (``AdminShutdownError`` 57P01, ``CrashShutdownError`` 57P02, ``CannotConnectNowError`` 57P03, ...) and
#: class 53 (too many connections, out of memory or disk).
_LOST_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
)
#: asyncpg's ``InterfaceError`` on a connection that is closed, or still busy with a query the server's
#: going away interrupted ("cannot perform operation: another operation is in progress"), or a pooled one
#: asyncpg gave back to its pool when it saw it close ("connection has been released back to the pool":
#: our blocks never use a connection after giving it back, so only a lost connection gets there).
_LOST_CONNECTION_MESSAGES = ("closed", "another operation is in progress", "released back to the pool")


class DatabaseError(AgentWorkerError):
    """PostgreSQL cannot be used as it is (unreachable, not migrated, or a role that bypasses RLS)."""


class DatabaseUnavailable(DatabaseError):
    """PostgreSQL could not be reached or dropped the connection; worth retrying later."""


class DatabaseNotMigrated(DatabaseError):
    """The schema is missing or older than this code; ``agentworker migrate`` fixes it."""


def is_lost_connection(exc: BaseException) -> bool:
    """True for asyncpg's errors that mean the server or the connection went away (not a bad query).

    This is the one list of them; everything in this module maps them to :class:`DatabaseUnavailable`.
    It includes asyncpg's ``InternalClientError`` (but not its ``OutdatedSchemaCacheError``): after a
    server restart its protocol state machine is left mid-query ("cannot switch to state 15; another
    operation (2) is in progress") and the connection cannot be used again.
    """
    if isinstance(exc, _LOST_CONNECTION_ERRORS):
        return True
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        return not isinstance(exc, asyncpg.exceptions.OutdatedSchemaCacheError)
    return isinstance(exc, asyncpg.InterfaceError) and any(m in str(exc) for m in _LOST_CONNECTION_MESSAGES)


def is_connection_error(exc: BaseException) -> bool:
    """:func:`is_lost_connection`, or a socket error or timeout (from connecting, or from a call that only
    talks to PostgreSQL: elsewhere an ``OSError`` may be anyone's)."""
    return is_lost_connection(exc) or isinstance(exc, (OSError, TimeoutError))


class TenantTransaction:
    """A transaction in which only ``tenant_id``'s rows exist. Obtain one from :meth:`Database.tenant`."""

    __slots__ = ("_after_commit", "_conn", "tenant_id")

    def __init__(self, conn: asyncpg.Connection | PoolConnectionProxy, tenant_id: str) -> None:
        self._conn = conn
        self.tenant_id = tenant_id
        self._after_commit: list[Callable[[], None]] = []

    def after_commit(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` once the transaction has committed (never if it rolls back, or if the commit
        cannot be confirmed): how what it recorded is announced only once it is true. Callbacks run in
        order, must not block, and an exception of one is logged, not raised (the commit happened)."""
        self._after_commit.append(callback)

    def _committed(self) -> None:
        for callback in self._after_commit:
            try:
                callback()
            except Exception as exc:  # the commit stands; a bug in a callback must not undo the caller
                _log.exception("an after-commit callback raised", error=repr(exc))
        self._after_commit.clear()

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
        without an exception, rolled back otherwise. PostgreSQL going away, wherever it happens (taking a
        connection, in the block, at commit), raises :class:`DatabaseUnavailable`; the block's own other
        errors pass unchanged."""
        validate_tenant_id(tenant_id)
        # set_config(..., true) is SET LOCAL: gone at commit or rollback.
        async with self._transaction("SELECT set_config('role', $1, true), set_config($2, $3, true)",
                                     APP_ROLE, TENANT_SETTING, tenant_id) as conn:
            tx = TenantTransaction(conn, tenant_id)
            yield tx
        tx._committed()

    async def fetch_without_tenant(self, query: str, *args: Any) -> list[asyncpg.Record]:
        """One read-only query in a transaction with no tenant set, where row-level security hides every
        tenant row: only a SECURITY DEFINER index made for it (``agentworker.due_schedules``,
        ``agentworker.idle_running_runs``) answers."""
        async with self._transaction("SELECT set_config('role', $1, true)", APP_ROLE, readonly=True) as conn:
            with _unavailable_on_connection_loss(self.url):
                return list(await conn.fetch(query, *args))

    @asynccontextmanager
    async def _transaction(self, setup: str, *args: Any, readonly: bool = False) -> AsyncIterator[PoolConnectionProxy]:
        """A pooled connection in a transaction that ``setup`` began. A connection that may be broken is
        terminated rather than returned to the pool (the server rolls back what it had open)."""
        conn, transaction = await self._begin(setup, args, readonly=readonly)
        try:
            yield conn
        except DatabaseUnavailable:
            await self._discard(conn)  # its queries lost the connection: a ROLLBACK would only fail again
            raise
        except Exception as exc:
            if is_lost_connection(exc):
                await self._discard(conn)
                raise DatabaseUnavailable(f"lost PostgreSQL at {self.url}: {exc}") from exc
            # Whatever may stop the rollback (most likely the connection), the block's error is the one to report.
            if await self._rolled_back(conn, transaction):
                await self._give_back(conn)
            raise
        except BaseException:
            await self._release_cancelled(conn, transaction)
            raise
        try:
            await transaction.commit()
        except Exception as exc:
            if is_connection_error(exc):
                await self._discard(conn)
                raise DatabaseUnavailable(f"lost PostgreSQL at {self.url} while committing (the transaction may "
                                          f"or may not have been committed): {exc}") from exc
            await self._give_back(conn)  # e.g. a serialization failure: the transaction is over, the connection fine
            raise
        except BaseException:
            await self._release_cancelled(conn, transaction)
            raise
        await self._give_back(conn)

    async def _begin(self, setup: str, args: tuple[Any, ...], *,
                     readonly: bool) -> tuple[PoolConnectionProxy, Transaction]:
        # After a server restart the pool's idle connections are dead, and asyncpg may not know yet: a
        # connection that fails before anything ran is discarded and a fresh one is tried, once.
        for attempt in (1, 2):
            try:
                conn: PoolConnectionProxy = await self._pool.acquire()
            except Exception as exc:
                if is_connection_error(exc):
                    raise DatabaseUnavailable(f"cannot reach PostgreSQL at {self.url}: "
                                              f"{exc or type(exc).__name__}") from exc
                raise
            try:
                transaction = conn.transaction(readonly=readonly)
                await transaction.start()
                await conn.execute(setup, *args)
            except BaseException as exc:
                await self._discard(conn)
                if not isinstance(exc, Exception) or not is_connection_error(exc):
                    raise
                if attempt == 2:
                    raise DatabaseUnavailable(f"lost PostgreSQL at {self.url}: {exc}") from exc
                continue
            return conn, transaction
        raise AssertionError("unreachable: the second attempt returns or raises")

    async def _rolled_back(self, conn: PoolConnectionProxy, transaction: Transaction) -> bool:
        """Roll back; False (and the connection discarded) if that failed."""
        try:
            await transaction.rollback()
        except Exception:
            await self._discard(conn)
            return False
        return True

    async def _give_back(self, conn: PoolConnectionProxy) -> None:
        """Return a connection whose transaction has ended. If the pool's reset finds it dead, asyncpg
        closes it; the transaction was over by then, so that is no one's error."""
        try:
            await self._pool.release(conn)
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            await self._discard(conn)

    async def _release_cancelled(self, conn: PoolConnectionProxy, transaction: Transaction) -> None:
        """Give back the connection of a cancelled block; never raises (the cancellation is what the caller
        must see). Cancelled between queries, it rolls back. Cancelled mid-query, asyncpg refuses the
        ROLLBACK at once, and its pool's release waits for the server to cancel the query, then rolls back
        (logging "Resetting connection with an active transaction") and resets; it terminates the connection
        if any of that fails. Terminating at once instead would leave the server running the query, and
        holding its locks, until it next looks at the socket."""
        try:
            with suppress(Exception):
                await transaction.rollback()
        finally:  # even if cancelled once more meanwhile (the release itself is shielded)
            try:
                await self._pool.release(conn)
            except Exception:
                await self._discard(conn)

    async def _discard(self, conn: PoolConnectionProxy) -> None:
        """Terminate a connection that may be broken; its pool slot reconnects on the next acquire."""
        with suppress(asyncpg.InterfaceError):  # asyncpg already released a connection it saw close
            conn.terminate()
        with suppress(Exception):  # a no-op once terminated; only there for a holder asyncpg missed
            await self._pool.release(conn)

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
    except asyncpg.InvalidCatalogNameError as exc:
        raise DatabaseError(f"PostgreSQL at {shown} has no such database: {exc}") from None
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
    except Exception as exc:
        pool.terminate()
        if is_connection_error(exc):
            raise DatabaseUnavailable(f"lost PostgreSQL at {shown}: {exc or type(exc).__name__}") from exc
        raise
    if version is None or version < REQUIRED_MIGRATION:
        await pool.close()
        raise DatabaseNotMigrated(f"the database at {shown} is not migrated to version {REQUIRED_MIGRATION} "
                                  f"(found {version}); run `agentworker migrate`")
    return Database(pool, url)


class LazyDatabase:
    """A process's PostgreSQL pool, opened on first need (``await lazy()``), one attempt at a time however
    many callers wait. An attempt that fails raises :class:`DatabaseError` — :func:`open_database`'s own,
    or any other failure to connect (e.g. a malformed URL) as one with the URL redacted — and the next
    need tries again. For processes that serve while PostgreSQL may be away: the supervisor's admin and
    console endpoints, the webhook ingress. ``url`` may be a callable, read at each attempt (the
    supervisor's settings)."""

    def __init__(self, url: str | Callable[[], str], *, max_size: int) -> None:
        self._url = url if callable(url) else (lambda: url)
        self.max_size = max_size
        self._database: Database | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> Database:
        if self._database is not None:
            return self._database
        async with self._lock:
            if self._database is None:
                url = self._url()
                try:
                    self._database = await open_database(url, max_size=self.max_size)
                except DatabaseError:
                    raise
                except (OSError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                    # e.g. the URL's database does not exist: unusable like an unreachable server
                    raise DatabaseError(f"cannot use PostgreSQL at {redact_url(url)}: {exc}") from exc
            return self._database

    @property
    def opened(self) -> bool:
        """The pool is open (a need has opened it and close() has not closed it since)."""
        return self._database is not None

    async def close(self) -> None:
        """Close the pool if it was opened (a later need opens it again)."""
        async with self._lock:
            if self._database is not None:
                database, self._database = self._database, None
                await database.close()
