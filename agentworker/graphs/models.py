"""Chat models by name: LangChain provider strings, or the deterministic offline model.

``chat_model("openai:gpt-4o-mini", ...)`` goes through LangChain's ``init_chat_model``. Each provider's
package is an optional extra of agentworker (``pip install 'agentworker[openai]'``, ``[anthropic]``,
``[ollama]``); a missing one fails with :class:`ModelProviderMissing` naming the extra. Every model gets
a request timeout of at most :data:`MAX_TIMEOUT_SECONDS`, at most :data:`MAX_RETRIES` retries, and the
metrics callback (:mod:`.model_metrics`). The API key comes from the tenant's model settings or, failing
that, from the provider's usual environment variable (``OPENAI_API_KEY``, ...) — but only for the
provider's own endpoint (its default, or the operator's ``OPENAI_BASE_URL``).

A ``base_url`` is a tenant's endpoint (operators set theirs in the provider's environment variable): it is
called through the egress guard (:mod:`agentworker.egress`) and gets the tenant's own key or no
``Authorization`` at all — never the platform's key, organization or project. Only ``openai:`` models
take one, the provider whose HTTP client the guard is wired into; others refuse it.

``chat_model(None)`` or ``"offline"`` is :class:`OfflineChatModel`, which needs no key and no network, so
the service and its tests run anywhere.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
from collections.abc import Sequence
from typing import Any

import httpx
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, ToolCall, ToolMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.utils.function_calling import convert_to_openai_tool

from agentworker import egress
from agentworker.errors import AgentWorkerError
from agentworker.graphs.model_metrics import LlmCallMetrics
from agentworker.integrations import MAX_TIMEOUT_SECONDS, ModelSettings
from agentworker.metrics import OTHER_TENANT

OFFLINE = "offline"
DEFAULT_MAX_RETRIES = 2
MAX_RETRIES = 5
#: provider prefix -> (Python package, agentworker extra that installs it)
PROVIDERS: dict[str, tuple[str, str]] = {
    "openai": ("langchain_openai", "openai"),
    "anthropic": ("langchain_anthropic", "anthropic"),
    "ollama": ("langchain_ollama", "ollama"),
}
_CALL_LINE = re.compile(r"^\s*call\s+([A-Za-z0-9_.-]+)\s*(\{.*\})?\s*$")
#: stands in for a key when a tenant endpoint has none (the client insists on one); never sent
_NO_KEY = "agentworker-no-tenant-key"
#: what the OpenAI client would add from the platform's environment; never sent to a tenant endpoint
_PLATFORM_HEADERS = ("OpenAI-Organization", "OpenAI-Project")


class ModelSpecError(AgentWorkerError, ValueError):
    """A model name that is neither ``offline`` nor a usable ``provider:model`` string."""


class ModelProviderMissing(ModelSpecError):
    """The provider's LangChain package is not installed."""


class OfflineChatModel(BaseChatModel):
    """The deterministic offline model: no key, no network, same answer for the same conversation.

    * The last message is from a person and tools are bound: each line ``call TOOL {json args}`` naming
      a bound tool becomes a tool call (``{}`` when the arguments are left out).
    * The last messages are tool results: it answers ``[offline] TOOL returned RESULT`` for each.
    * Otherwise it answers ``[offline] <the last message>``.
    """

    #: names of the tools bound with :meth:`bind_tools`
    tool_names: tuple[str, ...] = ()

    @property
    def _llm_type(self) -> str:
        return OFFLINE

    def _answer(self, messages: list[BaseMessage]) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=offline_reply(messages, self.tool_names))])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._answer(messages)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._answer(messages)

    def bind_tools(self, tools: Sequence[Any], **kwargs: Any) -> OfflineChatModel:
        names = tuple(convert_to_openai_tool(t)["function"]["name"] for t in tools)
        return self.model_copy(update={"tool_names": names})


def offline_reply(messages: list[BaseMessage], tool_names: Sequence[str] = ()) -> AIMessage:
    """The offline model's answer to ``messages`` (see :class:`OfflineChatModel`)."""
    if not messages:
        return AIMessage(content="[offline] ")
    trailing: list[ToolMessage] = []
    for message in reversed(messages):
        if not isinstance(message, ToolMessage):
            break
        trailing.insert(0, message)
    if trailing:
        return AIMessage(content="\n".join(f"[offline] {m.name or 'tool'} returned {m.text[:1000]}" for m in trailing))
    last = messages[-1]
    if isinstance(last, HumanMessage) and tool_names:
        calls = _tool_calls(last.text, tool_names)
        if calls:
            return AIMessage(content="", tool_calls=calls)
    return AIMessage(content=f"[offline] {last.text}")


def _tool_calls(text: str, tool_names: Sequence[str]) -> list[ToolCall]:
    calls: list[ToolCall] = []
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    for line in text.splitlines():
        match = _CALL_LINE.match(line)
        if not match or match.group(1) not in tool_names:
            continue
        try:
            args = json.loads(match.group(2)) if match.group(2) else {}
        except ValueError:
            continue
        if isinstance(args, dict):
            calls.append(ToolCall(name=match.group(1), args=args, id=f"offline-{digest}-{len(calls)}"))
    return calls


