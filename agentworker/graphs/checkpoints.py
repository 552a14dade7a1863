"""LangGraph checkpoints in PostgreSQL, under the same tenant isolation as our own tables.

LangGraph's ``AsyncPostgresSaver`` needs psycopg (not asyncpg) connections with ``autocommit=True,
prepare_threshold=0, row_factory=dict_row``. Its tables live in the ``agentworker`` schema and are created
by ``agentworker migrate`` (LangGraph's own setup, then our row-level security from
``agentworker/db/migrations/repeatable/checkpoint_rls.sql``: see :mod:`agentworker.db.migrate`): thread ids
are ``{tenant_id}:{run_id}`` and a row is visible only when the thread's tenant is the connection's
``agentworker.tenant_id``. :meth:`CheckpointStore.saver` lends one connection of the pool to
one run, as ``agentworker_app`` with that tenant set, and holds an advisory lock on the thread so two jobs
never advance the same run at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from agentworker.db.database import APP_ROLE, SCHEMA, TENANT_SETTING, DatabaseError, DatabaseUnavailable
from agentworker.db.urls import redact_url

_CONNECTION_KWARGS: dict[str, Any] = {
    "autocommit": True,
    "prepare_threshold": 0,
    "row_factory": dict_row,
    "options": f"-c search_path={SCHEMA}",
}


def thread_id(tenant_id: str, run_id: str) -> str:
    """The LangGraph thread of a run (tenant ids have no ':', so the prefix is the tenant)."""
    return f"{tenant_id}:{run_id}"


def is_lost_connection(exc: BaseException, conn: psycopg.AsyncConnection[Any] | None = None) -> bool:
    """True for psycopg's errors that mean the server or ``conn`` went away (the pool could not hand out a
    connection in time, an ``OperationalError`` such as "server closed the connection unexpectedly" or
    57P01 "terminating connection due to administrator command", or an ``InterfaceError`` on a connection
    that is closed or broken)."""
    if isinstance(exc, (PoolTimeout, psycopg.OperationalError)):
        return True
    if isinstance(exc, psycopg.InterfaceError):
        return (conn is not None and (conn.closed or conn.broken)) or "closed" in str(exc)
    return False


async def _configure(conn: psycopg.AsyncConnection[Any]) -> None:
    await conn.execute(f"SET ROLE {APP_ROLE}")
    cursor = await conn.execute("SELECT rolsuper OR rolbypassrls AS bypasses FROM pg_roles "
                                "WHERE rolname = current_user")
    row: Any = await cursor.fetchone()
    if row is None or row["bypasses"]:
        raise DatabaseError(f"role {APP_ROLE} can bypass row-level security; refusing to use it")


async def _reset(conn: psycopg.AsyncConnection[Any]) -> None:
    # Back to no tenant (and no lock) before the connection serves another run.
    await conn.execute("SELECT set_config(%s, '', false), pg_advisory_unlock_all()", (TENANT_SETTING,))


class CheckpointStore:
    """A process-wide psycopg pool lending one connection per running workflow."""

    def __init__(self, pool: AsyncConnectionPool[Any], url: str) -> None:
        self._pool = pool
        self.url = redact_url(url)

    @asynccontextmanager
    async def saver(self, tenant_id: str, thread: str) -> AsyncIterator[AsyncPostgresSaver]:
        """A checkpointer that sees only ``tenant_id``'s threads, holding ``thread`` for this caller.

        PostgreSQL going away (taking the connection, or under LangGraph's queries) raises
        :class:`DatabaseUnavailable`. The pool discards a connection it gets back broken."""
        conn: psycopg.AsyncConnection[Any] | None = None
        try:
            async with self._pool.connection() as conn:
                await conn.execute("SELECT set_config(%s, %s, false)", (TENANT_SETTING, tenant_id))
                await conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (thread,))
                yield AsyncPostgresSaver(conn)
        except Exception as exc:
            if is_lost_connection(exc, conn):
                raise DatabaseUnavailable(f"lost PostgreSQL at {self.url} (checkpoints): {exc}") from exc
            raise

    async def aclose(self) -> None:
        await self._pool.close()


async def open_checkpoint_store(url: str, *, max_size: int = 10, connect_timeout: float = 5.0) -> CheckpointStore:
    """Open the pool (one connection at once, to fail fast); :class:`DatabaseUnavailable` if unreachable."""
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        url, min_size=1, max_size=max(1, max_size), kwargs=dict(_CONNECTION_KWARGS), configure=_configure,
        # check: a connection that died while idle (a server restart) is replaced before it is lent out.
        check=AsyncConnectionPool.check_connection, reset=_reset, open=False, timeout=30.0,
        name="agentworker-checkpoints")
    try:
        await pool.open(wait=True, timeout=connect_timeout)
    except PoolTimeout as exc:
        await pool.close()
        raise DatabaseUnavailable(f"cannot reach PostgreSQL at {redact_url(url)} (checkpoints): {exc}") from None
    return CheckpointStore(pool, url)
