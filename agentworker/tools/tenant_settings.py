"""How a tool reads its tenant's settings (SMTP, CRM, ...) and database, with clear errors when missing."""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

from agentworker.db import integrations
from agentworker.db.database import Database
from agentworker.integrations import DEFAULT_NAME, describe_errors
from agentworker.tools.registry import ToolContext, ToolNotConfigured

S = TypeVar("S", bound=BaseModel)


def require_database(ctx: ToolContext) -> Database:
    if ctx.database is None:
        raise ToolNotConfigured(f"tool call in step {ctx.step_id!r} has no database to read the tenant's settings "
                                "from (call it from a job of a worker with AGENTWORKER_DATABASE_URL)")
    return ctx.database


async def load_settings(ctx: ToolContext, kind: str, model: type[S], name: str = DEFAULT_NAME) -> S:
    """The tenant's ``kind`` settings; :class:`ToolNotConfigured` when it has none."""
    database = require_database(ctx)
    async with database.tenant(ctx.tenant_id) as tx:
        config = await integrations.get_integration(tx, kind, name)
    if config is None:
        raise ToolNotConfigured(f"tenant {ctx.tenant_id!r} has no {kind} settings; save them first with "
                                f"AgentWorkerClient.save_integration({ctx.tenant_id!r}, {kind!r}, ...)")
    try:
        return model.model_validate(config)
    except ValidationError as exc:
        raise ToolNotConfigured(f"the stored {kind} settings of tenant {ctx.tenant_id!r} are invalid: "
                                f"{describe_errors(exc)}") from None
