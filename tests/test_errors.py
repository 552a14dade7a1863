"""One exception tree, and one list of the error names that cross the wire (agentworker/errors.py).

The classes and the names are found in the code itself — every module of the package is imported and
every job-side ``raise`` and ``{"error": "Name"}`` is read from the source — so a new error or a new
wire name fails here until it joins the tree and the list (and the README's table).
"""

from __future__ import annotations

import ast
import builtins
import importlib
import pkgutil
import re
from pathlib import Path
from types import ModuleType

import pytest

import agentworker
from agentworker.errors import INTERNAL_ERRORS, WIRE_ERRORS, AgentWorkerError

PACKAGE = Path(agentworker.__file__).parent
README = PACKAGE.parent / "README.md"

#: the code jobs run, whose errors end up in a failed job's, run's, step's or agent run's ``error``: the
#: tasks, the graphs and steps they drive, the tools, and what the scheduled tasks call
JOB_SIDE = ("tasks/", "graphs/", "tools/", "schedules/polling.py", "schedules/webhooks.py", "schedules/reports.py")
#: job-side raises of ours that never reach a job: module -> class name -> why
NOT_IN_JOBS = {
    "agentworker.graphs.checkpoints": {"MigrationError": "raised by `agentworker migrate` setting up the "
                                                         "checkpoint tables, never in a job"},
}
ERROR_NAME = re.compile(r"[A-Z][A-Za-z0-9]*\Z")


def _modules() -> list[ModuleType]:
    names = [info.name for info in pkgutil.walk_packages(agentworker.__path__, "agentworker.")
             if not info.name.endswith(".__main__")]
    return [agentworker, *(importlib.import_module(name) for name in names)]


def _exception_classes() -> dict[str, type[BaseException]]:
    """``module.Class`` -> class, for every exception class the package defines."""
    found = {}
    for module in _modules():
        for value in vars(module).values():
            if (isinstance(value, type) and issubclass(value, BaseException)
                    and value.__module__ == module.__name__):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return found


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _sources(prefixes: tuple[str, ...] = ("",)) -> list[tuple[Path, ast.Module]]:
    paths = sorted(p for p in PACKAGE.rglob("*.py")
                   if p.relative_to(PACKAGE).as_posix().startswith(prefixes))
    return [(path, ast.parse(path.read_text(), str(path))) for path in paths]


def _literal_wire_names() -> dict[str, list[str]]:
    """Name -> where, for every ``{"error": "SomeName", ...}`` written in the package."""
    found: dict[str, list[str]] = {}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if not isinstance(node, ast.Dict):
                continue
            for key, value in zip(node.keys, node.values, strict=True):
                if (isinstance(key, ast.Constant) and key.value == "error" and isinstance(value, ast.Constant)
                        and isinstance(value.value, str) and ERROR_NAME.match(value.value)):
                    found.setdefault(value.value, []).append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


def _resolve(module: ModuleType, node: ast.expr) -> object:
    if isinstance(node, ast.Name):
        return vars(module).get(node.id, getattr(builtins, node.id, None))
    if isinstance(node, ast.Attribute):
        owner = _resolve(module, node.value)
        return getattr(owner, node.attr, None)
    return None


def _job_side_raises() -> dict[type[BaseException], list[str]]:
    """Class -> where, for each of our exception classes a job-side module raises by name."""
    found: dict[type[BaseException], list[str]] = {}
    for path, tree in _sources(JOB_SIDE):
        module_name = _module_name(path)
        module = importlib.import_module(module_name)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Raise) or node.exc is None:
                continue
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            cls = _resolve(module, target)
            if not (isinstance(cls, type) and issubclass(cls, BaseException)
                    and cls.__module__.startswith("agentworker.")):
                continue  # a Python built-in, a library's error, or a variable holding an instance
            if cls.__name__ in NOT_IN_JOBS.get(module_name, {}):
                continue
            found.setdefault(cls, []).append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    return found


# -- the tree -------------------------------------------------------------------------------------------


def test_every_public_error_derives_from_agentworker_error() -> None:
    classes = _exception_classes()
    assert len(classes) > 50  # the walk found the package's errors, not an empty list
    outside = sorted(name for name, cls in classes.items()
                     if not issubclass(cls, AgentWorkerError) and name not in INTERNAL_ERRORS)
    assert outside == [], ("derive these from AgentWorkerError (keeping their built-in base), or list them in "
                           f"agentworker.errors.INTERNAL_ERRORS with what they become: {outside}")


def test_internal_errors_are_real_and_stay_outside_the_tree() -> None:
    classes = _exception_classes()
    for name, why in INTERNAL_ERRORS.items():
        assert name in classes, f"INTERNAL_ERRORS names {name}, which the package no longer defines"
        assert not issubclass(classes[name], AgentWorkerError), f"{name} derives from the root now: unlist it"
        assert why.strip()


