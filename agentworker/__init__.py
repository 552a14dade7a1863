"""agentworker: the multi-tenant worker runtime for LangGraph agents and workflows on ARQ and Redis.

.. code-block:: python

    from agentworker import AgentWorkerClient, JobFailed, QuotaExceeded     # the backend
    from agentworker import JobContext, task                                # task authors
    from agentworker import ToolContext, ToolError, tool                    # tool authors
    from agentworker import AgentWorkerError                                # the root of every error

The public API is the names in ``__all__`` here and in these modules: :mod:`agentworker.client` (the
client and what it returns and raises), :mod:`agentworker.tasks` (task authors), :mod:`agentworker.tools`
(tool authors) and :mod:`agentworker.errors` (the error root and the error names on the wire). Every other
module — ``agentworker.db``, ``agentworker.graphs``, ``agentworker.pools``, ``agentworker.supervisor``, the
submodules of ``tasks`` and ``tools``, ... — is internal and may change in any release. The other contracts
(the CLI, the quota file, the job and event formats, HTTP, metrics) are in the README.

Importing this package imports nothing else: the CLI, the zygote and the supervisor import it, and the
supervisor must never load the job side (LangGraph, LangChain, the tasks). Each name below is imported on
first use (PEP 562), from the module named in :data:`_EXPORTS`.
"""

from __future__ import annotations

import importlib

# Not ``from typing import TYPE_CHECKING``: importing typing would cost more than this whole module.
TYPE_CHECKING = False

__version__ = "0.1.0"

__all__ = [
    "AgentWorkerClient",
    "AgentWorkerError",
    "ConfigError",
    "DatabaseError",
    "DatabaseNotMigrated",
    "DatabaseUnavailable",
    "Event",
    "IntegrationError",
    "InvalidJob",
    "InvalidRunId",
    "InvalidSchedule",
    "InvalidTenantId",
    "InvalidWorkflow",
    "JobContext",
    "JobFailed",
    "JobHandle",
    "JobResult",
    "JobStatus",
    "Ledger",
    "QuotaExceeded",
    "ResultTimeout",
    "ScheduleNotFound",
    "SettingsError",
    "ToolContext",
    "ToolError",
    "ToolInputError",
    "ToolNotConfigured",
    "ToolTimeout",
    "UnknownTool",
    "__version__",
    "task",
    "tool",
]

#: exported name -> the module it is imported from on first use
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("AgentWorkerClient", "JobFailed", "JobHandle", "JobResult", "JobStatus", "QuotaExceeded",
                     "ResultTimeout", "ScheduleNotFound"), "agentworker.client"),
    "AgentWorkerError": "agentworker.errors",
    "ConfigError": "agentworker.config",
    **dict.fromkeys(("DatabaseError", "DatabaseNotMigrated", "DatabaseUnavailable"), "agentworker.db.database"),
    "Event": "agentworker.events",
    "IntegrationError": "agentworker.integrations",
    "InvalidJob": "agentworker.jobs",
    "InvalidRunId": "agentworker.db.runs",
    "InvalidSchedule": "agentworker.schedules.spec",
    "InvalidTenantId": "agentworker.routing",
    "InvalidWorkflow": "agentworker.workflows.definition",
    **dict.fromkeys(("JobContext", "task"), "agentworker.tasks"),
    "Ledger": "agentworker.db.ledger",
    "SettingsError": "agentworker.settings",
    **dict.fromkeys(("ToolContext", "ToolError", "ToolInputError", "ToolNotConfigured", "ToolTimeout",
                     "UnknownTool", "tool"), "agentworker.tools"),
}

if TYPE_CHECKING:
    from agentworker.client import (
        AgentWorkerClient,
        JobFailed,
        JobHandle,
        JobResult,
        JobStatus,
        QuotaExceeded,
        ResultTimeout,
        ScheduleNotFound,
    )
    from agentworker.config import ConfigError
    from agentworker.db.database import DatabaseError, DatabaseNotMigrated, DatabaseUnavailable
    from agentworker.db.ledger import Ledger
    from agentworker.db.runs import InvalidRunId
    from agentworker.errors import AgentWorkerError
    from agentworker.events import Event
    from agentworker.integrations import IntegrationError
    from agentworker.jobs import InvalidJob
    from agentworker.routing import InvalidTenantId
    from agentworker.schedules.spec import InvalidSchedule
    from agentworker.settings import SettingsError
    from agentworker.tasks import JobContext, task
    from agentworker.tools import (
        ToolContext,
        ToolError,
        ToolInputError,
        ToolNotConfigured,
        ToolTimeout,
        UnknownTool,
        tool,
    )
    from agentworker.workflows.definition import InvalidWorkflow


def __getattr__(name: str) -> object:
    home = _EXPORTS.get(name)
    if home is None:
        raise AttributeError(f"module 'agentworker' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return list(__all__)
