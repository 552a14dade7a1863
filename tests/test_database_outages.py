"""PostgreSQL going away, in-process: every way it shows comes out of our tables' transactions and
LangGraph's checkpoint pool as ``DatabaseUnavailable``, and broken connections are not used again.

Each error is raised by a real connection to a private PostgreSQL (tests/pg_server.py): a backend
terminated from another connection or killed, a fast restart, a smart shutdown refusing new connections,
and a loopback proxy (tests/pg_proxy.py) for the moments a restart catches connections in.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from agentworker.db import Database, DatabaseUnavailable, open_database
from agentworker.db.database import is_connection_error, is_lost_connection
from agentworker.graphs.checkpoints import open_checkpoint_store
from tests.conftest import new_tenant, wait_for
from tests.pg_proxy import PostgresProxy
from tests.pg_server import PrivatePostgres, create_migrated_database

DATABASE = "agentworker"


@pytest.fixture(scope="module")
def server() -> Iterator[PrivatePostgres]:
    pg = PrivatePostgres()
    try:
        pg.start()
        create_migrated_database(pg, DATABASE)
        yield pg
    finally:
        pg.cleanup()


@pytest.fixture
def url(server: PrivatePostgres) -> str:
    server.wait_ready()  # a test before may have crashed or restarted it
    return server.url(DATABASE)


@pytest.fixture
async def db(url: str) -> AsyncIterator[Database]:
    database = await open_database(url, max_size=2)
    try:
        yield database
    finally:
        await database.close()


@pytest.fixture
async def proxy(server: PrivatePostgres) -> AsyncIterator[PostgresProxy]:
    front = PostgresProxy(server.port, hold_eofs=True)
    await front.start()
    try:
        yield front
    finally:
        await front.close()


async def terminate_backend(server: PrivatePostgres, pid: int) -> None:
    """``pg_terminate_backend`` from another (superuser) connection; returns once the backend is gone."""
    admin = await asyncpg.connect(server.url(), timeout=10)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1, 10000)", pid)
    finally:
        await admin.close()


async def recorded(db: Database, tenant: str, key: str) -> bool:
    async with db.tenant(tenant) as tx:
        return bool(await tx.fetchval("SELECT count(*) FROM agentworker.side_effects WHERE call_key = $1", key))


INSERT = ("INSERT INTO agentworker.side_effects (tenant_id, run_id, step_id, call_key, result) "
          "VALUES ($1, 'run', 'step', $2, '{}'::jsonb)")


async def lose_connection(server: PrivatePostgres, tx: Any) -> None:
    """Terminate the transaction's backend and wait until asyncpg has seen its connection close."""
    await terminate_backend(server, await tx.fetchval("SELECT pg_backend_pid()"))
    await wait_for(lambda: saw_close(tx), 10, what="asyncpg to see the connection close")


def saw_close(tx: Any) -> bool:
    """asyncpg noticed its connection close (it then hands the pool's slot back and detaches the proxy)."""
    return bool(tx._conn._con is None or tx._conn.is_closed())


async def use(db: Database) -> None:
    async with db.tenant(new_tenant("outage")) as tx:
        await tx.fetchval("SELECT 1")


def cause_of(info: pytest.ExceptionInfo[DatabaseUnavailable]) -> BaseException | None:
    return info.value.__cause__


# -- in the block and at its end (the transaction's __aexit__) --------------------------------------------


async def test_a_query_killed_mid_flight_and_the_end_of_its_block_are_one_database_unavailable(
        server: PrivatePostgres, db: Database) -> None:
    tenant = new_tenant("outage")
    pids: list[int] = []

    async def block() -> None:
        async with db.tenant(tenant) as tx:
            pids.append(await tx.fetchval("SELECT pg_backend_pid()"))
            sleeping = asyncio.create_task(tx.execute("SELECT pg_sleep(30)"))
            await wait_for(lambda: backend_busy(server, pids[0]), 10, what="pg_sleep to run")
            await terminate_backend(server, pids[0])
            await sleeping  # raises; the block does not catch it, and the rollback must not replace it

    with pytest.raises(DatabaseUnavailable) as info:
        await block()
    assert isinstance(cause_of(info), asyncpg.ConnectionDoesNotExistError)
    assert "terminating connection due to administrator command" in str(info.value)
    async with db.tenant(tenant) as tx:  # the pool hands out a working connection again
        assert await tx.fetchval("SELECT pg_backend_pid()") != pids[0]


