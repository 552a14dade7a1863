"""Tenant integrations (SMTP, CRM, MCP servers, chat model): one JSON row per (tenant, kind, name).

Validation is :mod:`agentworker.integrations`' job; this module stores and reads what it is given, in
the tenant's own transaction (row-level security keeps every other tenant's rows out of sight).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from agentworker.db.database import SCHEMA, TenantTransaction


@dataclass(frozen=True, slots=True)
class StoredIntegration:
    kind: str
    name: str
    config: dict[str, Any]
    updated_at: datetime


async def save_integration(tx: TenantTransaction, kind: str, name: str, config: dict[str, Any]) -> None:
    await tx.execute(
        f"INSERT INTO {SCHEMA}.tenant_integrations (tenant_id, kind, name, config) VALUES ($1, $2, $3, $4) "
        "ON CONFLICT (tenant_id, kind, name) DO UPDATE SET config = EXCLUDED.config, updated_at = now()",
        tx.tenant_id, kind, name, config)


async def get_integration(tx: TenantTransaction, kind: str, name: str) -> dict[str, Any] | None:
    config: dict[str, Any] | None = await tx.fetchval(
        f"SELECT config FROM {SCHEMA}.tenant_integrations WHERE kind = $1 AND name = $2", kind, name)
    return config


async def list_integrations(tx: TenantTransaction, kind: str | None = None) -> list[StoredIntegration]:
    rows = await tx.fetch(
        f"SELECT kind, name, config, updated_at FROM {SCHEMA}.tenant_integrations "
        "WHERE ($1::text IS NULL OR kind = $1) ORDER BY kind, name", kind)
    return [StoredIntegration(kind=r["kind"], name=r["name"], config=r["config"], updated_at=r["updated_at"])
            for r in rows]


async def delete_integration(tx: TenantTransaction, kind: str, name: str) -> bool:
    status = await tx.execute(f"DELETE FROM {SCHEMA}.tenant_integrations WHERE kind = $1 AND name = $2",
                              kind, name)
    return status.endswith(" 1")
