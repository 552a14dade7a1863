"""The side-effect ledger: each effect done once per (tenant, run, step, call).

.. code-block:: python

    ledger = Ledger(database)

    async def send(idempotency_key: str) -> dict:
        return await smtp_send(message, headers={"Idempotency-Key": idempotency_key})

    receipt = await ledger.run_once(tenant_id, run_id, step_id, "send_email:0", send)

The first call runs ``effect`` and stores its (JSON) result; every later call with the same four keys
returns the stored result without running it. ``effect`` runs inside the tenant's transaction, under a
transaction-level advisory lock on those keys, and its result is recorded in the same transaction: two
concurrent callers cannot both run it, and an effect that raises records nothing (it may run again).

One window remains, as with any ledger next to an external system: a process killed after the effect
happened and before the commit runs it again on retry. ``effect`` therefore gets a stable
``idempotency_key`` (the same on every try) to hand to the external system (an ``Idempotency-Key``
header, a message id) so that system can drop the repeat.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
from collections.abc import Awaitable, Callable
from typing import Any

from agentworker.db.database import SCHEMA, Database, TenantTransaction

Effect = Callable[[str], Awaitable[Any]]

_effect_transaction: contextvars.ContextVar[TenantTransaction | None] = contextvars.ContextVar(
    "agentworker_effect_transaction", default=None)


def effect_transaction() -> TenantTransaction | None:
    """The transaction of the effect running now (inside :meth:`Ledger.run_once`), else None: what an
    effect records in it commits if and only if the effect is recorded as done."""
    return _effect_transaction.get()


def effect_key(tenant_id: str, run_id: str, step_id: str, call_key: str) -> str:
    """The stable idempotency key of one effect: 32 hex characters."""
    raw = "\x1f".join((tenant_id, run_id, step_id, call_key))
    return hashlib.sha256(raw.encode()).hexdigest()[:32]


class Ledger:
    def __init__(self, database: Database) -> None:
        self.database = database

    async def run_once(self, tenant_id: str, run_id: str, step_id: str, call_key: str, effect: Effect) -> Any:
        """Run ``effect(idempotency_key)`` unless this call was already recorded; return its result."""
        for name, value in (("run_id", run_id), ("step_id", step_id), ("call_key", call_key)):
            if not isinstance(value, str) or not value or len(value) > 500:
                raise ValueError(f"ledger {name} must be a non-empty string of at most 500 characters, "
                                 f"got {value!r}")
        key = effect_key(tenant_id, run_id, step_id, call_key)
        async with self.database.tenant(tenant_id) as tx:
            await tx.execute("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", key)
            stored = await tx.fetchrow(
                f"SELECT result FROM {SCHEMA}.side_effects WHERE run_id = $1 AND step_id = $2 AND call_key = $3",
                run_id, step_id, call_key)
            if stored is not None:
                return stored["result"]
            token = _effect_transaction.set(tx)
            try:
                result = await effect(key)
            finally:
                _effect_transaction.reset(token)
            try:
                json.dumps(result)
            except (TypeError, ValueError) as exc:
                raise TypeError(f"the result of effect {call_key!r} is not JSON: {exc}") from None
            await tx.execute(
                f"INSERT INTO {SCHEMA}.side_effects (tenant_id, run_id, step_id, call_key, result) "
                "VALUES ($1, $2, $3, $4, $5)", tenant_id, run_id, step_id, call_key, result)
            return result

    async def recorded(self, tenant_id: str, run_id: str, step_id: str, call_key: str) -> tuple[bool, Any]:
        """``(True, result)`` if the call was recorded, else ``(False, None)``."""
        async with self.database.tenant(tenant_id) as tx:
            stored = await tx.fetchrow(
                f"SELECT result FROM {SCHEMA}.side_effects WHERE run_id = $1 AND step_id = $2 AND call_key = $3",
                run_id, step_id, call_key)
        return (False, None) if stored is None else (True, stored["result"])
