"""The workflow definition format (JSON or YAML) and its validation.

A definition is refused as a whole, with every problem listed by its path (``steps[2].depends_on[0]``):
unknown keys or kinds, bad values, duplicate step ids, unknown dependencies, cycles, and templates that
are malformed or refer to a step that is unknown or not an ancestor of the step using it.

Before any of that, the input limits (:class:`~agentworker.settings.InputLimits`): the text through the
safe YAML loader (size, aliases, depth: :mod:`agentworker.safe_yaml`), then the parsed document's size
once expanded (``AGENTWORKER_MAX_DEFINITION_BYTES``), its step count (``AGENTWORKER_MAX_DEFINITION_STEPS``)
and each literal prompt (``AGENTWORKER_MAX_PROMPT_BYTES``). A refusal is one sentence naming the limit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from agentworker.errors import AgentWorkerError
from agentworker.safe_yaml import DocumentRefused, check_value, load_yaml, one_line
from agentworker.settings import InputLimits
from agentworker.workflows.templates import TemplateError, references_in

ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,62}$"
WORKFLOW_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"


class InvalidWorkflow(AgentWorkerError, ValueError):
    """A definition that cannot be saved or run; ``errors`` lists each problem with its path."""

    def __init__(self, errors: list[str]) -> None:
        self.errors = errors
        super().__init__(f"invalid workflow definition: {'; '.join(errors)}")


class RetryPolicy(BaseModel):
    """Attempts of a step: after a failure, wait ``backoff_seconds`` × ``backoff_multiplier``^(n-1),
    at most ``max_backoff_seconds``, then try again, ``max_attempts`` times in all."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(default=1, ge=1, le=10)
    backoff_seconds: float = Field(default=1.0, ge=0, le=300)
    backoff_multiplier: float = Field(default=2.0, ge=1, le=10)
    max_backoff_seconds: float = Field(default=60.0, ge=0, le=3600)

    def delay_after(self, attempt: int) -> float:
        return float(min(self.max_backoff_seconds, self.backoff_seconds * self.backoff_multiplier ** (attempt - 1)))


class StepBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: names of the fields whose strings may hold templates
    templated: ClassVar[tuple[str, ...]] = ()

    id: str = Field(pattern=ID_PATTERN)
    kind: str
    description: str | None = None
    depends_on: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list)
    retry: RetryPolicy = RetryPolicy()
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)

    def templated_values(self) -> Iterator[tuple[str, Any]]:
        for name in self.templated:
            yield name, getattr(self, name)


class TransformStep(StepBase):
    """Pure data mapping: the output is ``template`` rendered, or the objects of ``merge`` merged in order."""

    templated = ("template", "merge")
    kind: Literal["transform"]
    template: Any = None
    merge: list[Any] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> TransformStep:
        if (self.template is None) == (self.merge is None):
            raise ValueError("a transform step needs exactly one of template or merge")
        return self


class HttpStep(StepBase):
    """An HTTP request; the output is ``{"status", "headers", "body"}``. POST, PUT, PATCH and DELETE go
    through the side-effect ledger and carry an ``Idempotency-Key`` header."""

    templated = ("url", "headers", "body")
    kind: Literal["http"]
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"] = "GET"
    url: str = Field(min_length=1)
    headers: dict[str, str] = Field(default_factory=dict)
    body: Any = None


class ApprovalStep(StepBase):
    """Pause the run until ``resume_run`` brings a decision; a rejection ends the run as rejected."""

    templated = ("message", "details")
    kind: Literal["approval"]
    message: str = "Approve this step?"
    details: Any = None


class LlmStep(StepBase):
    """A prompt to a chat model; the output is ``{"text", "model"}``."""

    templated = ("prompt", "system")
    kind: Literal["llm"]
    prompt: str = Field(min_length=1)
    system: str | None = None
    #: a LangChain provider string such as ``openai:gpt-4o-mini``; None is the offline model
    model: str | None = None


class ToolStep(StepBase):
    """A call to a registered tool; side-effecting tools go through the ledger."""

    templated = ("args",)
    kind: Literal["tool"]
    tool: str = Field(pattern=r"^[a-z][a-z0-9_.]{0,63}$")
    args: dict[str, Any] = Field(default_factory=dict)


class AgentStep(StepBase):
    """A tool-using agent working on ``instructions`` (run by the tool agent; see graphs.agent_step)."""

    templated = ("instructions",)
    kind: Literal["agent"]
    instructions: str = Field(min_length=1)
    tools: list[str] = Field(default_factory=list)
    model: str | None = None
    max_iterations: int = Field(default=10, ge=1, le=50)


Step = Annotated[TransformStep | HttpStep | ApprovalStep | LlmStep | ToolStep | AgentStep,
                 Field(discriminator="kind")]
