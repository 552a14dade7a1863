"""Every chat model call in the metrics: requests by outcome, latency, tokens when the provider reports them.

:class:`LlmCallMetrics` is a LangChain callback handler that :func:`agentworker.graphs.models.chat_model`
attaches to each model it makes, so calls made by agents, workflow steps and the router are all counted
(``agentworker_llm_requests_total{provider,model,outcome}`` with outcome ``success``, ``timeout`` or
``error``; ``agentworker_llm_request_duration_seconds``; ``agentworker_llm_tokens_total{kind}``).
A provider's own retries happen inside one call: they count once, with the final outcome.
"""

from __future__ import annotations

import time
from typing import Any
from uuid import UUID

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.outputs import LLMResult

from agentworker import metrics


def is_timeout(error: BaseException) -> bool:
    """A timeout, whatever the provider SDK calls it (``APITimeoutError``, ``ReadTimeout``, ...)."""
    return isinstance(error, TimeoutError) or "Timeout" in type(error).__name__


class LlmCallMetrics(BaseCallbackHandler):
    # Called in the event loop, not through a thread pool: it only touches in-process counters.
    run_inline = True

    def __init__(self, provider: str, model: str, tenant: str = metrics.OTHER_TENANT) -> None:
        self.provider = provider
        self.model = model
        self.tenant = tenant
        self._started: dict[UUID, float] = {}

    def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                            **kwargs: Any) -> None:
        self._started[run_id] = time.monotonic()

    def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(run_id, "success")
        input_tokens, output_tokens = reported_usage(response)
        if input_tokens:
            metrics.LLM_TOKENS_TOTAL.labels(self.provider, self.model, "input", self.tenant).inc(input_tokens)
        if output_tokens:
            metrics.LLM_TOKENS_TOTAL.labels(self.provider, self.model, "output", self.tenant).inc(output_tokens)

    def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        self._finish(run_id, "timeout" if is_timeout(error) else "error")

    def _finish(self, run_id: UUID, outcome: str) -> None:
        started = self._started.pop(run_id, None)
        metrics.LLM_REQUESTS_TOTAL.labels(self.provider, self.model, outcome).inc()
        if started is not None:
            metrics.LLM_REQUEST_DURATION.labels(self.provider, self.model).observe(time.monotonic() - started)


def reported_usage(response: LLMResult) -> tuple[int, int]:
    """(input, output) tokens from the message's usage metadata, else the provider's ``token_usage``."""
    for generations in response.generations:
        for generation in generations:
            usage = getattr(getattr(generation, "message", None), "usage_metadata", None)
            if usage:
                return int(usage.get("input_tokens") or 0), int(usage.get("output_tokens") or 0)
    token_usage = (response.llm_output or {}).get("token_usage") or {}
    return int(token_usage.get("prompt_tokens") or 0), int(token_usage.get("completion_tokens") or 0)
