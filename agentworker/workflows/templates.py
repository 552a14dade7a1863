"""The template syntax of workflow step inputs: ``{{ input.x }}`` and ``{{ steps.a.output.y }}``.

An expression is a dotted path, nothing else: no calls, filters, arithmetic or code. Its root is
``input`` (the run's input) or ``steps.<step_id>.output`` (a finished step's output); each further
segment is an object key, or a list index when it is all digits. A string that is exactly one
expression becomes the referenced value itself (object, list, number...); an expression inside a longer
string is replaced by the value's text (JSON for objects and lists). Templates may appear in any string
of a templated field, at any depth; object keys are not templated.

What a step's templates render to is limited (``AGENTWORKER_MAX_TEMPLATE_OUTPUT_BYTES``, counted as
JSON as it is rendered): a template repeating a big output ``{{ steps.a.output }}`` a thousand times is
refused, not multiplied into the step's stored input.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from agentworker.errors import AgentWorkerError
from agentworker.safe_yaml import DocumentRefused, check_value
from agentworker.settings import InputLimits

_EXPRESSION_RE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_WHOLE_RE = re.compile(r"^\s*\{\{(.*?)\}\}\s*$", re.DOTALL)
_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


class TemplateError(AgentWorkerError, ValueError):
    """A template that cannot be parsed, or that refers to something that is not there."""


@dataclass(frozen=True, slots=True)
class Reference:
    """A parsed expression: ``step_id`` is None for ``input.…``; ``path`` is what follows the root."""

    text: str
    step_id: str | None
    path: tuple[str, ...]

    @property
    def root(self) -> str:
        return "input" if self.step_id is None else f"steps.{self.step_id}.output"


def parse_expression(expression: str) -> Reference:
    """Parse the inside of ``{{ … }}``; raise :class:`TemplateError` naming the problem."""
    text = expression.strip()
    if not _PATH_RE.fullmatch(text):
        raise TemplateError(f"'{{{{ {text} }}}}' is not a dotted path like input.x or steps.a.output.y")
    parts = tuple(text.split("."))
    if parts[0] == "input":
        return Reference(text, None, parts[1:])
    if parts[0] == "steps":
        if len(parts) < 3 or parts[2] != "output":
            raise TemplateError(f"'{{{{ {text} }}}}' must read steps.<step id>.output[.key...]")
        return Reference(text, parts[1], parts[3:])
    raise TemplateError(f"'{{{{ {text} }}}}' must start with input or steps, not {parts[0]!r}")


def references_in(value: Any, path: str = "") -> Iterator[tuple[str, Reference]]:
    """Every expression in a JSON value, with the dotted path of the string holding it.

    Raises :class:`TemplateError` (its message starting with that path) for a malformed template."""
    if isinstance(value, str):
        for match in _EXPRESSION_RE.finditer(value):
            try:
                yield path, parse_expression(match.group(1))
            except TemplateError as exc:
                raise TemplateError(f"{path}: bad template: {exc}") from None
        leftover = _EXPRESSION_RE.sub("", value)
        if "{{" in leftover or "}}" in leftover:
            raise TemplateError(f"{path}: bad template: unbalanced '{{{{' or '}}}}' in {value!r}")
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from references_in(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from references_in(item, f"{path}[{index}]")


def resolve(reference: Reference, context: Mapping[str, Any]) -> Any:
    """The value ``reference`` points to in ``{"input": ..., "steps": {id: output}}``."""
    if reference.step_id is None:
        value = context.get("input")
    else:
        outputs = context.get("steps", {})
        if reference.step_id not in outputs:
            raise TemplateError(f"'{{{{ {reference.text} }}}}': step {reference.step_id!r} has no output yet")
        value = outputs[reference.step_id]
    walked = reference.root
    for segment in reference.path:
        if isinstance(value, Mapping) and segment in value:
            value = value[segment]
        elif isinstance(value, list) and segment.isdigit() and int(segment) < len(value):
            value = value[int(segment)]
        else:
            raise TemplateError(f"'{{{{ {reference.text} }}}}': {walked} has no {segment!r}")
        walked = f"{walked}.{segment}"
    return value


class _Budget:
    """Bytes (roughly, as JSON) a render may still produce; a :class:`TemplateError` once spent."""

    def __init__(self, limits: InputLimits, max_bytes: int) -> None:
        self.limits = limits
        self.max_bytes = max_bytes
        self.used = 0

    def refusal(self) -> TemplateError:
        return TemplateError(self.limits.refusal(
            "max_template_output_bytes", f"the rendered inputs are more than {self.max_bytes} bytes"))

    def spend(self, size: int) -> None:
        self.used += size
        if self.used > self.max_bytes:
            raise self.refusal()

    def spend_on(self, found: Any) -> None:
        """Count a referenced value, without serializing more of it than the budget has left."""
        try:
            self.spend(check_value(found, what="a referenced value", limits=self.limits,
                                   size_limit="max_template_output_bytes", max_bytes=self.max_bytes - self.used))
        except DocumentRefused:
            raise self.refusal() from None


def render(value: Any, context: Mapping[str, Any], *, max_bytes: int | None = None) -> Any:
    """``value`` with every expression replaced, as described in the module docstring.

    Raises :class:`TemplateError` for a bad template, a missing value, or a result over ``max_bytes``
    (default: ``AGENTWORKER_MAX_TEMPLATE_OUTPUT_BYTES``)."""
    limits = InputLimits.from_env()
    return _render(value, context, _Budget(limits, limits.max_template_output_bytes if max_bytes is None
                                           else max_bytes))


def _render(value: Any, context: Mapping[str, Any], budget: _Budget) -> Any:
    if isinstance(value, str):
        whole = _WHOLE_RE.fullmatch(value)
        if whole and "{{" not in whole.group(1):
            found = resolve(parse_expression(whole.group(1)), context)
            budget.spend_on(found)
            return found

        def substitute(match: re.Match[str]) -> str:
            found = resolve(parse_expression(match.group(1)), context)
            budget.spend_on(found)
            return found if isinstance(found, str) else json.dumps(found)

        rendered = _EXPRESSION_RE.sub(substitute, value)
        budget.spend(len(value) + 2)  # the literal text (each substitution was counted as it was made)
        return rendered
    if isinstance(value, Mapping):
        budget.spend(2 + 2 * len(value))
        rendered_map = {}
        for key, item in value.items():
            budget.spend(len(str(key)) + 2)
            rendered_map[key] = _render(item, context, budget)
        return rendered_map
    if isinstance(value, list):
        budget.spend(2 + len(value))
        return [_render(item, context, budget) for item in value]
    budget.spend(8)
    return value