async def backend_busy(server: PrivatePostgres, pid: int) -> bool:
    admin = await asyncpg.connect(server.url(), timeout=10)
    try:
        return bool(await admin.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = $1 AND "
                                         "query LIKE '%pg_sleep(30)%' AND state = 'active'", pid))
    finally:
        await admin.close()


async def test_a_connection_lost_between_queries_is_unavailable_in_the_next_query(
        server: PrivatePostgres, db: Database) -> None:
    async def block() -> None:
        async with db.tenant(new_tenant("outage")) as tx:
            await lose_connection(server, tx)
            await tx.execute("SELECT 1")

    with pytest.raises(DatabaseUnavailable) as info:
        await block()
    assert isinstance(cause_of(info), asyncpg.InterfaceError)
    assert "connection has been released back to the pool" in str(cause_of(info))


async def test_a_connection_lost_before_commit_is_unavailable_at_the_end_of_the_block(
        server: PrivatePostgres, db: Database) -> None:
    tenant, key = new_tenant("outage"), uuid.uuid4().hex
    async def block() -> None:
        async with db.tenant(tenant) as tx:
            await tx.execute(INSERT, tenant, key)
            await lose_connection(server, tx)

    with pytest.raises(DatabaseUnavailable) as info:
        await block()
    cause = cause_of(info)
    assert isinstance(cause, asyncpg.InterfaceError), repr(cause)
    assert "Transaction.commit(): the underlying connection is closed" in str(cause)
    assert "while committing" in str(info.value)
    assert not await recorded(db, tenant, key)


async def test_the_blocks_own_error_survives_a_failed_rollback(server: PrivatePostgres, db: Database) -> None:
    tenant = new_tenant("outage")
    async def block() -> None:
        async with db.tenant(tenant) as tx:
            await lose_connection(server, tx)
            raise LookupError("the block's own")

    with pytest.raises(LookupError, match="the block's own"):
        await block()
    async with db.tenant(tenant) as tx:
        assert await tx.fetchval("SELECT 1") == 1


async def test_a_healthy_connection_is_reused_after_an_ordinary_error(db: Database) -> None:
    tenant = new_tenant("outage")
    async with db.tenant(tenant) as tx:
        first = await tx.fetchval("SELECT pg_backend_pid()")
    async def block() -> None:
        async with db.tenant(tenant) as tx:
            await tx.execute(INSERT, tenant, "twice")
            await tx.execute(INSERT, tenant, "twice")

    with pytest.raises(asyncpg.UniqueViolationError):
        await block()
    async with db.tenant(tenant) as tx:
        assert await tx.fetchval("SELECT pg_backend_pid()") == first, "rolled back and returned, not discarded"
        assert not await tx.fetchval("SELECT count(*) FROM agentworker.side_effects WHERE call_key = 'twice'")


async def test_another_operation_in_progress_is_unavailable(db: Database) -> None:
    async with db.tenant(new_tenant("outage")) as tx:
        sleeping = asyncio.create_task(tx.execute("SELECT pg_sleep(0.3)"))
        await asyncio.sleep(0.05)
        with pytest.raises(DatabaseUnavailable) as info:
            await tx.execute("SELECT 1")
        await sleeping
    assert isinstance(cause_of(info), asyncpg.InterfaceError)
    assert "another operation is in progress" in str(cause_of(info))


