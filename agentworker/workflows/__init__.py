"""Workflow definitions: the format tenants write, validated before it is saved.

Light on purpose (pydantic and PyYAML only): the client imports it to validate at save time. Running a
definition is :mod:`agentworker.graphs.workflow_agent`'s job.
"""

from agentworker.workflows.definition import (
    STEP_KINDS,
    InvalidWorkflow,
    Step,
    WorkflowDefinition,
    parse_workflow,
)

__all__ = ["STEP_KINDS", "InvalidWorkflow", "Step", "WorkflowDefinition", "parse_workflow"]
