"""The tenant's LLM budget on every call of a model: a LangChain callback (:mod:`agentworker.llm_budget`).

Attached by :func:`agentworker.graphs.agent_runtime.agent_model`, the one place a job's models are made.
``on_chat_model_start`` runs before the request is sent and may raise (``raise_error``): a budget with no
room raises :class:`~agentworker.llm_budget.LlmBudgetExhausted` there, and the request is never sent.
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.outputs import LLMResult

from agentworker.graphs.model_metrics import reported_usage
from agentworker.llm_budget import LlmBudget, LlmCall, estimate_prompt_tokens
from agentworker.logs import get_logger

log = get_logger("agentworker.llm_budget")


class LlmBudgetCallback(AsyncCallbackHandler):
    """Reserves before each call of the model it is attached to and settles after."""

    raise_error = True

    def __init__(self, budget: LlmBudget, model: str) -> None:
        self.budget = budget
        self.model = model
        self._calls: dict[UUID, LlmCall] = {}

    async def on_chat_model_start(self, serialized: dict[str, Any], messages: list[list[Any]], *, run_id: UUID,
                                  **kwargs: Any) -> None:
        params = kwargs.get("invocation_params") or {}
        max_tokens = params.get("max_tokens") or params.get("max_completion_tokens")
        prompt = sum(estimate_prompt_tokens(list(batch)) for batch in messages)
        self._calls[run_id] = await self.budget.begin(
            self.model, prompt, int(max_tokens) if isinstance(max_tokens, int) else None)

    async def on_llm_end(self, response: LLMResult, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._calls.pop(run_id, None)
        if call is None:
            return
        prompt, completion = reported_usage(response)
        try:
            await call.end((prompt, completion) if prompt or completion else None)
        except Exception as exc:  # the call succeeded: its bookkeeping must not fail it
            log.exception("model call not settled", tenant_id=self.budget.tenant_id, error=repr(exc))

    async def on_llm_error(self, error: BaseException, *, run_id: UUID, **kwargs: Any) -> None:
        call = self._calls.pop(run_id, None)
        if call is None:
            return
        try:
            await call.end(None, failed=True)
        except Exception as exc:
            log.exception("failed model call not settled", tenant_id=self.budget.tenant_id, error=repr(exc))
