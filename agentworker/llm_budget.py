"""Tenant LLM budgets: model tokens per window and model calls in flight, as quotas.

Two keys of the quota file (per tenant, per plan, in ``tenant_defaults``, or stored overrides):

* ``llm_tokens: 200000/h`` (``/m``, ``/h``, ``/d``): the tokens (prompt and completion) a tenant's model
  calls may use in any window of that length (a sliding window, not a calendar hour);
* ``llm_concurrency: 2``: the tenant's model calls in flight at once, across every process and host.

Every model call of a job (workflow ``llm`` steps, the chat and tool agents, the router) is made by a
model from :func:`agentworker.graphs.agent_runtime.agent_model`, which attaches this budget as a
LangChain callback. Before the call, :meth:`LlmBudget.begin` reserves an estimate — the prompt's
(four characters a token, plus a few per message) plus the call's ``max_tokens``, or
:data:`DEFAULT_COMPLETION_TOKENS` when the call sets none — and takes a concurrency slot, waiting for one
(a slot is a lease of :data:`SLOT_TTL_S`, renewed while the call runs, so a killed worker's slot comes
back within that time). After it, :meth:`LlmCall.end` replaces the estimate by the provider's reported
usage (the estimate stays when none is reported; 0 for a call that failed) and records the usage in
PostgreSQL (``agentworker.llm_usage``: tokens per tenant, model and day, under row-level security),
which ``client.llm_usage`` reads.

Counting is atomic in Redis (``lua/llm_tokens.lua``, ``lua/llm_slots.lua``), so it holds across
processes and replicas. Limits are read at each call, so a reload or a tenant-store change applies at
the next call.

**A tenant over its budget waits; it does not fail.** A call whose estimate does not fit raises
:class:`LlmBudgetExhausted` (a :class:`~agentworker.jobs.JobDeferred`): the job goes back to its queue,
due when enough of the window's tokens have aged out, without spending a try, and the tenant gets one
``tenant_llm_budget_exhausted`` event per window. Work done before the call is kept (workflow steps and
agent turns are checkpointed). A call that can never fit — its estimate alone is over the whole budget —
raises :class:`LlmCallTooLarge`, one sentence, and fails its step or agent run.

Accuracy: the window holds reservations, settled to the reported usage when the call returns, so the
tokens of any window stay within the budget plus the excess of calls that used more than their estimate
(a call without ``max_tokens`` that answers more than :data:`DEFAULT_COMPLETION_TOKENS`); an estimate far
above the real use only makes a tenant wait early, until its calls settle.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from agentworker import keys, metrics
from agentworker.config import TenantLimits
from agentworker.db.database import Database, DatabaseError
from agentworker.errors import AgentWorkerError
from agentworker.job_leases import holder_id, lua_source
from agentworker.jobs import JobDeferred
from agentworker.logs import get_logger

__all__ = [
    "DEFAULT_COMPLETION_TOKENS", "SLOT_TTL_S", "LlmBudget", "LlmBudgetExhausted", "LlmCall", "LlmCallTooLarge",
    "LlmUsage", "estimate_prompt_tokens", "read_usage",
]

log = get_logger("agentworker.llm_budget")

#: the completion tokens reserved for a call that sets no ``max_tokens``
DEFAULT_COMPLETION_TOKENS = 256
#: a concurrency slot's lease; renewed every third of it while the call runs
SLOT_TTL_S = 15.0
#: a wait for a free slot polls this often at first (then up to 4 times slower, with jitter)
SLOT_POLL_S = 0.05
_CHARS_PER_TOKEN = 4
_TOKENS_PER_MESSAGE = 4


class LlmBudgetExhausted(JobDeferred):
    """The tenant's token budget has no room for this call now: the job waits (no try spent)."""

    def __init__(self, tenant_id: str, budget: str, retry_after_s: float) -> None:
        self.tenant_id = tenant_id
        self.budget = budget
        super().__init__(f"tenant {tenant_id!r} is over its llm_tokens budget of {budget}; the job waits "
                         f"{retry_after_s:.1f}s for room", retry_after_s, reason="llm_budget")


class LlmCallTooLarge(AgentWorkerError, ValueError):
    """A model call whose estimate alone is over the tenant's whole token budget: it can never run."""


def estimate_prompt_tokens(messages: list[Any]) -> int:
    """Four characters a token plus a few per message: the same estimate as the agents' context window."""
    total = 0
    for message in messages:
        text = getattr(message, "text", None)
        size = len(text if isinstance(text, str) else str(getattr(message, "content", message)))
        for call in getattr(message, "tool_calls", None) or []:
            size += len(str(call.get("args")))
        total += _TOKENS_PER_MESSAGE + size // _CHARS_PER_TOKEN
    return total