STEP_KINDS = ("agent", "approval", "http", "llm", "tool", "transform")
_STEP_MODELS: dict[str, type[StepBase]] = {"agent": AgentStep, "approval": ApprovalStep, "http": HttpStep,
                                           "llm": LlmStep, "tool": ToolStep, "transform": TransformStep}
#: literal texts checked against max_prompt_bytes, by step kind
_PROMPT_FIELDS: dict[str, tuple[str, ...]] = {"llm": ("prompt", "system"), "agent": ("instructions",)}


class WorkflowDefinition(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(pattern=WORKFLOW_ID_PATTERN)
    name: str | None = None
    description: str | None = None
    #: at most AGENTWORKER_MAX_DEFINITION_STEPS, checked by parse_workflow
    steps: list[Step] = Field(min_length=1)
    #: the run's output, templated from the steps' outputs; default: the outputs of the steps that no
    #: other step depends on, by step id
    output: Any = None

    def step(self, step_id: str) -> StepBase:
        for step in self.steps:
            if step.id == step_id:
                return step
        raise KeyError(step_id)

    def ancestors(self, step_id: str) -> set[str]:
        """Every step ``step_id`` depends on, directly or not."""
        deps = {s.id: s.depends_on for s in self.steps}
        seen: set[str] = set()
        todo = list(deps[step_id])
        while todo:
            current = todo.pop()
            if current not in seen:
                seen.add(current)
                todo.extend(deps.get(current, ()))
        return seen

    def sinks(self) -> list[str]:
        """Steps no other step depends on, in definition order."""
        needed = {dep for s in self.steps for dep in s.depends_on}
        return [s.id for s in self.steps if s.id not in needed]

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_defaults=True)


def parse_workflow(source: str | bytes | Mapping[str, Any] | WorkflowDefinition, *,
                   limits: InputLimits | None = None) -> WorkflowDefinition:
    """A validated definition from YAML or JSON text, a mapping, or a definition (checked again).

    ``limits``: default ``AGENTWORKER_MAX_*`` from the environment. Raises :class:`InvalidWorkflow`
    listing every problem found with its path (a broken limit alone: the document is not looked at further).
    """
    limits = limits or InputLimits.from_env()
    if isinstance(source, WorkflowDefinition):
        source = source.model_dump(mode="json")
    try:
        if isinstance(source, str | bytes):
            source = load_yaml(source, what="the workflow definition", limits=limits,
                               size_limit="max_definition_bytes")
        check_value(source, what="the workflow definition", limits=limits, size_limit="max_definition_bytes")
    except DocumentRefused as exc:
        raise InvalidWorkflow([f"(document): {exc}"]) from None
    except yaml.YAMLError as exc:
        raise InvalidWorkflow([f"(document): not valid YAML or JSON: {one_line(exc)}"]) from None
    if not isinstance(source, Mapping):
        raise InvalidWorkflow([f"(document): must be an object with id and steps, got {type(source).__name__}"])
    steps = source.get("steps")
    if isinstance(steps, list) and len(steps) > limits.max_definition_steps:
        problem = f"the workflow definition has {len(steps)} steps"
        raise InvalidWorkflow([f"steps: {limits.refusal('max_definition_steps', problem)}"])
    errors: list[str] = []
    definition: WorkflowDefinition | None = None
    try:
        definition = WorkflowDefinition.model_validate(source)
    except ValidationError as exc:
        errors.extend(_pydantic_errors(exc, source))
    # The graph (ids, dependencies, cycles, templates) and the prompts are checked on the raw document,
    # so their problems are reported together with the schema's, in one pass.
    steps_view = _steps_view(source.get("steps"))
    for error in _prompt_errors(steps_view, limits) + _graph_errors(steps_view, source.get("output")):
        if error not in errors:
            errors.append(error)
    if errors or definition is None:
        raise InvalidWorkflow(errors or ["(document): invalid"])
    return definition


class _StepView:
    """What the graph and prompt checks read of one raw step, whatever else is wrong with it."""

    def __init__(self, index: int, raw: Mapping[str, Any]) -> None:
        self.index = index
        raw_id = raw.get("id")
        self.id = raw_id if isinstance(raw_id, str) else None
        deps = raw.get("depends_on")
        self.depends_on = [(j, d) for j, d in enumerate(deps) if isinstance(d, str)] if isinstance(deps, list) else []
        kind = raw.get("kind")
        model = _STEP_MODELS.get(kind) if isinstance(kind, str) else None
        self.templated = [(name, raw[name]) for name in (model.templated if model else ()) if raw.get(name) is not None]
        self.texts = {name: raw[name] for name in _PROMPT_FIELDS.get(kind if isinstance(kind, str) else "", ())
                      if isinstance(raw.get(name), str)}


