"""The workflow ids a tenant has defined (what the message router may send a message to)."""

from __future__ import annotations

from agentworker.db.database import SCHEMA, TenantTransaction


async def list_workflow_ids(tx: TenantTransaction, limit: int = 200) -> list[str]:
    rows = await tx.fetch(f"SELECT DISTINCT workflow_id FROM {SCHEMA}.workflow_definitions "
                          "ORDER BY workflow_id LIMIT $1", limit)
    return [row["workflow_id"] for row in rows]
