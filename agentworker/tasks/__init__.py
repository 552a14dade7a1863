"""ARQ tasks: the registry, the job envelope every task runs in, and the tasks themselves."""

from agentworker.tasks.context import JobContext
from agentworker.tasks.registry import REGISTRY, Task, TaskRegistry, task

__all__ = ["REGISTRY", "JobContext", "Task", "TaskRegistry", "task"]
