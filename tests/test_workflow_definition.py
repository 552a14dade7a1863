"""Workflow definitions: what is refused at save time (with the path of the problem), and templates."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentworker.workflows import InvalidWorkflow, parse_workflow
from agentworker.workflows.templates import TemplateError, render
from tests.conftest import ROOT


def _step(step_id: str, depends_on: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": step_id, "kind": "transform", "template": {"x": 1}, "depends_on": depends_on or [], **extra}


def _errors(definition: Any) -> list[str]:
    with pytest.raises(InvalidWorkflow) as info:
        parse_workflow(definition)
    assert str(info.value).startswith("invalid workflow definition: ")
    return info.value.errors


@pytest.mark.parametrize(("definition", "expected"), [
    pytest.param({"id": "w", "steps": [_step("a", ["c"]), _step("b", ["a"]), _step("c", ["b"])]},
                 "steps[0].depends_on: cycle a -> c -> b -> a (each step depends on the next)", id="cycle"),
    pytest.param({"id": "w", "steps": [_step("a", ["a"])]},
                 "steps[0].depends_on[0]: step 'a' depends on itself", id="self-cycle"),
    pytest.param({"id": "w", "steps": [_step("a"), _step("b", ["a", "zz"])]},
                 "steps[1].depends_on[1]: unknown step 'zz'", id="unknown-dependency"),
    pytest.param({"id": "w", "steps": [_step("a"), {"id": "b", "kind": "teleport"}]},
                 "steps[1].kind: unknown kind 'teleport' (known kinds: agent, approval, http, llm, tool, transform)",
                 id="unknown-kind"),
    pytest.param({"id": "w", "steps": [_step("a", template="{{ steps.ghost.output }}")]},
                 "steps[0].template: template '{{ steps.ghost.output }}' refers to unknown step 'ghost'",
                 id="template-unknown-step"),
    pytest.param({"id": "w", "steps": [_step("a"), _step("b"),
                                       {"id": "c", "kind": "llm", "depends_on": ["a"],
                                        "prompt": "use {{ steps.b.output.text }}"}]},
                 "steps[2].prompt: template '{{ steps.b.output.text }}' refers to step 'b', which step 'c' does "
                 "not depend on (directly or indirectly); add it to depends_on", id="template-not-ancestor"),
    pytest.param({"id": "w", "steps": [{"id": "a", "kind": "tool", "tool": "echo",
                                        "args": {"to": ["{{ __import__('os') }}"]}}]},
                 "steps[0].args.to[0]: bad template: '{{ __import__('os') }}' is not a dotted path like input.x or "
                 "steps.a.output.y", id="template-code"),
    pytest.param({"id": "w", "steps": [{"id": "a", "kind": "http", "url": "http://x/{{ input.id"}]},
                 "steps[0].url: bad template: unbalanced '{{' or '}}' in 'http://x/{{ input.id'",
                 id="template-unbalanced"),
    pytest.param({"id": "w", "steps": [_step("a", template="{{ secrets.key }}")]},
                 "steps[0].template: bad template: '{{ secrets.key }}' must start with input or steps, not "
                 "'secrets'", id="template-root"),
    pytest.param({"id": "w", "steps": [_step("a"), _step("a")]},
                 "steps[1].id: duplicate step id 'a' (also steps[0])", id="duplicate"),
    pytest.param({"id": "w", "steps": [_step("a", retry={"max_attempts": 0})]},
                 "steps[0].retry.max_attempts: Input should be greater than or equal to 1", id="retry"),
    pytest.param({"id": "w", "steps": [_step("a", timeout_seconds=7200)]},
                 "steps[0].timeout_seconds: Input should be less than or equal to 3600", id="timeout"),
    pytest.param({"id": "w", "steps": [_step("a", colour="red")]}, "steps[0].colour: unknown key", id="extra-key"),
    pytest.param({"id": "w", "steps": [{"id": "a", "kind": "transform"}]},
                 "steps[0]: a transform step needs exactly one of template or merge", id="transform-form"),
    pytest.param({"id": "w", "steps": []}, "steps: List should have at least 1 item after validation, not 0",
                 id="no-steps"),
    pytest.param("steps: [oops", None, id="not-yaml"),
    pytest.param({"id": "w", "steps": [_step("a")], "output": "{{ steps.nope.output }}"},
                 "output: template '{{ steps.nope.output }}' refers to unknown step 'nope'", id="output-template"),
])
def test_bad_definitions_are_refused_with_the_path_of_the_problem(definition: Any, expected: str | None) -> None:
    errors = _errors(definition)
    if expected is None:
        assert errors[0].startswith("(document): not valid YAML or JSON")
    else:
        assert expected in errors, errors


def test_every_problem_is_listed_at_once() -> None:
    errors = _errors({"id": "w", "steps": [_step("a", ["x"]), _step("b", ["y"])]})
    assert errors == ["steps[0].depends_on[0]: unknown step 'x'", "steps[1].depends_on[0]: unknown step 'y'"]


def test_schema_graph_cycle_and_template_problems_come_in_one_report() -> None:
    errors = _errors({"id": "w", "steps": [
        {"id": "a", "kind": "http", "url": "https://x.example", "method": "FETCH", "depends_on": ["c"]},
        _step("b", ["a", "ghost"]),
        _step("c", ["b"], template={"v": "{{ steps.d.output }}"}),
        {"id": "d", "kind": "teleport"},
    ]})
    assert any(e.startswith("steps[0].method:") for e in errors), errors  # the schema
    assert "steps[1].depends_on[1]: unknown step 'ghost'" in errors  # a dependency
    assert any(e.startswith("steps[0].depends_on: cycle a -> c -> b -> a") for e in errors), errors  # a cycle
    assert any(e.startswith("steps[2].template.v: template") and "'d'" in e for e in errors), errors  # a template
    assert any(e.startswith("steps[3].kind: unknown kind 'teleport'") for e in errors), errors


def test_templates_render_values_and_text_without_running_code() -> None:
    context = {"input": {"user": {"name": "Ada", "tags": ["x", "y"]}, "n": 3},
               "steps": {"a": {"items": [{"id": 7}]}}}
    assert render("{{ input.user }}", context) == {"name": "Ada", "tags": ["x", "y"]}
    assert render("{{input.n}}", context) == 3
    assert render("Hi {{ input.user.name }}, {{ input.n }} new, {{ input.user.tags }}", context) == \
        'Hi Ada, 3 new, ["x", "y"]'
    assert render({"k": ["{{ steps.a.output.items.0.id }}"]}, context) == {"k": [7]}
    with pytest.raises(TemplateError, match=r"input.user has no 'age'"):
        render("{{ input.user.age }}", context)
    with pytest.raises(TemplateError, match="step 'b' has no output yet"):
        render("{{ steps.b.output }}", context)


def test_the_readme_example_is_a_valid_definition() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Workflows", 1)[1]
    example = re.search(r"```yaml\n(.*?)```", section, re.DOTALL)
    assert example is not None, "the Workflows section has a YAML example"
    definition = parse_workflow(example.group(1))
    kinds = {step.kind for step in definition.steps}
    assert {"transform", "http", "approval", "llm", "tool"} <= kinds
    assert len(definition.steps) >= 5


def test_the_client_side_stays_light(tmp_path: Path) -> None:
    """The client and the task modules validate and enqueue without importing LangGraph, LangChain, MCP or
    a provider SDK."""
    code = ("import sys, agentworker.client, agentworker.tasks.workflow_tasks, agentworker.tasks.agent_tasks, "
            "agentworker.workflows, agentworker.tools; "
            "heavy = [m for m in sys.modules if m.split('.')[0] in ('langgraph', 'langchain', 'langchain_core', "
            "'psycopg', 'mcp', 'langchain_mcp_adapters', 'openai', 'langchain_openai', 'aiosmtplib')]; print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                         check=True)
    assert out.stdout.strip() == "[]"
