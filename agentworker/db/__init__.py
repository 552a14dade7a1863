"""PostgreSQL: the schema and its migrations, tenant-scoped transactions, repositories, the ledger.

Everything that touches tenant rows goes through :meth:`Database.tenant` (see :mod:`.database`), which
opens a transaction as the role ``agentworker_app`` with ``agentworker.tenant_id`` set for that
transaction only; row-level security does the rest. asyncpg only: LangGraph's checkpointer has its own
psycopg pool (``agentworker.graphs.checkpoints``). The whole schema, LangGraph's tables included, is made
by :mod:`.migrate` from the SQL files of ``db/migrations/``.
"""

from agentworker.db.database import (
    APP_ROLE,
    SCHEMA,
    Database,
    DatabaseError,
    DatabaseNotMigrated,
    DatabaseUnavailable,
    LazyDatabase,
    TenantTransaction,
    open_database,
)

__all__ = [
    "APP_ROLE",
    "SCHEMA",
    "Database",
    "DatabaseError",
    "DatabaseNotMigrated",
    "DatabaseUnavailable",
    "LazyDatabase",
    "TenantTransaction",
    "open_database",
]
