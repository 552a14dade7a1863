"""The template syntax of workflow step inputs: ``{{ input.x }}`` and ``{{ steps.a.output.y }}``.

An expression is a dotted path, nothing else: no calls, filters, arithmetic or code. Its root is
``input`` (the run's input) or ``steps.<step_id>.output`` (a finished step's output); each further
segment is an object key, or a list index when it is all digits. A string that is exactly one
expression becomes the referenced value itself (object, list, number...); an expression inside a longer
string is replaced by the value's text (JSON for objects and lists). Templates may appear in any string
of a templated field, at any depth; object keys are not templated.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

_EXPRESSION_RE = re.compile(r"\{\{(.*?)\}\}", re.DOTALL)
_WHOLE_RE = re.compile(r"^\s*\{\{(.*?)\}\}\s*$", re.DOTALL)
_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z0-9_-]+)*$")


class TemplateError(ValueError):
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


def render(value: Any, context: Mapping[str, Any]) -> Any:
    """``value`` with every expression replaced, as described in the module docstring."""
    if isinstance(value, str):
        whole = _WHOLE_RE.fullmatch(value)
        if whole and "{{" not in whole.group(1):
            return resolve(parse_expression(whole.group(1)), context)

        def substitute(match: re.Match[str]) -> str:
            found = resolve(parse_expression(match.group(1)), context)
            return found if isinstance(found, str) else json.dumps(found)

        return _EXPRESSION_RE.sub(substitute, value)
    if isinstance(value, Mapping):
        return {key: render(item, context) for key, item in value.items()}
    if isinstance(value, list):
        return [render(item, context) for item in value]
    return value
