"""The private PostgreSQL of the tests that restart or break it: ``bench/postgres_server.py``'s, skipping
the test when this machine cannot run one (no initdb/pg_ctl, or root without a ``postgres`` user)."""

from __future__ import annotations

import pytest

from bench.postgres_server import PostgresUnavailable, create_migrated_database, migrated_database, postgres_bin_dir
from bench.postgres_server import PrivatePostgres as _BenchPostgres

__all__ = ["PrivatePostgres", "create_migrated_database", "migrated_database", "postgres_bin_dir"]


class PrivatePostgres(_BenchPostgres):
    """:class:`bench.postgres_server.PrivatePostgres`, or a skip of the test that wanted it."""

    def __init__(self) -> None:
        try:
            super().__init__(prefix="aw-test-pg-")
        except PostgresUnavailable as exc:
            pytest.skip(str(exc))