@dataclass(frozen=True, slots=True)
class LlmUsage:
    """Tokens of one tenant, model and day (UTC), as recorded after each call."""

    day: date
    model: str
    prompt_tokens: int
    completion_tokens: int
    calls: int
    #: calls whose provider reported no usage (their estimate was recorded)
    estimated_calls: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_json(self) -> dict[str, Any]:
        return {"day": self.day.isoformat(), "model": self.model, "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens, "total_tokens": self.total_tokens,
                "calls": self.calls, "estimated_calls": self.estimated_calls}


@dataclass
class LlmCall:
    """One model call's reservation and slot (:meth:`LlmBudget.begin`); :meth:`end` settles it once."""

    budget: LlmBudget
    call_id: str
    model: str
    estimate: int
    token_window_ms: int | None
    slot: bool
    _renewing: asyncio.Task[None] | None = None
    _ended: bool = False

    async def end(self, usage: tuple[int, int] | None, *, failed: bool = False) -> None:
        """Settle with the reported ``(prompt, completion)`` tokens (None: none reported: the estimate
        stays, recorded as such; ``failed``: the call used nothing), give the slot back, record the usage."""
        if self._ended:
            return
        self._ended = True
        if self._renewing is not None:
            self._renewing.cancel()
        budget = self.budget
        estimated = usage is None and not failed
        prompt, completion = (0, 0) if failed else usage if usage is not None else (self.estimate, 0)
        try:
            if self.token_window_ms is not None:
                reply = await budget._tokens(
                    keys=budget._token_keys(), args=["settle", self.call_id, prompt + completion, 0,
                                                      self.token_window_ms])
                budget._gauge(int(reply[1]))
            if self.slot:
                await budget._slots(keys=[keys.llm_slots(budget.tenant_id)],
                                    args=["release", self.call_id, 0, 0])
        except (RedisError, OSError) as exc:  # the reservation ages out; the slot's lease lapses
            log.warning("model call not settled in Redis", tenant_id=budget.tenant_id, error=str(exc))
        if prompt or completion or estimated:
            await budget.record(self.model, prompt, completion, estimated=estimated)