def split_spec(spec: str) -> tuple[str, str]:
    """``("openai", "gpt-4o-mini")`` from ``"openai:gpt-4o-mini"``; ``("offline", "offline")`` for offline."""
    if spec == OFFLINE:
        return OFFLINE, OFFLINE
    provider, _, name = spec.partition(":")
    if not provider or not name:
        raise ModelSpecError(f"model {spec!r} is not 'offline' nor a provider string like 'openai:gpt-4o-mini'")
    return provider, name


def require_provider(provider: str, spec: str) -> None:
    """Raise :class:`ModelProviderMissing` naming the extra when the provider's package is absent."""
    known = PROVIDERS.get(provider)
    if known is None:
        return  # init_chat_model knows more providers; it reports a missing package itself
    package, extra = known
    if importlib.util.find_spec(package) is None:
        raise ModelProviderMissing(f"model {spec!r} needs the package {package.replace('_', '-')}, which is not "
                                   f"installed: pip install 'agentworker[{extra}]'")


def chat_model(spec: str | None = None, *, timeout: float = MAX_TIMEOUT_SECONDS,
               max_retries: int = DEFAULT_MAX_RETRIES, base_url: str | None = None, api_key: str | None = None,
               streaming: bool = False, temperature: float | None = None, max_tokens: int | None = None,
               tenant: str = OTHER_TENANT,
               callbacks: Sequence[BaseCallbackHandler] = ()) -> BaseChatModel:
    """The chat model named ``spec`` (None or ``offline``: the offline model), instrumented (``tenant``:
    the metrics' tenant label) and with ``callbacks`` (a tenant's LLM budget) on every call."""
    if spec is None or spec == OFFLINE:
        return OfflineChatModel(callbacks=[LlmCallMetrics(OFFLINE, OFFLINE, tenant), *callbacks])
    provider, name = split_spec(spec)
    require_provider(provider, spec)
    options: dict[str, Any] = {"timeout": min(timeout, MAX_TIMEOUT_SECONDS),
                               "max_retries": min(max(0, max_retries), MAX_RETRIES)}
    if provider == "ollama":
        # ChatOllama takes its HTTP timeout through the client and has no retry option (a local server).
        options = {"client_kwargs": {"timeout": options["timeout"]}}
    if base_url:
        if provider != "openai":
            raise ModelSpecError(f"model {spec!r} cannot use a base_url: only openai models reach a tenant's own "
                                 "endpoint, through the egress guard")
        options.update(_tenant_endpoint(base_url, api_key, options["timeout"]))
    elif api_key and provider != "ollama":
        options["api_key"] = api_key
    if streaming:
        options["streaming"] = True
        if provider == "openai":
            options["stream_usage"] = True  # token counts in the last chunk
    if temperature is not None:
        options["temperature"] = temperature
    if max_tokens is not None and provider != "ollama":
        options["max_tokens"] = max_tokens
    from langchain.chat_models import init_chat_model

    try:
        model: BaseChatModel = init_chat_model(spec, callbacks=[LlmCallMetrics(provider, name, tenant), *callbacks],
                                               **options)
        return model
    except ImportError as exc:
        raise ModelProviderMissing(f"model {spec!r} needs a provider package that is not installed: {exc}") from None
    except ValueError as exc:
        raise ModelSpecError(f"model {spec!r}: {exc}") from None


def _tenant_endpoint(base_url: str, api_key: str | None, timeout: float) -> dict[str, Any]:
    """ChatOpenAI's options for a tenant's endpoint: the guarded client, and the tenant's key or none."""

    async def platform_headers_off(request: httpx.Request) -> None:
        if request.headers.get("Authorization") == f"Bearer {_NO_KEY}":
            del request.headers["Authorization"]
        for name in _PLATFORM_HEADERS:
            request.headers.pop(name, None)

    return {
        "base_url": base_url,
        # Given explicitly, so the client never falls back on OPENAI_API_KEY (the platform's key).
        "api_key": api_key or _NO_KEY,
        "http_async_client": egress.httpx_client(timeout=timeout, keepalive=False, follow_redirects=True,
                                                 event_hooks={"request": [platform_headers_off]}),
        # Agents call models asynchronously; a synchronous call must not slip past the guard either.
        "http_client": httpx.Client(transport=_AsyncOnly()),
    }


class _AsyncOnly(httpx.BaseTransport):
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        raise ModelSpecError(f"{request.url.host}: a tenant's model endpoint is only called asynchronously, "
                             "through the egress guard")


def tenant_chat_model(settings: ModelSettings | None, *, override: str | None = None,
                      timeout: float | None = None, tenant: str = OTHER_TENANT,
                      callbacks: Sequence[BaseCallbackHandler] = ()) -> tuple[BaseChatModel, str]:
    """The model of a tenant's settings (or ``override``, e.g. a workflow step's ``model``) and its spec.

    The settings' connection (base URL, key) goes with the override only when both name the same provider.
    """
    settings = settings or ModelSettings()
    spec = override or settings.model
    same_provider = split_spec(spec)[0] == split_spec(settings.model)[0]
    limit = min(settings.timeout, timeout) if timeout else settings.timeout
    model = chat_model(
        spec, timeout=limit, max_retries=settings.max_retries, streaming=settings.streaming,
        temperature=settings.temperature if same_provider else None, max_tokens=settings.max_tokens,
        base_url=settings.base_url if same_provider else None,
        api_key=settings.api_key.get_secret_value() if same_provider and settings.api_key else None,
        tenant=tenant, callbacks=callbacks)
    return model, spec