async def test_a_death_notice_read_on_a_connection_still_open_is_unavailable_in_a_query_and_at_commit(
        server: PrivatePostgres, proxy: PostgresProxy) -> None:
    db = await open_database(proxy.url(DATABASE), max_size=2)
    try:
        async def block(tenant: str, key: str, where: str) -> None:
            async with db.tenant(tenant) as tx:
                await tx.execute(INSERT, tenant, key)
                held = proxy.eofs_held
                await terminate_backend(server, await tx.fetchval("SELECT pg_backend_pid()"))
                await wait_for(lambda: proxy.eofs_held > held, 10, what="the server to close")
                # The FATAL was written to the client's socket before the close was held back; a turn of
                # the loop lets asyncpg read it.
                await asyncio.sleep(0.1)
                assert not saw_close(tx)
                if where == "query":
                    await tx.execute("SELECT 1")

        for where in ("query", "commit"):
            tenant, key = new_tenant("outage"), uuid.uuid4().hex
            with pytest.raises(DatabaseUnavailable) as info:
                await block(tenant, key, where)
            cause = cause_of(info)
            assert isinstance(cause, asyncpg.exceptions.InternalClientError), (where, repr(cause))
            assert "another operation (2) is in progress" in str(cause)
            assert not await recorded(db, tenant, key)
    finally:
        await proxy.close()  # first: it holds back the end of the pool's graceful closes too
        await db.close()


async def test_cancelling_a_block_mid_query_cancels_the_query_and_rolls_back(
        server: PrivatePostgres, db: Database) -> None:
    tenant, key = new_tenant("outage"), uuid.uuid4().hex
    pids: list[int] = []

    async def block() -> None:
        async with db.tenant(tenant) as tx:
            await tx.execute(INSERT, tenant, key)
            pids.append(await tx.fetchval("SELECT pg_backend_pid()"))
            await tx.execute("SELECT pg_sleep(30)")

    task = asyncio.create_task(block())
    await wait_for(lambda: bool(pids) and backend_busy(server, pids[0]), 10, what="pg_sleep to run")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not await backend_busy(server, pids[0]), "the server cancelled the query before the block ended"
    assert not await recorded(db, tenant, key)


# -- taking a connection from the pool, and giving it back ------------------------------------------------


async def test_a_pooled_connection_that_died_idle_is_replaced_before_the_block_runs(
        server: PrivatePostgres, proxy: PostgresProxy) -> None:
    db = await open_database(proxy.url(DATABASE), max_size=1)
    try:
        async with db.tenant(new_tenant("outage")) as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
        held = proxy.eofs_held
        await terminate_backend(server, pid)
        await wait_for(lambda: proxy.eofs_held > held, 10, what="the server to close")
        await asyncio.sleep(0.1)  # asyncpg reads the FATAL in its idle state: the connection looks open
        async with db.tenant(new_tenant("outage")) as tx:
            assert await tx.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await proxy.close()  # first: it holds back the end of the pool's graceful closes too
        await db.close()


async def test_a_server_gone_refuses_the_pools_reconnection_as_unavailable(proxy: PostgresProxy) -> None:
    db = await open_database(proxy.url(DATABASE), max_size=1)
    try:
        async with db.tenant(new_tenant("outage")) as tx:
            assert await tx.fetchval("SELECT 1") == 1
        await proxy.close()  # drops the pool's connection and refuses new ones
        with pytest.raises(DatabaseUnavailable) as info:
            await use(db)
        assert isinstance(cause_of(info), OSError)
        assert "cannot reach PostgreSQL" in str(info.value)
    finally:
        await db.close()


async def test_a_connect_timeout_is_unavailable_when_opening_and_when_the_pool_reconnects(
        server: PrivatePostgres) -> None:
    front = PostgresProxy(server.port)
    await front.start()
    db = await open_database(front.url(DATABASE), max_size=1, connect_timeout=0.5)
    try:
        async with db.tenant(new_tenant("outage")) as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
        front.silent = True  # from now on, connections are accepted and never answered
        with pytest.raises(DatabaseUnavailable) as opening:
            await open_database(front.url(DATABASE), connect_timeout=0.3)
        assert isinstance(opening.value.__cause__, TimeoutError)
        await terminate_backend(server, pid)
        with pytest.raises(DatabaseUnavailable) as info:
            await use(db)
        assert isinstance(cause_of(info), TimeoutError)
    finally:
        db._pool.terminate()
        await front.close()


def postmaster_status(server: PrivatePostgres) -> str | None:
    """What the postmaster says it is doing, in its lock file: starting, ready, standby or stopping."""
    try:
        lines = (server.data / "postmaster.pid").read_text().splitlines()
    except OSError:
        return None
    return lines[7].strip() if len(lines) > 7 else None


