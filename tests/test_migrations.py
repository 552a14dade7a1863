"""``agentworker migrate``: versioned SQL, a no-op when re-run, safe with two migrators at once."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from agentworker.db import DatabaseNotMigrated, open_database
from agentworker.db.migrate import Migration, MigrationError, load_migrations, migrate
from tests.conftest import ROOT, TEST_DATABASE_SERVER, database_url_for


@pytest.fixture
async def empty_database() -> AsyncIterator[str]:
    import os

    server = os.environ.get("AGENTWORKER_TEST_DATABASE_URL", TEST_DATABASE_SERVER)
    name = f"aw_mig_{uuid.uuid4().hex[:12]}"
    try:
        conn = await asyncpg.connect(server, timeout=10)
    except OSError as exc:
        pytest.skip(f"PostgreSQL is not reachable for the tests: {exc}")
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
        yield database_url_for(server, name)
    finally:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await conn.close()


async def _applied(url: str) -> list[tuple[int, str]]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT version, name FROM agentworker.schema_migrations ORDER BY version")
        return [(r["version"], r["name"]) for r in rows]
    finally:
        await conn.close()


def test_migration_files_are_numbered_without_gaps() -> None:
    migrations = load_migrations()
    assert [m.version for m in migrations] == list(range(1, len(migrations) + 1))
    assert migrations[0].label == "0001_workflows"


async def test_migrating_twice_applies_once_and_two_migrators_do_not_race(empty_database: str) -> None:
    with pytest.raises(DatabaseNotMigrated, match="run `agentworker migrate`"):
        await open_database(empty_database)
    shipped = load_migrations()
    reports = await asyncio.gather(migrate(empty_database), migrate(empty_database))
    assert sorted(len(r.applied) for r in reports) == [0, len(shipped)]
    again = await migrate(empty_database)
    assert again.applied == [] and again.already_applied == len(shipped)
    assert await _applied(empty_database) == [(m.version, m.name) for m in shipped]
    database = await open_database(empty_database)
    await database.close()


async def test_an_edited_or_unknown_migration_is_refused(empty_database: str) -> None:
    original = load_migrations()[0]
    await migrate(empty_database, migrations=[original])
    edited = Migration(original.version, original.name, original.sql + "\n-- edited\n")
    with pytest.raises(MigrationError, match="0001_workflows was changed after it was applied"):
        await migrate(empty_database, migrations=[edited])
    with pytest.raises(MigrationError, match="this version of agentworker does not know"):
        await migrate(empty_database, migrations=[])
    failing = Migration(2, "broken", "CREATE TABLE agentworker.half (x int); SELECT no_such_function();")
    with pytest.raises(MigrationError, match="migration 0002_broken failed: UndefinedFunctionError"):
        await migrate(empty_database, migrations=[original, failing])
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('agentworker.half')") is None, "rolled back whole"
    finally:
        await conn.close()
    assert await _applied(empty_database) == [(1, "workflows")]


def test_the_migrate_command(empty_database: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "AGENTWORKER_DATABASE_URL": empty_database}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "agentworker", "migrate", *args], capture_output=True,
                              text=True, env=env, cwd=ROOT, timeout=120)

    first = run()
    assert first.returncode == 0, first.stderr
    assert "applied 0001_workflows" in first.stdout
    assert f"{len(load_migrations())} migration(s) applied; LangGraph checkpoint tables ready" in first.stdout
    second = run()
    assert second.returncode == 0 and "already up to date" in second.stdout
    down = run("--database-url", "postgresql://postgres:hunter2@127.0.0.1:1/nowhere")
    assert down.returncode == 1
    assert down.stderr.startswith("agentworker: cannot connect to PostgreSQL at postgresql://postgres:***@127.0.0.1:1")
    assert "hunter2" not in down.stderr and "Traceback" not in down.stderr


async def test_langgraph_makes_its_tables_and_our_repeatable_sql_puts_them_under_rls(empty_database: str) -> None:
    bare = await migrate(empty_database, checkpoints=False)
    assert not bare.checkpoint_tables
    conn = await asyncpg.connect(empty_database)
    try:
        assert await conn.fetchval("SELECT to_regclass('agentworker.checkpoints')") is None
        for _ in range(2):  # the RLS file runs on every migrate: it must be idempotent
            report = await migrate(empty_database)
            assert report.checkpoint_tables and report.applied == []
            rows = await conn.fetch(
                "SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity, "
                "       (SELECT count(*) FROM pg_policies p WHERE p.schemaname = 'agentworker' "
                "        AND p.tablename = c.relname AND p.policyname = 'tenant_isolation') AS policies, "
                "       has_table_privilege('agentworker_app', c.oid, 'SELECT') AS reads, "
                "       has_table_privilege('agentworker_app', c.oid, 'INSERT') AS writes "
                "FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'agentworker' AND c.relname LIKE 'checkpoint%' AND c.relkind = 'r' "
                "ORDER BY c.relname")
            assert {r["relname"]: (r["relrowsecurity"], r["relforcerowsecurity"], r["policies"], r["reads"],
                                   r["writes"]) for r in rows} == {
                "checkpoints": (True, True, 1, True, True), "checkpoint_blobs": (True, True, 1, True, True),
                "checkpoint_writes": (True, True, 1, True, True),
                "checkpoint_migrations": (False, False, 0, True, False)}
    finally:
        await conn.close()
    assert await _applied(empty_database) == [(m.version, m.name) for m in load_migrations()], \
        "the repeatable file is no numbered migration"
