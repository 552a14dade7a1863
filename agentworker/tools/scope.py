"""One tenant's services for one job: the one object graphs, agents and tools are handed.

A :class:`TenantScope` carries what every piece of a job that acts for a tenant needs — the tenant, its
database (row-level security by tenant), how to publish its events (best effort, and the outbox for
promised ones), the job's bound logger, and the agents' checkpoints — and is the one place a
:class:`~agentworker.tools.registry.ToolContext` (the tool author's API) is made. The job builds it
(:meth:`agentworker.tasks.context.JobContext.scope`); workflow steps add their run's ids
(:class:`agentworker.graphs.run_context.RunContext`), agents pass it on to their toolset.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol

from agentworker.db.database import Database
from agentworker.db.ledger import Ledger, effect_key
from agentworker.logs import Logger
from agentworker.tools.registry import EmitFunction, ToolContext

if TYPE_CHECKING:
    from agentworker.event_outbox import EventOutbox
    from agentworker.llm_budget import LlmBudget


class Checkpoints(Protocol):
    """What the agents use of :class:`agentworker.graphs.checkpoints.CheckpointStore` (named here as a
    protocol so tools/ does not depend on graphs/, even for types)."""

    def saver(self, tenant_id: str, thread: str) -> AbstractAsyncContextManager[Any]: ...


@dataclass(frozen=True, slots=True)
class TenantScope:
    """What a job's code may touch of one tenant."""

    tenant_id: str
    database: Database
    #: publish an event on the tenant's channel and stream, best effort (a Redis error is logged)
    emit: EmitFunction
    log: Logger
    #: promised events (recorded with the change they report, published after the commit); None: best effort
    outbox: EventOutbox | None = None
    #: the agents' LangGraph checkpoints; None where the job keeps no agent state
    checkpoints: Checkpoints | None = None
    #: the tenant's LLM budget (tokens, calls in flight), attached to every model the job makes; None: none
    llm_budget: LlmBudget | None = None

    @property
    def ledger(self) -> Ledger:
        """The side-effect ledger of the tenant's database."""
        return Ledger(self.database)

    def bind(self, **values: Any) -> TenantScope:
        """The same scope, its logger bound to ``values`` as well (e.g. ``run_id``)."""
        return replace(self, log=self.log.bind(**values))

    def tool_context(self, run_id: str, step_id: str, *, call_key: str | None = None,
                     idempotency_key: str | None = None) -> ToolContext:
        """What one tool call sees. Its idempotency key is ``idempotency_key`` (the ledger's, inside an
        effect), else the stable key of ``call_key`` in this run and step."""
        if idempotency_key is None:
            if call_key is None:
                raise ValueError("a tool context needs a call_key or an idempotency_key")
            idempotency_key = effect_key(self.tenant_id, run_id, step_id, call_key)
        return ToolContext(tenant_id=self.tenant_id, run_id=run_id, step_id=step_id, idempotency_key=idempotency_key,
                           log=self.log, emit=self.emit, database=self.database, outbox=self.outbox)
