"""The public surface: what ``agentworker`` exports, and that importing it stays cheap.

Adding or removing an export must change this file (as httpx pins its ``__all__``).
"""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import subprocess
import sys

import pytest

import agentworker

#: exported name -> the public module it also comes from
EXPORTS = {
    "AgentWorkerClient": "agentworker.client",
    "AgentWorkerError": "agentworker.errors",
    "ConfigError": "agentworker.config",
    "DatabaseError": "agentworker.db",
    "DatabaseNotMigrated": "agentworker.db",
    "DatabaseUnavailable": "agentworker.db",
    "Event": "agentworker.events",
    "IntegrationError": "agentworker.integrations",
    "InvalidJob": "agentworker.jobs",
    "InvalidRunId": "agentworker.db.runs",
    "InvalidSchedule": "agentworker.schedules",
    "InvalidTenantId": "agentworker.routing",
    "InvalidWorkflow": "agentworker.workflows",
    "JobContext": "agentworker.tasks",
    "JobFailed": "agentworker.client",
    "JobHandle": "agentworker.client",
    "JobResult": "agentworker.client",
    "JobStatus": "agentworker.client",
    "Ledger": "agentworker.db.ledger",
    "QuotaExceeded": "agentworker.client",
    "ResultTimeout": "agentworker.client",
    "ScheduleNotFound": "agentworker.client",
    "SettingsError": "agentworker.settings",
    "ToolContext": "agentworker.tools",
    "ToolError": "agentworker.tools",
    "ToolInputError": "agentworker.tools",
    "ToolNotConfigured": "agentworker.tools",
    "ToolTimeout": "agentworker.tools",
    "UnknownTool": "agentworker.tools",
    "task": "agentworker.tasks",
    "tool": "agentworker.tools",
}


def test_all_is_pinned() -> None:
    assert agentworker.__all__ == [
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
    assert agentworker.__all__ == sorted(agentworker.__all__)
    assert sorted(EXPORTS) == [name for name in agentworker.__all__ if name != "__version__"]


@pytest.mark.parametrize(("name", "home"), sorted(EXPORTS.items()))
def test_each_export_is_the_object_of_its_home_module(name: str, home: str) -> None:
    assert getattr(agentworker, name) is getattr(importlib.import_module(home), name)


def test_version_is_the_installed_distributions() -> None:
    assert agentworker.__version__ == importlib.metadata.version("agentworker")


def test_the_exported_errors_are_under_the_root() -> None:
    errors = [value for name in agentworker.__all__
              if isinstance(value := getattr(agentworker, name), type) and issubclass(value, BaseException)]
    assert len(errors) >= 20
    assert all(issubclass(error, agentworker.AgentWorkerError) for error in errors)


def test_dir_lists_the_exports_and_unknown_names_fail() -> None:
    assert set(agentworker.__all__) <= set(dir(agentworker))
    with pytest.raises(AttributeError, match="no attribute 'AgentWorkerClinet'"):
        agentworker.AgentWorkerClinet  # noqa: B018
    from agentworker import metrics  # a submodule that is not an export still imports

    assert metrics.__name__ == "agentworker.metrics"


def _imported_by(code: str) -> list[str]:
    """The modules a fresh interpreter has loaded after ``code``, beyond those it starts with."""
    script = f"import sys\nbefore = set(sys.modules)\n{code}\nprint(sorted(set(sys.modules) - before))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    loaded: list[str] = ast.literal_eval(done.stdout.splitlines()[-1])
    return loaded


def test_import_agentworker_imports_nothing_else() -> None:
    """The CLI, the zygote and the supervisor import the package: it must not pull in anything."""
    assert _imported_by("import agentworker") == ["agentworker"]


def test_the_public_surface_never_loads_the_job_side() -> None:
    """Using every export (the client, task and tool authors' names) loads no LangGraph, LangChain or MCP:
    those load on a worker's first agent or workflow job."""
    loaded = _imported_by("import agentworker\nfor name in agentworker.__all__: getattr(agentworker, name)")
    heavy = sorted({name.split(".")[0] for name in loaded} & {"langgraph", "langchain", "langchain_core", "mcp"})
    assert heavy == []
    assert "agentworker.client" in loaded  # the exports were really imported
