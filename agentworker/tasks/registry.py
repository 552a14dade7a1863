"""The tasks a worker can run, by name.

A task is an ``async def`` taking a :class:`~agentworker.tasks.context.JobContext` and the job's payload
as keyword arguments (``tenant_id`` always among them)::

    @task(timeout=60)
    async def echo(ctx: JobContext, tenant_id: str, message: str) -> str:
        return message

Decorating registers the function in :data:`REGISTRY` at import time. Workers import the built-in task
modules and those named in ``AGENTWORKER_TASK_MODULES``.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from agentworker.jobs import REJECT_TASK, RESERVED_PAYLOAD_KEYS, validate_task_name

if TYPE_CHECKING:
    from agentworker.tasks.context import JobContext

TaskFunction = Callable[..., Awaitable[Any]]
#: called once when a job of the task has failed for good (tries used up, timed out, poisoned, rejected),
#: with the job's context, its payload, the reason ('error', 'timeout', 'poisoned', 'tries_exhausted',
#: 'rejected') and the error: the place to end what the job was doing (a workflow run, an agent run)
#: as failed. It must not raise; the worker gives it a few seconds.
FinalFailureHook = Callable[["JobContext", dict[str, Any], str, BaseException], Awaitable[None]]
F = TypeVar("F", bound=TaskFunction)

#: Modules every worker imports for their tasks.
BUILTIN_TASK_MODULES: tuple[str, ...] = ("agentworker.tasks.diagnostic", "agentworker.tasks.workflow_tasks",
                                         "agentworker.tasks.agent_tasks", "agentworker.tasks.scheduled_tasks")


class PayloadError(TypeError):
    """The payload does not fit the task's parameters."""


@dataclass(frozen=True)
class Task:
    name: str
    func: TaskFunction
    #: an upper bound on the job timeout for this task (the pool's and tenant's still apply)
    timeout: float | None = None
    #: exception types that are retried (with backoff, while tries remain) instead of failing the job
    retry_on: tuple[type[BaseException], ...] = ()
    on_final_failure: FinalFailureHook | None = None
    signature: inspect.Signature = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "signature", inspect.signature(self.func))

    def check_payload(self, ctx: JobContext, payload: dict[str, Any]) -> None:
        """Raise :class:`PayloadError` naming what is missing or unexpected."""
        try:
            self.signature.bind(ctx, **payload)
        except TypeError as exc:
            raise PayloadError(f"payload does not fit task {self.name!r}: {exc}") from None


def _check_parameter_names(task_name: str, func: TaskFunction) -> None:
    """A task's payload parameters (all but the first, the context) may not use a name the envelope
    reserves: workers refuse every payload carrying one (:func:`agentworker.jobs.reserved_payload_key`),
    so such a task could never run."""
    for parameter in list(inspect.signature(func).parameters.values())[1:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        name = parameter.name
        if name in RESERVED_PAYLOAD_KEYS or name.startswith("_"):
            raise ValueError(f"task {task_name!r} has a parameter {name!r}, a reserved payload name (ctx, "
                             f"arq_ctx and names starting with '_'); rename it")


class TaskRegistry:
    def __init__(self) -> None:
        self._tasks: dict[str, Task] = {}

    def register(self, func: TaskFunction, *, name: str | None = None, timeout: float | None = None,
                 retry_on: Iterable[type[BaseException]] = (),
                 on_final_failure: FinalFailureHook | None = None) -> Task:
        task_name = validate_task_name(name or func.__name__)
        if task_name == REJECT_TASK:
            raise ValueError(f"{REJECT_TASK!r} is reserved")
        if not inspect.iscoroutinefunction(func):
            raise TypeError(f"task {task_name!r} must be an async function")
        _check_parameter_names(task_name, func)
        existing = self._tasks.get(task_name)
        if existing is not None and existing.func is not func:
            raise ValueError(f"task {task_name!r} is already registered by {existing.func.__module__}")
        task = Task(name=task_name, func=func, timeout=timeout, retry_on=tuple(retry_on),
                    on_final_failure=on_final_failure)
        self._tasks[task_name] = task
        return task

    def get(self, name: str) -> Task | None:
        return self._tasks.get(name)

    def names(self) -> set[str]:
        return set(self._tasks)

    def __iter__(self) -> Any:
        return iter(self._tasks.values())

    def __len__(self) -> int:
        return len(self._tasks)


REGISTRY = TaskRegistry()


def task(name: str | None = None, *, timeout: float | None = None,
         retry_on: Iterable[type[BaseException]] = (),
         on_final_failure: FinalFailureHook | None = None) -> Callable[[F], F]:
    """Register an async function as a task in :data:`REGISTRY`."""

    def decorate(func: F) -> F:
        REGISTRY.register(func, name=name, timeout=timeout, retry_on=retry_on, on_final_failure=on_final_failure)
        return func

    return decorate


def load_task_modules(extra: Iterable[str] = ()) -> TaskRegistry:
    """Import the built-in task modules and ``extra`` ones; return the filled registry."""
    for module in (*BUILTIN_TASK_MODULES, *extra):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ImportError(f"cannot import task module {module!r}: {exc}") from exc
    return REGISTRY