async def test_a_server_shutting_down_refuses_new_connections_as_unavailable(server: PrivatePostgres,
                                                                            url: str) -> None:
    db = await open_database(url, max_size=2)
    stopping: asyncio.subprocess.Process | None = None
    try:
        async with db.tenant(new_tenant("outage")) as held:
            # Smart shutdown waits for open sessions (this one and the pool's) and refuses new ones (57P03).
            stopping = await asyncio.create_subprocess_exec(
                *server._as_user, str(server.bin_dir / "pg_ctl"), "-D", str(server.data), "-m", "smart", "-w",
                "-t", "60", "stop", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await wait_for(lambda: postmaster_status(server) == "stopping", 10, what="the shutdown to begin")
            with pytest.raises(DatabaseUnavailable) as info:
                await use(db)
            assert isinstance(cause_of(info), asyncpg.CannotConnectNowError)
            assert await held.fetchval("SELECT 1") == 1
    finally:
        await db.close()
        if stopping is not None:
            await stopping.wait()
            await asyncio.to_thread(server.start)


async def test_a_connection_dead_at_release_after_commit_is_discarded_and_the_commit_stands(
        server: PrivatePostgres, url: str) -> None:
    dying: list[int] = []

    async def reset(conn: asyncpg.Connection) -> None:
        if dying:  # the pool's reset after the commit finds the connection gone
            await terminate_backend(server, dying.pop())
            await conn.execute("SELECT 1")

    pool = await asyncpg.create_pool(url, min_size=1, max_size=1, reset=reset)
    db = Database(pool, url)
    tenant, key = new_tenant("outage"), uuid.uuid4().hex
    try:
        async with db.tenant(tenant) as tx:
            await tx.execute(INSERT, tenant, key)
            pid = await tx.fetchval("SELECT pg_backend_pid()")
            dying.append(pid)
        assert await recorded(db, tenant, key)
        async with db.tenant(tenant) as tx:
            assert await tx.fetchval("SELECT pg_backend_pid()") != pid
    finally:
        await db.close()


async def test_a_crash_of_another_backend_is_unavailable(server: PrivatePostgres, db: Database) -> None:
    admin = await asyncpg.connect(server.url(), timeout=10)
    victim = await admin.fetchval("SELECT pg_backend_pid()")

    async def block() -> None:
        async with db.tenant(new_tenant("outage")) as tx:
            pid = await tx.fetchval("SELECT pg_backend_pid()")
            sleeping = asyncio.create_task(tx.execute("SELECT pg_sleep(30)"))
            await wait_for(lambda: backend_busy(server, pid), 10, what="pg_sleep to run")
            os.kill(victim, signal.SIGKILL)  # the postmaster ends every session (57P02) and recovers
            await sleeping

    try:
        with pytest.raises(DatabaseUnavailable) as info:
            await block()
        assert isinstance(cause_of(info), asyncpg.PostgresConnectionError)
    finally:
        admin.terminate()
    await asyncio.to_thread(server.wait_ready)
    async with db.tenant(new_tenant("outage")) as tx:
        assert await tx.fetchval("SELECT 1") == 1


@pytest.mark.parametrize("error", [
    asyncpg.exceptions.InternalClientError("cannot switch to state 15; another operation (2) is in progress"),
    asyncpg.InterfaceError("cannot call Transaction.__aexit__(): the underlying connection is closed"),
    asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
    asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
    asyncpg.exceptions.ConnectionFailureError("x"),
    asyncpg.CannotConnectNowError("the database system is starting up"),
    asyncpg.PostgresConnectionError("x"),
    asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator command"),
    asyncpg.exceptions.CrashShutdownError("terminating connection because of crash of another server process"),
    asyncpg.exceptions.TooManyConnectionsError("sorry, too many clients already"),
], ids=lambda error: type(error).__name__)
def test_the_one_list_of_lost_connection_errors(error: Exception) -> None:
    # The classes asyncpg reports only in rare timings (57P01/57P02 on their own, outside a query).
    assert is_lost_connection(error) and is_connection_error(error)


def test_bad_queries_and_other_errors_are_not_lost_connections() -> None:
    for error in (asyncpg.UniqueViolationError("x"), asyncpg.exceptions.OutdatedSchemaCacheError("x"),
                  asyncpg.InterfaceError("cannot use Connection.transaction() in a manually started transaction"),
                  ValueError("x"), OSError("x")):
        assert not is_lost_connection(error), error
    assert is_connection_error(OSError("x")) and is_connection_error(TimeoutError())


# -- LangGraph's checkpoint pool (psycopg) -----------------------------------------------------------------


async def test_checkpoints_lose_their_connection_as_unavailable_and_get_a_working_one_next(
        server: PrivatePostgres, url: str) -> None:
    store = await open_checkpoint_store(url, max_size=1)
    tenant = new_tenant("outage")
    config: dict[str, Any] = {"configurable": {"thread_id": f"{tenant}:run-1", "checkpoint_ns": ""}}

    async def block() -> None:
        async with store.saver(tenant, f"{tenant}:run-1") as saver:
            cursor = await saver.conn.execute("SELECT pg_backend_pid() AS pid")
            row: Any = await cursor.fetchone()
            await terminate_backend(server, row["pid"])
            await saver.aget_tuple(config)

    try:
        with pytest.raises(DatabaseUnavailable) as info:
            await block()
        assert "checkpoints" in str(info.value)
        async with store.saver(tenant, f"{tenant}:run-1") as saver:
            assert await saver.aget_tuple(config) is None
        # A fast restart kills the pool's idle connection: the pool's check replaces it before lending it.
        await asyncio.to_thread(server.restart)
        async with store.saver(tenant, f"{tenant}:run-1") as saver:
            assert await saver.aget_tuple(config) is None
    finally:
        await store.aclose()


# -- a fast restart under concurrent transactions ------------------------------------------------------------


@pytest.mark.timeout(180)
async def test_fast_restarts_under_concurrent_transactions_raise_only_database_unavailable(
        server: PrivatePostgres, url: str) -> None:
    db = await open_database(url, max_size=10)
    store = await open_checkpoint_store(url, max_size=4)
    seen: Counter[str] = Counter()
    others: list[BaseException] = []
    last_success: dict[int, float] = {}
    stop = asyncio.Event()

    async def tables(worker: int) -> None:
        tenant = new_tenant(f"load{worker}")
        while not stop.is_set():
            try:
                async with db.tenant(tenant) as tx:
                    await tx.execute(INSERT, tenant, uuid.uuid4().hex)
                    await tx.execute("SELECT pg_sleep(0.005 * random())")
                    await tx.fetchval("SELECT count(*) FROM agentworker.side_effects")
                seen["ok"] += 1
                last_success[worker] = time.monotonic()
            except DatabaseUnavailable:
                seen["DatabaseUnavailable"] += 1
                await asyncio.sleep(0.02)
            except Exception as exc:
                others.append(exc)
                seen[type(exc).__name__] += 1

    async def checkpoints(worker: int) -> None:
        tenant = new_tenant(f"cp{worker}")
        config: dict[str, Any] = {"configurable": {"thread_id": f"{tenant}:run", "checkpoint_ns": ""}}
        while not stop.is_set():
            try:
                async with store.saver(tenant, f"{tenant}:run") as saver:
                    await saver.aget_tuple(config)
                    await saver.conn.execute("SELECT pg_sleep(0.01)")
                last_success[100 + worker] = time.monotonic()
            except DatabaseUnavailable:
                seen["DatabaseUnavailable (checkpoints)"] += 1
                await asyncio.sleep(0.02)
            except Exception as exc:
                others.append(exc)
                seen[type(exc).__name__] += 1

    workers = [asyncio.create_task(tables(i)) for i in range(24)]
    workers += [asyncio.create_task(checkpoints(i)) for i in range(4)]
    try:
        await wait_for(lambda: len(last_success) == 28, 30, what="every worker to succeed once")
        for _ in range(3):
            await asyncio.to_thread(server.restart)
            restarted = time.monotonic()
            await wait_for(lambda since=restarted: all(t > since for t in last_success.values()), 60,
                           what="every worker to succeed after the restart")
    finally:
        stop.set()
        await asyncio.gather(*workers)
        await store.aclose()
        await db.close()
    print(f"outcomes over 3 fast restarts: {dict(seen)}")
    assert not others, f"errors other than DatabaseUnavailable: {dict(seen)}; first: {others[0]!r}"
    assert seen["DatabaseUnavailable"] > 0, f"the restarts hit no transaction: {dict(seen)}"

