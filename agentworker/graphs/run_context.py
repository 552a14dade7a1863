"""One job's view of one workflow run: the tenant's scope and the run's ids."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agentworker.db.database import Database, TenantTransaction
from agentworker.events import stable_event_id
from agentworker.logs import Logger
from agentworker.tools.registry import ToolContext
from agentworker.tools.scope import TenantScope


@dataclass(frozen=True, slots=True)
class RunContext:
    """What the graph's nodes and the step kinds act with: the tenant's :class:`TenantScope` (its logger
    bound to the run) and which run, of which workflow, this job drives."""

    scope: TenantScope
    workflow_id: str
    run_id: str
    job_id: str
    #: raises :class:`~agentworker.jobs.JobCancelled` when the job's cancel was requested: called before
    #: each step starts, so no step starts after a cancel (None: never cancelled, e.g. in tests)
    check_cancelled: Callable[[], Awaitable[None]] | None = None

    @property
    def tenant_id(self) -> str:
        return self.scope.tenant_id

    @property
    def database(self) -> Database:
        return self.scope.database

    @property
    def log(self) -> Logger:
        return self.scope.log

    def tool_context(self, step_id: str, call_key: str) -> ToolContext:
        """What a tool called by ``step_id`` sees (its idempotency key: this run, step and call)."""
        return self.scope.tool_context(self.run_id, step_id, call_key=call_key)

    async def promise(self, tx: TenantTransaction, event: str, data: dict[str, Any], *key: object) -> None:
        """Record ``event`` in ``tx`` and publish it after the commit (:mod:`agentworker.event_outbox`);
        ``key`` (step id, attempt) and the event name make its id within the run."""
        if self.scope.outbox is None:
            raise RuntimeError("a workflow run's events need the event outbox (TenantScope.outbox)")
        await self.scope.outbox.promise(tx, event, data, stable_event_id(self.tenant_id, "workflow", self.run_id,
                                                                         event, *key))

    def event(self, step_id: str | None, status: str, output: Any = None, **extra: Any) -> dict[str, Any]:
        """The data of a workflow event, in the seed's ``workflow_step_completed`` shape."""
        return {"workflow_id": self.workflow_id, "run_id": self.run_id, "step_id": step_id, "status": status,
                "output": output, **extra}
