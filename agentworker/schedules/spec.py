"""What a tenant saves as a schedule: when it fires, and what runs then.

.. code-block:: python

    {"id": "nightly-sync", "cron": "0 2 * * *", "timezone": "Europe/Paris",
     "task": "sync_accounts", "payload": {"full": True}}                    # a task
    {"id": "morning", "cron": "0 8 * * mon-fri", "workflow_id": "digest",
     "input": {"day": "{{ due_at }}"}}                                     # a workflow
    {"id": "orders", "cron": "*/5 * * * *",
     "poll": {"url": "https://shop.example.com/api/orders", "workflow_id": "new-order"}}  # a polling source

Exactly one of ``task``, ``workflow_id`` and ``poll``. A payload or input value that is exactly the
string ``{{ due_at }}`` is replaced, when the run is dispatched, by its due time (ISO 8601, UTC).
Errors are one :class:`InvalidSchedule` naming each bad key, never a secret's value. A schedule may also
be given as YAML or JSON text, read with the safe loader; text or dict, it is held to the input limits
(``AGENTWORKER_MAX_DEFINITION_BYTES``, ``AGENTWORKER_MAX_YAML_DEPTH``, ``AGENTWORKER_MAX_YAML_ALIASES``).
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

from agentworker.errors import AgentWorkerError
from agentworker.integrations import HttpUrl, describe_errors
from agentworker.jobs import TASK_NAME_RE
from agentworker.safe_yaml import DocumentRefused, check_value, load_yaml, one_line
from agentworker.schedules.cron import CronSchedule, InvalidCron, parse_cron
from agentworker.settings import InputLimits
from agentworker.workflows.definition import WORKFLOW_ID_PATTERN

if TYPE_CHECKING:
    from agentworker.db.schedules import ScheduleRow

SCHEDULE_ID_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,62}$"
DUE_AT_PLACEHOLDER = "{{ due_at }}"
#: largest payload or input saved with a schedule (the job's own limit still applies at dispatch)
MAX_PAYLOAD_BYTES = 65_536

Kind = Literal["task", "workflow", "poll"]


class InvalidSchedule(AgentWorkerError, ValueError):
    """A schedule that cannot be saved; the message names each bad key and what is wrong with it, all
    at once (``errors``: one line per problem)."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        self.errors = errors if errors is not None else [message]
        super().__init__(message)


def _task_name(value: str) -> str:
    if not TASK_NAME_RE.fullmatch(value):
        raise ValueError("not a task name (lowercase letters, digits, '_' and '.')")
    return value


def _workflow_id(value: str) -> str:
    if not re.fullmatch(WORKFLOW_ID_PATTERN, value):
        raise ValueError("not a workflow id (1-128 letters, digits, '_', '.' or '-')")
    return value


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    try:
        encoded = json.dumps(value)
    except (TypeError, ValueError):
        raise ValueError("must be JSON") from None
    if len(encoded) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"is {len(encoded)} bytes of JSON, over {MAX_PAYLOAD_BYTES}")
    return value


TaskName = Annotated[str, AfterValidator(_task_name)]
WorkflowId = Annotated[str, AfterValidator(_workflow_id)]
JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]


