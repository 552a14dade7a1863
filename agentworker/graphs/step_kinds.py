"""What each step kind does with its rendered inputs: transform, http, llm, tool, agent.

(Approval steps pause the graph, so they live with the graph nodes in :mod:`.step_nodes`.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import aiohttp

from agentworker import egress
from agentworker.errors import AgentWorkerError
from agentworker.graphs import agent_step
from agentworker.safe_yaml import DocumentRefused, check_value
from agentworker.settings import InputLimits
from agentworker.tools import builtin as _builtin_tools  # noqa: F401 - registers the built-in tools
from agentworker.tools.registry import TOOLS
from agentworker.workflows.definition import AgentStep, HttpStep, LlmStep, StepBase, ToolStep, TransformStep

if TYPE_CHECKING:
    from agentworker.graphs.run_context import RunContext

SIDE_EFFECT_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_MAX_BODY_BYTES = 1_048_576


class StepError(AgentWorkerError):
    """A step failed in a way worth retrying (per its retry policy)."""


class PermanentStepError(StepError):
    """A step failed in a way retrying cannot fix (bad rendered input, unknown tool, no agent)."""


#: the rendered fields of each step kind that go to a model as a prompt
_PROMPT_FIELDS = {"llm": ("prompt", "system"), "agent": ("instructions",)}


async def execute(step: StepBase, values: Mapping[str, Any], run: RunContext) -> Any:
    """Run one attempt of ``step`` with its templated fields already rendered into ``values``.

    Within the input limits: a rendered prompt over ``AGENTWORKER_MAX_PROMPT_BYTES`` is not sent, and an
    output over ``AGENTWORKER_MAX_STEP_OUTPUT_BYTES`` (as JSON) is not kept; both fail the step for good."""
    limits = InputLimits.from_env()
    for name in _PROMPT_FIELDS.get(step.kind, ()):
        size = len(str(values.get(name) or "").encode("utf-8", errors="surrogatepass"))
        if size > limits.max_prompt_bytes:
            raise PermanentStepError(limits.refusal(
                "max_prompt_bytes", f"the rendered {name} of step {step.id!r} is {size} bytes"))
    output = await _execute_kind(step, values, run)
    try:
        check_value(output, what=f"the output of step {step.id!r}", limits=limits, size_limit="max_step_output_bytes")
    except DocumentRefused as exc:
        raise PermanentStepError(str(exc)) from None
    return output


async def _execute_kind(step: StepBase, values: Mapping[str, Any], run: RunContext) -> Any:
    if isinstance(step, TransformStep):
        return _transform(values)
    if isinstance(step, HttpStep):
        return await _http(step, values, run)
    if isinstance(step, LlmStep):
        return await _llm(step, values, run)
    if isinstance(step, ToolStep):
        return await _tool(step, values, run)
    if isinstance(step, AgentStep):
        try:
            return await agent_step.run_agent_step(
                run.scope, run_id=run.run_id, step_id=step.id, instructions=values["instructions"], tools=step.tools,
                model=step.model, max_iterations=step.max_iterations, timeout=step.timeout_seconds)
        except agent_step.AgentStepUnavailable as exc:
            raise PermanentStepError(str(exc)) from None
    raise PermanentStepError(f"step {step.id!r} has kind {getattr(step, 'kind', '?')!r}, which cannot run here")


def _transform(values: Mapping[str, Any]) -> Any:
    if values.get("merge") is None:
        return values["template"]
    merged: dict[str, Any] = {}
    for index, part in enumerate(values["merge"]):
        if not isinstance(part, dict):
            raise PermanentStepError(f"merge[{index}] is a {type(part).__name__}, not an object")
        merged.update(part)
    return merged


async def _http(step: HttpStep, values: Mapping[str, Any], run: RunContext) -> Any:
    url = values["url"]
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise PermanentStepError(f"url {url!r} is not an http:// or https:// URL")
    headers = {str(k): str(v) for k, v in (values.get("headers") or {}).items()}

    async def request(idempotency_key: str | None) -> dict[str, Any]:
        if idempotency_key is not None:
            headers.setdefault("Idempotency-Key", idempotency_key)
        timeout = aiohttp.ClientTimeout(total=step.timeout_seconds)
        try:
            async with egress.http_session(timeout=timeout) as session, session.request(
                    step.method, url, headers=headers, json=values.get("body")) as response:
                raw = await response.content.read(_MAX_BODY_BYTES)
                status = response.status
                content_type = response.headers.get("Content-Type", "")
        except egress.EgressRefused as exc:
            raise PermanentStepError(str(exc)) from None  # retrying cannot make the address allowed
        except aiohttp.ClientError as exc:
            raise StepError(f"{step.method} {url} failed: {type(exc).__name__}: {exc}") from None
        text = raw.decode("utf-8", errors="replace")
        body: Any = text
        if "json" in content_type:
            try:
                body = json.loads(text)
            except ValueError:
                body = text
        if status >= 400:
            raise StepError(f"{step.method} {url} answered HTTP {status}: {text[:200]}")
        return {"status": status, "content_type": content_type, "body": body}

    if step.method in SIDE_EFFECT_METHODS:
        return await run.scope.ledger.run_once(run.tenant_id, run.run_id, step.id, f"http:{step.method}", request)
    return await request(None)


async def _llm(step: LlmStep, values: Mapping[str, Any], run: RunContext) -> Any:
    from langchain_core.messages import HumanMessage, SystemMessage

    from agentworker.graphs.agent_runtime import agent_model

    # The tenant's model settings (key, endpoint) and its LLM budget, as in the agents.
    chosen = await agent_model(run.scope, step.model, timeout=step.timeout_seconds)
    model = chosen.model
    messages: list[Any] = []
    if values.get("system"):
        messages.append(SystemMessage(content=str(values["system"])))
    messages.append(HumanMessage(content=str(values["prompt"])))
    answer = await model.ainvoke(messages)
    return {"text": answer.text, "model": chosen.spec}


async def _tool(step: ToolStep, values: Mapping[str, Any], run: RunContext) -> Any:
    from agentworker.tools.registry import UnknownTool

    try:
        found = TOOLS.get(run.tenant_id, step.tool)
    except UnknownTool as exc:
        raise PermanentStepError(str(exc)) from None
    call_key = f"tool:{found.name}"
    args = dict(values.get("args") or {})
    if not found.side_effects:
        return await found.func(run.tool_context(step.id, call_key), args)

    async def effect(_key: str) -> Any:
        return await found.func(run.tool_context(step.id, call_key), args)

    return await run.scope.ledger.run_once(run.tenant_id, run.run_id, step.id, call_key, effect)
