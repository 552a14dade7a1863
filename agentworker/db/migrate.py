"""Versioned SQL migrations: ``agentworker/db/migrations/NNNN_name.sql``, applied in order.

``agentworker migrate`` runs :func:`migrate`: under a PostgreSQL advisory lock (two migrators never race),
it applies each file not yet recorded in ``agentworker.schema_migrations``, each in its own transaction
together with its record, so a failed file leaves nothing behind and running again is a no-op. A file
changed after it was applied (its checksum differs) is refused: write a new migration instead.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources

import asyncpg

from agentworker.db.database import SCHEMA, is_connection_error
from agentworker.db.urls import redact_url

#: pg_advisory_lock key held while migrating ("agentwkr" in ASCII).
MIGRATION_LOCK_KEY = 0x6167656E74776B72
_FILE_RE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")

#: Run after the SQL files, still under the lock, with the database URL (e.g. the checkpointer's setup).
AfterMigrate = Callable[[str], Awaitable[None]]


class MigrationError(Exception):
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


@dataclass(frozen=True, slots=True)
class MigrationReport:
    applied: list[str]
    already_applied: int


async def migrate(url: str, *, after: Sequence[AfterMigrate] = (),
                  migrations: Sequence[Migration] | None = None) -> MigrationReport:
    """Apply the pending migrations to the database at ``url``; return what was done."""
    todo = list(migrations) if migrations is not None else load_migrations()
    shown = redact_url(url)
    try:
        conn = await asyncpg.connect(url, timeout=10)
    except Exception as exc:
        if is_connection_error(exc) or isinstance(exc, asyncpg.PostgresError):
            raise MigrationError(f"cannot connect to PostgreSQL at {shown}: {exc}") from None
        raise
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
        try:
            report = await _apply(conn, todo)
            for step in after:
                await step(url)
            return report
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    except asyncpg.PostgresError as exc:
        raise MigrationError(f"migrating {shown} failed: {type(exc).__name__}: {exc}") from None
    finally:
        await conn.close()


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
