"""The email outbox: the state of each send, so a retried send never transmits a message twice.

``prepared`` (recorded and committed before the SMTP conversation), ``sending`` (committed right before
the message data goes out), ``sent`` (the server accepted it). See :mod:`agentworker.tools.email`.
"""

from __future__ import annotations

from dataclasses import dataclass

from agentworker.db.database import SCHEMA, TenantTransaction


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    idempotency_key: str
    message_id: str
    status: str
    attempts: int


async def prepare(tx: TenantTransaction, idempotency_key: str, message_id: str, recipients: list[str],
                  subject: str) -> OutboxEntry:
    """The entry of this send (created ``prepared`` on first use), its attempts counted."""
    row = await tx.fetchrow(
        f"INSERT INTO {SCHEMA}.email_outbox (tenant_id, idempotency_key, message_id, status, recipients, subject, "
        "attempts) VALUES ($1, $2, $3, 'prepared', $4, $5, 1) ON CONFLICT (tenant_id, idempotency_key) "
        "DO UPDATE SET attempts = email_outbox.attempts + 1, updated_at = now() "
        "RETURNING idempotency_key, message_id, status, attempts",
        tx.tenant_id, idempotency_key, message_id, recipients, subject)
    assert row is not None
    return OutboxEntry(idempotency_key=row["idempotency_key"], message_id=row["message_id"], status=row["status"],
                       attempts=row["attempts"])


async def set_status(tx: TenantTransaction, idempotency_key: str, status: str) -> None:
    await tx.execute(f"UPDATE {SCHEMA}.email_outbox SET status = $2, updated_at = now() WHERE idempotency_key = $1",
                     idempotency_key, status)


async def get_entry(tx: TenantTransaction, idempotency_key: str) -> OutboxEntry | None:
    row = await tx.fetchrow(f"SELECT idempotency_key, message_id, status, attempts FROM {SCHEMA}.email_outbox "
                            "WHERE idempotency_key = $1", idempotency_key)
    if row is None:
        return None
    return OutboxEntry(idempotency_key=row["idempotency_key"], message_id=row["message_id"], status=row["status"],
                       attempts=row["attempts"])