@pytest.mark.parametrize(("name", "builtin"), [
    ("agentworker.routing.InvalidTenantId", ValueError),
    ("agentworker.jobs.InvalidJob", ValueError),
    ("agentworker.settings.SettingsError", ValueError),
    ("agentworker.workflows.definition.InvalidWorkflow", ValueError),
    ("agentworker.db.runs.InvalidRunId", ValueError),
    ("agentworker.client.ResultTimeout", TimeoutError),
    ("agentworker.client.ScheduleNotFound", LookupError),
    ("agentworker.tools.registry.UnknownTool", LookupError),
    ("agentworker.tools.registry.ToolNotConfigured", ValueError),
    ("agentworker.graphs.agent_middleware.ModelTimeout", TimeoutError),
    ("agentworker.tasks.workflow_tasks.WorkflowRunFailed", RuntimeError),
])
def test_errors_keep_their_builtin_base(name: str, builtin: type[Exception]) -> None:
    """``except ValueError`` (or ``LookupError``, ``TimeoutError``) in users' code keeps catching them."""
    module, _, cls_name = name.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    assert issubclass(cls, AgentWorkerError)
    assert issubclass(cls, builtin)


def test_the_root_catches_a_client_error() -> None:
    from agentworker.routing import validate_tenant_id

    with pytest.raises(AgentWorkerError, match="tenant"):
        validate_tenant_id("Not A Tenant!")


# -- the wire names -------------------------------------------------------------------------------------


def test_literal_error_names_are_listed() -> None:
    literals = _literal_wire_names()
    assert {"RunOrphaned", "RunTimedOut", "JobRejected"} <= set(literals)  # the scan sees them
    missing = {name: where for name, where in literals.items() if name not in WIRE_ERRORS}
    assert missing == {}, f"add these to agentworker.errors.WIRE_ERRORS and the README's table: {missing}"


def test_the_workers_own_failures_are_listed() -> None:
    """What the envelope and the worker fail a job with (the job-failure classes of the envelope)."""
    from agentworker.tasks import envelope

    own = [value.__name__ for value in vars(envelope).values()
           if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == envelope.__name__]
    assert {"JobRejected", "JobTimedOut", "JobPoisoned", "JobTriesExhausted", "JobUnreadable"} <= set(own)
    assert [name for name in own if name not in WIRE_ERRORS] == []


def test_what_builtin_tasks_retry_on_is_listed() -> None:
    """A retried error becomes the job's final error once its tries are used up."""
    from agentworker.tasks.registry import BUILTIN_TASK_MODULES, REGISTRY

    for module in BUILTIN_TASK_MODULES:
        importlib.import_module(module)
    retried = {cls.__name__ for name in REGISTRY.names() if (t := REGISTRY.get(name)) is not None
               for cls in t.retry_on}
    assert "DatabaseUnavailable" in retried
    assert sorted(retried - set(WIRE_ERRORS)) == []


def test_what_the_job_side_raises_is_listed() -> None:
    raised = _job_side_raises()
    names = {cls.__name__ for cls in raised}
    assert {"WorkflowRunFailed", "PermanentStepError", "ToolError", "InvalidAgentInput"} <= names  # scan works
    unlisted = {f"{cls.__module__}.{cls.__qualname__}": where for cls, where in raised.items()
                if cls.__name__ not in WIRE_ERRORS and f"{cls.__module__}.{cls.__qualname__}" not in INTERNAL_ERRORS}
    assert unlisted == {}, ("a job can fail with these: list them in agentworker.errors.WIRE_ERRORS (and the "
                            f"README), or in INTERNAL_ERRORS if they never leave the package: {unlisted}")


def test_every_listed_name_is_produced_somewhere() -> None:
    """No stale entry: each name is one of our error classes, a literal name the code writes, or the Python
    built-in a step's timeout reports."""
    ours = {cls.__name__ for cls in _exception_classes().values() if issubclass(cls, AgentWorkerError)}
    literals = set(_literal_wire_names())
    builtin_errors = {name for name, value in vars(builtins).items()
                      if isinstance(value, type) and issubclass(value, BaseException)}
    stale = sorted(set(WIRE_ERRORS) - ours - literals - builtin_errors)
    assert stale == []
    for name, meaning in WIRE_ERRORS.items():
        assert meaning.endswith(".") and "|" not in meaning and "\n" not in meaning, name


# -- the README -----------------------------------------------------------------------------------------


def _readme_table() -> list[tuple[str, str]]:
    text = README.read_text()
    match = re.search(r"^## Errors\n(.*?)(?=^## )", text, re.MULTILINE | re.DOTALL)
    assert match is not None, "README.md has no '## Errors' section"
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|$", match.group(1), re.MULTILINE)
    return [(name, meaning) for name, meaning in rows]


def test_readme_table_is_wire_errors() -> None:
    expected = "\n".join(f"| `{name}` | {meaning} |" for name, meaning in WIRE_ERRORS.items())
    assert _readme_table() == list(WIRE_ERRORS.items()), f"the README's table should read:\n{expected}"