class PollSource(BaseModel):
    """An HTTP source polled at each due time; each new item starts ``workflow_id`` once.

    The contract: ``GET url`` (plus ``cursor=<cursor>`` once one is known) answers 200 with
    ``{"items": [{"id": ...}, ...], "next_cursor": "..." | null}``; see :mod:`agentworker.schedules.sources`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    url: HttpUrl
    workflow_id: WorkflowId
    #: sent with every request (e.g. ``Authorization``); secrets, masked when shown
    headers: dict[str, SecretStr] = Field(default_factory=dict, max_length=20)
    timeout: float = Field(default=15.0, gt=0, le=60)
    #: pages read per poll at most; the cursor carries on from there at the next due time
    max_pages: int = Field(default=10, ge=1, le=100)
    #: after a failed poll nothing is dispatched for this long, doubling per failure up to the maximum
    backoff_initial_seconds: float = Field(default=30.0, ge=1, le=86_400)
    backoff_max_seconds: float = Field(default=3600.0, ge=1, le=7 * 86_400)

    @model_validator(mode="after")
    def _backoff_order(self) -> PollSource:
        if self.backoff_max_seconds < self.backoff_initial_seconds:
            raise ValueError("backoff_max_seconds must be >= backoff_initial_seconds")
        return self


class ScheduleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=SCHEDULE_ID_PATTERN)
    cron: str = Field(min_length=1, max_length=200)
    #: IANA time zone of the cron expression's wall clock
    timezone: str = Field(default="UTC", min_length=1, max_length=64)
    description: str | None = Field(default=None, max_length=500)
    task: TaskName | None = None
    payload: JsonObject | None = None
    workflow_id: WorkflowId | None = None
    input: JsonObject | None = None
    poll: PollSource | None = None
    enabled: bool = True
    #: what a dispatcher does with due times it finds more than misfire_grace_seconds late
    missed_policy: Literal["skip", "run_once"] = "skip"
    misfire_grace_seconds: int = Field(default=60, ge=1, le=86_400)

    @model_validator(mode="after")
    def _one_target(self) -> ScheduleSpec:
        problems = _target_problems({name: getattr(self, name) for name in ("task", "workflow_id", "poll",
                                                                             "payload", "input")})
        if problems:
            raise ValueError(problems[0])
        return self

    @property
    def kind(self) -> Kind:
        if self.poll is not None:
            return "poll"
        return "workflow" if self.workflow_id is not None else "task"

    def cron_schedule(self) -> CronSchedule:
        return parse_cron(self.cron, self.timezone)

    def stored(self) -> dict[str, Any]:
        """The JSON kept in the database (secrets revealed: the table is the secret store)."""
        data = self.model_dump(mode="python", exclude_none=True)
        if self.poll is not None:
            data["poll"]["headers"] = {k: v.get_secret_value() for k, v in self.poll.headers.items()}
        return data

    def masked(self) -> dict[str, Any]:
        """The JSON shown to people: poll header values replaced by ``***``."""
        data = self.model_dump(mode="json", exclude_none=True)
        if self.poll is not None:
            data["poll"]["headers"] = {k: "***" for k in self.poll.headers}
        return data


def parse_schedule(spec: Any, *, limits: InputLimits | None = None) -> ScheduleSpec:
    """Validate a schedule (a dict, YAML or JSON text, or a :class:`ScheduleSpec`), its cron expression
    and time zone. ``limits``: default ``AGENTWORKER_MAX_*`` from the environment."""
    limits = limits or InputLimits.from_env()
    if isinstance(spec, ScheduleSpec):
        spec = spec.stored()
    try:
        if isinstance(spec, str | bytes):
            spec = load_yaml(spec, what="the schedule", limits=limits, size_limit="max_definition_bytes")
        check_value(spec, what="the schedule", limits=limits, size_limit="max_definition_bytes")
    except DocumentRefused as exc:
        raise InvalidSchedule(f"invalid schedule: {exc}") from None
    except yaml.YAMLError as exc:
        raise InvalidSchedule(f"invalid schedule: not valid YAML or JSON: {one_line(exc)}") from None
    if not isinstance(spec, dict):
        raise InvalidSchedule(f"a schedule must be an object, got {type(spec).__name__}")
    name = spec.get("id") if isinstance(spec.get("id"), str) else "(no id)"
    problems: list[str] = []
    parsed: ScheduleSpec | None = None
    try:
        parsed = ScheduleSpec.model_validate(spec)
    except ValidationError as exc:
        problems += [p for p in describe_errors(exc).replace("(root): ", "").replace("Value error, ", "").split("; ")
                     if p]
    # The cron expression and the target are checked on the raw document too, so their problems come
    # in the same report as the schema's.
    cron, zone = spec.get("cron"), spec.get("timezone", "UTC")
    if isinstance(cron, str) and cron and isinstance(zone, str) and zone:
        try:
            parse_cron(cron, zone)
        except InvalidCron as exc:
            problems.append(str(exc))
    if parsed is None:
        for problem in _target_problems(spec):
            if problem not in problems and not any(problem in p for p in problems):
                problems.append(problem)
    if problems or parsed is None:
        raise InvalidSchedule(f"invalid schedule {name!r}: {'; '.join(problems) or 'invalid'}", problems)
    return parsed


def _target_problems(spec: dict[str, Any]) -> list[str]:
    """The target rules (one of task, workflow_id, poll; payload and input with theirs), on a raw document or
    on a parsed schedule's fields (:meth:`ScheduleSpec._one_target`): every problem, in order."""
    problems = []
    targets = [name for name in ("task", "workflow_id", "poll") if spec.get(name) is not None]
    if len(targets) != 1:
        problems.append("give exactly one of task, workflow_id or poll"
                        + (f" (got {', '.join(targets)})" if targets else ""))
    if spec.get("payload") is not None and spec.get("task") is None:
        problems.append("payload goes with task (a workflow takes input)")
    if spec.get("input") is not None and spec.get("workflow_id") is None:
        problems.append("input goes with workflow_id (a task takes payload)")
    if isinstance(spec.get("payload"), dict) and "tenant_id" in spec["payload"]:
        problems.append("payload must not set tenant_id: it is the schedule's tenant")
    return problems


def fill_due_at(values: dict[str, Any], due_at: str) -> dict[str, Any]:
    """``values`` with every top-level value equal to ``{{ due_at }}`` replaced by ``due_at``."""
    return {k: due_at if v == DUE_AT_PLACEHOLDER else v for k, v in values.items()}


def schedule_view(row: ScheduleRow) -> dict[str, Any]:
    """A stored schedule as the client shows it: the spec with secrets masked, and its state."""

    def iso(value: datetime | None) -> str | None:
        return None if value is None else value.isoformat()

    return {
        "id": row.schedule_id, "kind": row.kind, "enabled": row.enabled,
        "spec": ScheduleSpec.model_validate(row.spec).masked(),
        "next_due_at": iso(row.next_due_at), "last_due_at": iso(row.last_due_at), "last_job_id": row.last_job_id,
        "dispatched_count": row.dispatched_count, "missed_count": row.missed_count,
        "failures": row.failures, "last_error": row.last_error, "backoff_until": iso(row.backoff_until),
        "poll_cursor": row.poll_state.get("cursor"),
        "created_at": iso(row.created_at), "updated_at": iso(row.updated_at),
    }