def _steps_view(steps: Any) -> list[_StepView]:
    if not isinstance(steps, list):
        return []
    return [_StepView(i, raw) for i, raw in enumerate(steps) if isinstance(raw, Mapping)]


def _prompt_errors(steps: list[_StepView], limits: InputLimits) -> list[str]:
    """Literal prompts over ``max_prompt_bytes`` (a rendered one is checked again when the step runs)."""
    errors = []
    for step in steps:
        for name, text in step.texts.items():
            size = len(text.encode("utf-8", errors="surrogatepass"))
            if size > limits.max_prompt_bytes:
                errors.append(f"steps[{step.index}].{name}: {limits.refusal('max_prompt_bytes', f'is {size} bytes')}")
    return errors


def _format_path(loc: tuple[int | str, ...]) -> str:
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(document)"


def _pydantic_errors(exc: ValidationError, source: Mapping[str, Any]) -> list[str]:
    errors = []
    for error in exc.errors():
        loc = list(error["loc"])
        # The discriminated union adds the kind as a path segment (steps, 2, 'http', 'url'): drop it.
        if len(loc) >= 3 and loc[0] == "steps" and isinstance(loc[1], int) and loc[2] in STEP_KINDS:
            del loc[2]
        path = _format_path(tuple(loc))
        if error["type"] == "union_tag_invalid":
            kind = error.get("input", {}).get("kind") if isinstance(error.get("input"), dict) else None
            errors.append(f"{path}.kind: unknown kind {kind!r} (known kinds: {', '.join(STEP_KINDS)})")
        elif error["type"] == "union_tag_not_found":
            errors.append(f"{path}.kind: missing (known kinds: {', '.join(STEP_KINDS)})")
        elif error["type"] == "extra_forbidden":
            errors.append(f"{path}: unknown key")
        else:
            errors.append(f"{path}: {error['msg'].removeprefix('Value error, ')}")
    return errors


def _graph_errors(steps: list[_StepView], output: Any) -> list[str]:
    """Duplicate ids, unknown or self dependencies, a cycle, and templates naming steps a step does not
    depend on: all of them, on the raw steps (a step whose id is unusable is left out of the graph)."""
    errors: list[str] = []
    index: dict[str, int] = {}
    for step in steps:
        if step.id is None:
            continue
        if step.id in index:
            errors.append(f"steps[{step.index}].id: duplicate step id {step.id!r} (also steps[{index[step.id]}])")
        else:
            index[step.id] = step.index
    deps: dict[str, list[str]] = {}
    for step in steps:
        known = []
        for j, dep in step.depends_on:
            if dep not in index:
                errors.append(f"steps[{step.index}].depends_on[{j}]: unknown step {dep!r}")
            elif dep == step.id:
                errors.append(f"steps[{step.index}].depends_on[{j}]: step {step.id!r} depends on itself")
            else:
                known.append(dep)
        if step.id is not None and step.id not in deps:
            deps[step.id] = known
    cycle = _find_cycle(deps)
    if cycle:
        errors.append(f"steps[{index[cycle[0]]}].depends_on: cycle {' -> '.join(cycle)} (each step depends on "
                      "the next)")
    for step in steps:
        ancestors = _ancestors(deps, step.id) if step.id is not None else set()
        for field_name, value in step.templated:
            errors.extend(_template_errors(value, f"steps[{step.index}].{field_name}", index, ancestors, step.id))
    if output is not None:
        errors.extend(_template_errors(output, "output", index, set(index), None))
    return errors


def _ancestors(deps: Mapping[str, list[str]], step_id: str) -> set[str]:
    seen: set[str] = set()
    todo = list(deps.get(step_id, ()))
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(deps.get(current, ()))
    return seen


def _template_errors(value: Any, path: str, index: Mapping[str, int], allowed: set[str],
                     step_id: str | None) -> list[str]:
    errors = []
    try:
        for where, reference in references_in(value, path):
            ref = reference.step_id
            if ref is None:
                continue
            if ref not in index:
                errors.append(f"{where}: template '{{{{ {reference.text} }}}}' refers to unknown step {ref!r}")
            elif ref not in allowed:
                errors.append(f"{where}: template '{{{{ {reference.text} }}}}' refers to step {ref!r}, which step "
                              f"{step_id!r} does not depend on (directly or indirectly); add it to depends_on")
    except TemplateError as exc:
        errors.append(str(exc))
    return errors


def _find_cycle(deps: Mapping[str, list[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in deps.get(node, ()):
            if state.get(dep) == 1:
                return [*path[path.index(dep):], dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in deps:
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None
