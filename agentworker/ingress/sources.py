"""The webhook sources' settings (signing secret, headers, workflow), read from PostgreSQL and cached.

A source is a tenant integration of kind ``webhook`` (:class:`~agentworker.integrations.WebhookSettings`),
read in the tenant's own transaction, so row-level security applies as everywhere else.

**Cache.** Each answer — a source's settings, or that there is no such source — is kept
:data:`SOURCE_TTL_S` seconds: a burst of deliveries costs one query, and so does a flood of calls to a
made-up source (negative answers are cached too). A rotated secret or a new source therefore applies
within that many seconds. At most :data:`MAX_SOURCES` answers are kept, least recently used first out.
Errors (PostgreSQL down) are never cached.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from pydantic import ValidationError

from agentworker.db import Database
from agentworker.errors import AgentWorkerError
from agentworker.integrations import WebhookSettings
from agentworker.schedules.webhooks import read_source

#: seconds one answer is kept
SOURCE_TTL_S = 5.0
#: answers kept at once
MAX_SOURCES = 10_000


class SourceUnusable(AgentWorkerError):
    """The stored settings of a source do not validate (saved by an older version, or edited by hand)."""


class SourceDirectory:
    """``await get(database, tenant_id, source)``: the source's settings, or None when the tenant has no
    such source."""

    def __init__(self, *, ttl: float = SOURCE_TTL_S, max_entries: int = MAX_SOURCES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, WebhookSettings | None]] = OrderedDict()

    async def get(self, database: Database, tenant_id: str, source: str) -> WebhookSettings | None:
        """Raises :class:`~agentworker.db.DatabaseError` (and asyncpg's errors) when PostgreSQL cannot
        answer, :class:`SourceUnusable` when the stored settings do not validate."""
        key = (tenant_id, source)
        cached = self._cache.get(key)
        if cached is not None and cached[0] > self._clock():
            self._cache.move_to_end(key)
            return cached[1]
        try:
            settings = await read_source(database, tenant_id, source)
        except ValidationError:  # never shown: the stored document holds the secret
            raise SourceUnusable(f"the stored settings of webhook source {source!r} do not validate; "
                                 "save them again") from None
        self._cache[key] = (self._clock() + self.ttl, settings)
        self._cache.move_to_end(key)
        while len(self._cache) > self.max_entries:
            self._cache.popitem(last=False)
        return settings

    def __len__(self) -> int:
        return len(self._cache)
