"""The whole database schema: our versioned SQL migrations, then LangGraph's checkpoint tables under RLS.

``agentworker migrate`` runs :func:`migrate`, under a PostgreSQL advisory lock (two migrators never race):

1. **Versioned migrations**, ``agentworker/db/migrations/NNNN_name.sql``, in order: each file not yet
   recorded in ``agentworker.schema_migrations`` is applied in its own transaction together with its
   record, so a failed file leaves nothing behind and running again is a no-op. A file changed after it
   was applied (its checksum differs) is refused: write a new migration instead.
2. **LangGraph's checkpoint tables**, when its PostgreSQL checkpointer is importable (a dependency of
   agentworker: without it there is nothing to checkpoint, and ``migrate`` still works): LangGraph's own
   ``AsyncPostgresSaver.setup()`` creates and upgrades them (its migrations, its bookkeeping table), and
   only it knows their DDL, so they cannot be one of our numbered files. Then our DDL for them — row-level
   security, grants — runs from ``agentworker/db/migrations/repeatable/checkpoint_rls.sql`` on every
   migrate, after LangGraph's setup (which may have added to its tables), in one transaction. A
   *repeatable* file is not checksummed or recorded: it must be idempotent, and may be edited.

So every statement of our schema is a ``.sql`` file under ``db/migrations/``, and nothing here imports
our LangGraph code (``agentworker.graphs``): the runtime's checkpointer (``graphs/checkpoints.py``) uses
the tables this makes.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from importlib import resources

import asyncpg

from agentworker.db.database import SCHEMA, is_connection_error
from agentworker.db.urls import redact_url
from agentworker.errors import AgentWorkerError

#: pg_advisory_lock key held while migrating ("agentwkr" in ASCII).
MIGRATION_LOCK_KEY = 0x6167656E74776B72
_LOCK_RETRY_S = 0.1
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

#: our DDL for LangGraph's checkpoint tables, run after LangGraph's setup by every migrate
CHECKPOINT_RLS_FILE = "repeatable/checkpoint_rls.sql"


class MigrationError(AgentWorkerError):
    """The migrations cannot be applied (unreachable server, edited or unknown migration, failed SQL)."""


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


def load_migrations() -> list[Migration]:
    """The migration files shipped in the package, by version (1, 2, ... without gaps)."""
    folder = resources.files("agentworker.db").joinpath("migrations")
    found: list[Migration] = []
    for entry in folder.iterdir():
        match = _FILE_RE.match(entry.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(f"migration {migration.label}: expected version {expected:04d} (no gaps or repeats)")
    return found


def load_checkpoint_rls() -> str:
    """Our SQL for LangGraph's checkpoint tables (see the module's docstring)."""
    return resources.files("agentworker.db").joinpath("migrations", CHECKPOINT_RLS_FILE).read_text(encoding="utf-8")


def checkpointer_installed() -> bool:
    """Whether LangGraph's PostgreSQL checkpointer can be imported (so its tables are wanted)."""
    try:
        return importlib.util.find_spec("langgraph.checkpoint.postgres.aio") is not None
    except ImportError:  # a parent package is missing
        return False


@dataclass(frozen=True, slots=True)
class MigrationReport:
    applied: list[str]
    already_applied: int
    #: LangGraph's checkpoint tables were set up (and put under RLS)
    checkpoint_tables: bool = False


async def migrate(url: str, *, checkpoints: bool = True,
                  migrations: Sequence[Migration] | None = None) -> MigrationReport:
    """Apply the pending migrations to the database at ``url``, then (unless ``checkpoints=False``, or
    LangGraph's checkpointer is not installed) set up LangGraph's checkpoint tables; return what was done.
    ``migrations`` replaces the shipped files (tests)."""
    todo = list(migrations) if migrations is not None else load_migrations()
    shown = redact_url(url)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except Exception as exc:
        if is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError):
            raise MigrationError(f"cannot connect to PostgreSQL at {shown}: {exc}") from None
        raise
    try:
        await _lock(conn)
        try:
            report = await _apply(conn, todo)
            if checkpoints and checkpointer_installed():
                await _setup_checkpoint_tables(url)
                await _apply_checkpoint_rls(conn)
                report = replace(report, checkpoint_tables=True)
            return report
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"migrating {shown} failed: {type(exc).__name__}: {exc}") from None
    finally:
        await conn.close()


async def _lock(conn: asyncpg.Connection) -> None:
    # Tries, not one pg_advisory_lock: a migrator waiting inside that statement keeps a snapshot open, and
    # LangGraph's setup in the migrator holding the lock (CREATE INDEX CONCURRENTLY) waits for every older
    # snapshot of the database to end: the two would wait for each other forever. Between tries, none.
    while True:
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", MIGRATION_LOCK_KEY):
            return
        await asyncio.sleep(_LOCK_RETRY_S)  # another migrator holds it (asyncpg has no lock notification)


async def _setup_checkpoint_tables(url: str) -> None:
    """LangGraph's own setup of its tables, in our schema, as the migrating user."""
    import psycopg
    from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
    from psycopg.rows import dict_row

    try:
        # What the saver needs (as in agentworker.graphs.checkpoints): autocommit for its CREATE INDEX
        # CONCURRENTLY, dict rows, and our schema first in the search path so its tables land there.
        async with await psycopg.AsyncConnection.connect(
                url, autocommit=True, prepare_threshold=0, row_factory=dict_row,
                options=f"-c search_path={SCHEMA}") as conn:
            await AsyncPostgresSaver(conn).setup()
    except psycopg.Error as exc:
        raise MigrationError(f"setting up LangGraph's checkpoint tables failed: {type(exc).__name__}: {exc}") from None


async def _apply_checkpoint_rls(conn: asyncpg.Connection) -> None:
    try:
        async with conn.transaction():
            await conn.execute(load_checkpoint_rls())
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"{CHECKPOINT_RLS_FILE} failed: {type(exc).__name__}: {exc}") from None


async def _apply(conn: asyncpg.Connection, todo: list[Migration]) -> MigrationReport:
    await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    await conn.execute(f"""
        CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_migrations (
            version     integer PRIMARY KEY,
            name        text NOT NULL,
            checksum    text NOT NULL,
            applied_at  timestamptz NOT NULL DEFAULT now()
        )""")
    rows = await conn.fetch(f"SELECT version, name, checksum FROM {SCHEMA}.schema_migrations")
    applied = {row["version"]: row for row in rows}
    known = {m.version: m for m in todo}
    for version, row in sorted(applied.items()):
        migration = known.get(version)
        if migration is None:
            raise MigrationError(f"the database has migration {version:04d}_{row['name']} that this version of "
                                 "agentworker does not know; upgrade agentworker")
        if row["checksum"] != migration.checksum:
            raise MigrationError(f"migration {migration.label} was changed after it was applied; "
                                 "add a new migration instead of editing an applied one")
    done: list[str] = []
    for migration in todo:
        if migration.version in applied:
            continue
        try:
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(f"INSERT INTO {SCHEMA}.schema_migrations (version, name, checksum) "
                                   "VALUES ($1, $2, $3)", migration.version, migration.name, migration.checksum)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"migration {migration.label} failed: {type(exc).__name__}: {exc}") from None
        done.append(migration.label)
    return MigrationReport(applied=done, already_applied=len(applied))
