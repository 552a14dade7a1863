"""Chat models by name: LangChain provider strings, or the deterministic offline model.

``chat_model("openai:gpt-4o-mini")`` goes through LangChain's ``init_chat_model`` (the provider's
package, e.g. ``langchain-openai``, must be installed; its API key comes from the provider's usual
environment variable) with a timeout of at most :data:`MAX_TIMEOUT_SECONDS` and bounded retries.
``chat_model(None)`` or ``"offline"`` is :class:`OfflineChatModel`, which needs no key and no network, so
the service and its tests run anywhere.
"""

from __future__ import annotations

from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

OFFLINE = "offline"
#: the rule of the seed: an LLM call times out within 60 s
MAX_TIMEOUT_SECONDS = 60.0
DEFAULT_MAX_RETRIES = 2


class ModelSpecError(ValueError):
    """A model name that is neither ``offline`` nor a ``provider:model`` string."""


class OfflineChatModel(BaseChatModel):
    """Answers ``[offline] <the last message>``: deterministic, for tests and key-less deployments."""

    @property
    def _llm_type(self) -> str:
        return OFFLINE

    def _answer(self, messages: list[BaseMessage]) -> ChatResult:
        last = messages[-1].text if messages else ""
        return ChatResult(generations=[ChatGeneration(message=AIMessage(content=f"[offline] {last}"))])

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._answer(messages)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        return self._answer(messages)

    def bind_tools(self, tools: Any, **kwargs: Any) -> OfflineChatModel:
        # It never calls tools, so binding them changes nothing; agents can still be built on it.
        return self


def chat_model(spec: str | None = None, *, timeout: float = MAX_TIMEOUT_SECONDS,
               max_retries: int = DEFAULT_MAX_RETRIES) -> BaseChatModel:
    """The chat model named ``spec`` (None or ``offline``: the offline model)."""
    if spec is None or spec == OFFLINE:
        return OfflineChatModel()
    provider, _, name = spec.partition(":")
    if not provider or not name:
        raise ModelSpecError(f"model {spec!r} is not 'offline' nor a provider string like 'openai:gpt-4o-mini'")
    from langchain.chat_models import init_chat_model

    try:
        return init_chat_model(spec, timeout=min(timeout, MAX_TIMEOUT_SECONDS), max_retries=max(0, max_retries))
    except ImportError as exc:
        raise ModelSpecError(f"model {spec!r} needs a provider package that is not installed: {exc}") from None
    except ValueError as exc:
        raise ModelSpecError(f"model {spec!r}: {exc}") from None