@dataclass
class LlmBudget:
    """One tenant's budget for one job: its current limits, its Redis counters, its usage table."""

    redis: Redis
    tenant_id: str
    #: the tenant's effective limits now (read at each call: reloads and store changes apply at once)
    limits: Callable[[], TenantLimits]
    database: Callable[[], Awaitable[Database]] | None = None
    #: publishes an event of the tenant (best effort)
    emit: Callable[[str, dict[str, Any]], Awaitable[None]] | None = None
    #: the ``tenant`` label of the metrics (the tenant for one the quota file names, else ``other``)
    metric_tenant: str = metrics.OTHER_TENANT

    def __post_init__(self) -> None:
        self._tokens = self.redis.register_script(lua_source("llm_tokens"))
        self._slots = self.redis.register_script(lua_source("llm_slots"))

    def _token_keys(self) -> list[str]:
        return [keys.llm_token_log(self.tenant_id), keys.llm_token_amounts(self.tenant_id),
                keys.llm_token_total(self.tenant_id), keys.llm_budget_exhausted(self.tenant_id)]

    def _gauge(self, used: int) -> None:
        budget = self.limits().token_budget
        if budget is not None and self.metric_tenant != metrics.OTHER_TENANT:
            metrics.LLM_BUDGET_REMAINING.labels(self.metric_tenant).set(max(0, budget.tokens - used))

    async def begin(self, model: str, prompt_tokens: int, max_tokens: int | None) -> LlmCall:
        """Reserve the call's estimate and take a slot (waiting for one); raise
        :class:`LlmBudgetExhausted` when the window has no room, :class:`LlmCallTooLarge` when it never
        will."""
        limits = self.limits()
        budget = limits.token_budget
        completion = max_tokens if max_tokens and max_tokens > 0 else DEFAULT_COMPLETION_TOKENS
        estimate = prompt_tokens + completion
        # the holder in the id says which process holds a slot (what an operator and the tests read)
        call = LlmCall(self, f"{holder_id()}:{uuid.uuid4().hex}", model, estimate, None, False)
        if budget is not None:
            if estimate > budget.tokens:
                raise LlmCallTooLarge(
                    f"a model call of about {estimate} tokens ({prompt_tokens} of prompt, {completion} of "
                    f"completion) can never fit tenant {self.tenant_id!r}'s llm_tokens budget of {budget}")
            window_ms = budget.window_s * 1000
            reply = await self._tokens(keys=self._token_keys(),
                                       args=["reserve", call.call_id, estimate, budget.tokens, window_ms])
            if int(reply[0]) == 0:
                await self._exhausted(str(budget), int(reply[1]) / 1000, first=bool(int(reply[2])),
                                      used=int(reply[3]))
            call.token_window_ms = window_ms
            self._gauge(int(reply[1]))
        if limits.llm_concurrency is not None:
            try:
                await self._take_slot(call.call_id, limits.llm_concurrency)
            except BaseException:
                await call.end(None, failed=True)
                raise
            call.slot = True
            call._renewing = asyncio.create_task(self._renew(call.call_id))
        return call

    async def _exhausted(self, budget: str, retry_after_s: float, *, first: bool, used: int) -> None:
        metrics.LLM_BUDGET_EXHAUSTED.labels(self.metric_tenant).inc()
        if first:
            log.info("tenant llm budget exhausted; its jobs wait", tenant_id=self.tenant_id, budget=budget,
                     used=used, retry_after_s=round(retry_after_s, 3))
            if self.emit is not None:
                await self.emit("tenant_llm_budget_exhausted", {
                    "budget": budget, "used": used, "retry_after": round(retry_after_s, 3)})
        raise LlmBudgetExhausted(self.tenant_id, budget, retry_after_s)

    async def _take_slot(self, call_id: str, limit: int) -> None:
        ttl_ms = int(SLOT_TTL_S * 1000)
        pause = SLOT_POLL_S
        waited_since = time.monotonic()
        while not int(await self._slots(keys=[keys.llm_slots(self.tenant_id)],
                                        args=["acquire", call_id, limit, ttl_ms])):
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 1.5, SLOT_POLL_S * 4)
        waited = time.monotonic() - waited_since
        if waited > 0.001:
            metrics.LLM_SLOT_WAIT.labels(self.metric_tenant).observe(waited)

    async def _renew(self, call_id: str) -> None:
        ttl_ms = int(SLOT_TTL_S * 1000)
        while True:
            await asyncio.sleep(SLOT_TTL_S / 3)
            with contextlib.suppress(RedisError, OSError):
                await self._slots(keys=[keys.llm_slots(self.tenant_id)], args=["renew", call_id, 0, ttl_ms])

    async def record(self, model: str, prompt: int, completion: int, *, estimated: bool) -> None:
        """Add a call's tokens to the tenant's usage of today (UTC). A database error is logged: the call
        happened, and failing the job for its bookkeeping would only make it call again."""
        if self.database is None:
            return
        try:
            database = await self.database()
            async with database.tenant(self.tenant_id) as tx:
                await tx.execute(
                    "INSERT INTO agentworker.llm_usage AS u (tenant_id, day, model, prompt_tokens, "
                    "completion_tokens, calls, estimated_calls) VALUES ($1, $2, $3, $4, $5, 1, $6) "
                    "ON CONFLICT (tenant_id, day, model) DO UPDATE SET "
                    "prompt_tokens = u.prompt_tokens + EXCLUDED.prompt_tokens, "
                    "completion_tokens = u.completion_tokens + EXCLUDED.completion_tokens, "
                    "calls = u.calls + 1, estimated_calls = u.estimated_calls + EXCLUDED.estimated_calls",
                    self.tenant_id, datetime.now(UTC).date(), model[:200], prompt, completion, int(estimated))
        except (DatabaseError, OSError) as exc:
            log.warning("model usage not recorded", tenant_id=self.tenant_id, model=model, prompt_tokens=prompt,
                        completion_tokens=completion, error=str(exc))


async def read_usage(database: Database, tenant_id: str, *, since: date | None = None,
                     until: date | None = None) -> list[LlmUsage]:
    """The tenant's recorded usage per day and model, ``since`` to ``until`` (both days included, UTC)."""
    async with database.tenant(tenant_id) as tx:
        rows = await tx.fetch(
            "SELECT day, model, prompt_tokens, completion_tokens, calls, estimated_calls "
            "FROM agentworker.llm_usage WHERE tenant_id = $1 AND ($2::date IS NULL OR day >= $2) "
            "AND ($3::date IS NULL OR day <= $3) ORDER BY day, model", tenant_id, since, until)
    return [LlmUsage(r["day"], r["model"], int(r["prompt_tokens"]), int(r["completion_tokens"]), int(r["calls"]),
                     int(r["estimated_calls"])) for r in rows]
