"""Chat models: the real OpenAI client against a local fake endpoint, the offline model, timeouts,
metrics, missing provider packages and the context window."""

from __future__ import annotations

from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import tool
from prometheus_client import REGISTRY

from agentworker.graphs.agent_middleware import estimate_tokens, fit_context
from agentworker.graphs.models import (
    ModelProviderMissing,
    ModelSpecError,
    OfflineChatModel,
    chat_model,
    tenant_chat_model,
)
from agentworker.integrations import ModelSettings


@tool
def crm_find_contacts(query: str) -> str:
    """Find CRM contacts."""
    return query


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.mark.parametrize("streaming", [False, True], ids=["json", "sse"])
async def test_the_openai_client_gets_tool_calls_text_and_usage_from_the_endpoint(fake_openai: Any,
                                                                                 streaming: bool) -> None:
    name = f"gpt-test-{streaming}"
    model = chat_model(f"openai:{name}", base_url=fake_openai.base_url, api_key="sk-test-key",
                       streaming=streaming, timeout=10)
    answer = await model.bind_tools([crm_find_contacts]).ainvoke([HumanMessage("email Ada Lovelace today")])
    assert answer.tool_calls == [{"name": "crm_find_contacts", "args": {"query": "Ada Lovelace"}, "id": "call_0",
                                  "type": "tool_call"}]
    text = await model.ainvoke([HumanMessage("hello there, how are things going?")])
    assert text.text == "Noted: hello there, how are things going?"
    assert [(r["stream"], r["authorization"]) for r in fake_openai.requests] == [(streaming, "Bearer sk-test-key")] * 2
    assert sample("agentworker_llm_requests_total", provider="openai", model=name, outcome="success") == 2
    assert sample("agentworker_llm_request_duration_seconds_count", provider="openai", model=name) == 2
    # no tenant given: the tokens count under the "other" tenant label
    assert sample("agentworker_llm_tokens_total", provider="openai", model=name, kind="input", tenant="other") == 22
    assert sample("agentworker_llm_tokens_total", provider="openai", model=name, kind="output", tenant="other") == 14


async def test_a_hanging_endpoint_is_cut_at_the_timeout_and_counted(fake_openai: Any) -> None:
    model = chat_model("openai:hang", base_url=fake_openai.base_url, api_key="sk-test", timeout=0.5, max_retries=1)
    with pytest.raises(Exception, match="timed out") as info:
        await model.ainvoke([HumanMessage("anyone there?")])
    assert "Timeout" in type(info.value).__name__
    assert len(fake_openai.requests) == 2, "one retry, then it gives up"
    assert sample("agentworker_llm_requests_total", provider="openai", model="hang", outcome="timeout") == 1


def test_timeouts_and_retries_are_bounded_and_tenant_settings_apply(fake_openai: Any) -> None:
    model = chat_model("openai:gpt-x", base_url="http://127.0.0.1:9/v1", api_key="k", timeout=600, max_retries=99)
    assert model.request_timeout == 60 and model.max_retries == 5  # type: ignore[attr-defined]
    settings = ModelSettings(model="openai:gpt-x", base_url="http://127.0.0.1:9/v1", api_key="k", timeout=20)
    chosen, spec = tenant_chat_model(settings, timeout=5)
    assert spec == "openai:gpt-x" and chosen.request_timeout == 5  # type: ignore[attr-defined]
    offline, spec = tenant_chat_model(settings, override="offline")
    assert spec == "offline" and isinstance(offline, OfflineChatModel)


def test_a_missing_provider_package_names_the_extra_and_bad_specs_are_refused() -> None:
    with pytest.raises(ModelProviderMissing) as info:
        chat_model("anthropic:claude-test")
    assert str(info.value) == ("model 'anthropic:claude-test' needs the package langchain-anthropic, which is not "
                               "installed: pip install 'agentworker[anthropic]'")
    with pytest.raises(ModelSpecError, match="is not 'offline' nor a provider string"):
        chat_model("gpt-4o")


async def test_the_offline_model_answers_and_calls_tools_deterministically() -> None:
    model = chat_model().bind_tools([crm_find_contacts])
    ask = [HumanMessage('Find her.\ncall crm_find_contacts {"query": "Ada"}\ncall unknown_tool {}')]
    first, again = await model.ainvoke(ask), await model.ainvoke(ask)
    assert first.tool_calls == again.tool_calls
    assert [(c["name"], c["args"]) for c in first.tool_calls] == [("crm_find_contacts", {"query": "Ada"})]
    result = ToolMessage(content='{"contacts": []}', tool_call_id=first.tool_calls[0]["id"], name="crm_find_contacts")
    answer = await model.ainvoke([*ask, first, result])
    assert answer.text == '[offline] crm_find_contacts returned {"contacts": []}' and not answer.tool_calls
    assert (await chat_model().ainvoke("hi")).text == "[offline] hi", "no tools bound: no tool calls"


def test_long_conversations_are_trimmed_to_the_context_window_from_the_oldest_turn() -> None:
    history: list[Any] = []
    for turn in range(20):
        history += [HumanMessage(f"question {turn} " + "x" * 400), AIMessage(f"answer {turn} " + "y" * 400)]
    history.append(HumanMessage("the last question"))
    kept = fit_context(history, 1000)
    assert estimate_tokens(kept) <= 1000 < estimate_tokens(history)
    assert kept[-1].text == "the last question" and isinstance(kept[0], HumanMessage)
    assert kept == history[-len(kept):] and history[0] not in kept
    huge = [SystemMessage("s"), HumanMessage("z" * 100_000)]
    assert fit_context(huge, 500) == huge[1:], "the last turn is always sent"
