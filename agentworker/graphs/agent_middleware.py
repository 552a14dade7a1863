"""Agent middleware of ours: fit the conversation into the model's context window; name model timeouts.

:class:`ContextWindowMiddleware` trims what each model call sees to the newest turns that fit the
tenant's ``context_tokens`` budget (estimated at four characters a token), starting on a person's
message so tool results never lose the call they answer. The checkpointed conversation keeps every
message: only the request is trimmed. :class:`ModelDeadlineMiddleware` turns a provider's timeout into
:class:`ModelTimeout`, one sentence naming the model and its limit.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from langchain.agents.middleware import AgentMiddleware, ModelRequest, ModelResponse
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, trim_messages

from agentworker.errors import AgentWorkerError
from agentworker.graphs.model_metrics import is_timeout

_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


class ModelTimeout(AgentWorkerError, TimeoutError):
    """The chat model did not answer within its timeout (after its retries)."""


def estimate_tokens(messages: Sequence[BaseMessage]) -> int:
    """A provider-neutral estimate: four characters a token, plus a little per message."""
    total = 0
    for message in messages:
        size = len(message.text)
        if isinstance(message, AIMessage) and message.tool_calls:
            size += len(json.dumps([call["args"] for call in message.tool_calls], default=str))
        total += _TOKENS_PER_MESSAGE + size // _CHARS_PER_TOKEN
    return total


def fit_context(messages: Sequence[BaseMessage], max_tokens: int) -> list[BaseMessage]:
    """The newest messages within ``max_tokens``, starting on a person's message; at least the last turn."""
    if estimate_tokens(messages) <= max_tokens:
        return list(messages)
    kept = trim_messages(list(messages), max_tokens=max(1, max_tokens), token_counter=estimate_tokens,
                         strategy="last", start_on="human", allow_partial=False)
    if kept:
        return list(kept)
    # Even the last turn alone is over budget: send it anyway (the provider will say if it cannot).
    for index in range(len(messages) - 1, -1, -1):
        if isinstance(messages[index], HumanMessage):
            return list(messages[index:])
    return list(messages[-1:])


class ContextWindowMiddleware(AgentMiddleware[Any, Any, Any]):
    def __init__(self, max_tokens: int) -> None:
        super().__init__()
        self.max_tokens = max_tokens

    async def awrap_model_call(self, request: ModelRequest[Any],
                               handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]
                               ) -> ModelResponse[Any]:
        system = [request.system_message] if request.system_message is not None else []
        budget = self.max_tokens - estimate_tokens(system)
        kept = fit_context(request.messages, budget)
        if len(kept) < len(request.messages):
            request = request.override(messages=kept)  # type: ignore[arg-type]
        return await handler(request)


class ModelDeadlineMiddleware(AgentMiddleware[Any, Any, Any]):
    def __init__(self, spec: str, timeout: float, max_retries: int) -> None:
        super().__init__()
        self.spec = spec
        self.timeout = timeout
        self.max_retries = max_retries

    async def awrap_model_call(self, request: ModelRequest[Any],
                               handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]]
                               ) -> ModelResponse[Any]:
        try:
            return await handler(request)
        except Exception as exc:
            if is_timeout(exc):
                raise ModelTimeout(f"chat model {self.spec!r} did not answer within {self.timeout:g}s "
                                   f"(with {self.max_retries} retries)") from None
            raise
