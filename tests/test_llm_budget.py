"""Tenant LLM budgets against a real Redis and PostgreSQL (agentworker.llm_budget): the token window,
the concurrency slots, the usage table; the end-to-end checks are in test_llm_budget_e2e.py."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import pytest
from redis.asyncio import Redis

from agentworker import keys
from agentworker import llm_budget as budget_module
from agentworker.config import ConfigError, TenantLimits, TokenBudget, parse_config
from agentworker.db import Database
from agentworker.llm_budget import LlmBudget, LlmBudgetExhausted, LlmCallTooLarge, read_usage
from tests.conftest import new_tenant


def _budget(redis: Redis, tenant: str, database: Database | None = None,
            **limits: Any) -> tuple[LlmBudget, list[Any]]:
    events: list[Any] = []

    async def emit(event: str, data: dict[str, Any]) -> None:
        events.append((event, data))

    async def db() -> Database:
        assert database is not None
        return database

    current = TenantLimits(**limits)
    return LlmBudget(redis, tenant, lambda: current, database=db if database is not None else None,
                     emit=emit), events


def test_the_quota_keys_are_validated_like_the_others() -> None:
    assert TokenBudget.parse("200000/h") == TokenBudget(200_000, 3600)
    assert str(TokenBudget.parse("50000 / m")) == "50000/m"
    with pytest.raises(ConfigError) as refused:
        parse_config({"pools": {"standard": {}}, "tenant_defaults": {"llm_tokens": "lots", "llm_concurrency": 0},
                      "tenants": {"acme": {"llm_tokens": "100/s"}}})
    assert sorted(refused.value.errors) == [
        "tenant_defaults.llm_concurrency: must be >= 1 (got 0)",
        "tenant_defaults.llm_tokens: must look like 50000/m, 200000/h or 2000000/d",
        "tenants.acme.llm_tokens: must look like 50000/m, 200000/h or 2000000/d",
    ]


async def test_reservations_stay_within_the_window_and_settle_to_the_reported_usage(redis: Redis) -> None:
    tenant = new_tenant("tokens")
    budget, events = _budget(redis, tenant, llm_tokens="1000/m")
    first = await budget.begin("m", 300, 200)  # 500 reserved
    second = await budget.begin("m", 200, 100)  # 800
    with pytest.raises(LlmBudgetExhausted) as exhausted:
        await budget.begin("m", 250, None)  # 250 + 256 does not fit
    assert 59 <= exhausted.value.retry_after_s <= 60
    assert "over its llm_tokens budget of 1000/m" in str(exhausted.value)
    await first.end((120, 30))  # 500 -> 150: room again
    third = await budget.begin("m", 250, None)
    assert int(await redis.get(keys.llm_token_total(tenant))) == 150 + 300 + 506
    await second.end(None)  # nothing reported: its estimate stays
    await third.end(None, failed=True)  # failed: used nothing
    assert int(await redis.get(keys.llm_token_total(tenant))) == 150 + 300
    for _ in range(3):
        with pytest.raises(LlmBudgetExhausted):
            await budget.begin("m", 500, 100)
    assert [e for e, _ in events] == ["tenant_llm_budget_exhausted"]  # once per window
    assert events[0][1]["budget"] == "1000/m"


async def test_a_call_that_can_never_fit_fails_with_one_sentence(redis: Redis) -> None:
    budget, _ = _budget(redis, new_tenant("huge"), llm_tokens="500/m")
    with pytest.raises(LlmCallTooLarge, match=r"can never fit tenant '.*''s llm_tokens budget of 500/m"):
        await budget.begin("m", 400, 200)


async def test_concurrency_slots_are_shared_and_a_dead_holders_slot_lapses(
        redis: Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(budget_module, "SLOT_TTL_S", 1.0)
    tenant = new_tenant("slots")
    budget, _ = _budget(redis, tenant, llm_concurrency=2)
    a = await budget.begin("m", 10, 10)
    b = await budget.begin("m", 10, 10)
    third = asyncio.create_task(budget.begin("m", 10, 10))
    await asyncio.sleep(0.3)
    assert not third.done()  # waits for a slot
    await a.end((1, 1))
    c = await asyncio.wait_for(third, 5)
    assert await redis.zcard(keys.llm_slots(tenant)) == 2
    # a holder that dies: its renewal stops and its lease lapses
    assert b._renewing is not None
    b._renewing.cancel()
    b._ended = True  # as if its process were gone: it never gives the slot back
    fourth = asyncio.create_task(budget.begin("m", 10, 10))
    d = await asyncio.wait_for(fourth, 5)
    await c.end((1, 1))
    await d.end((1, 1))
    assert await redis.zcard(keys.llm_slots(tenant)) == 0


async def test_usage_is_recorded_per_tenant_model_and_day_and_isolated(redis: Redis, database: Database) -> None:
    tenant, other = new_tenant("usage"), new_tenant("usage")
    budget, _ = _budget(redis, tenant, database)
    for prompt, completion in ((100, 20), (50, 5)):
        call = await budget.begin("openai:gpt-x", prompt, 64)
        await call.end((prompt, completion))
    call = await budget.begin("offline", 30, None)
    await call.end(None)
    today = datetime.now(UTC).date()
    rows = {u.model: u for u in await read_usage(database, tenant, since=today, until=today)}
    assert (rows["openai:gpt-x"].prompt_tokens, rows["openai:gpt-x"].completion_tokens) == (150, 25)
    assert rows["openai:gpt-x"].calls == 2 and rows["openai:gpt-x"].estimated_calls == 0
    assert rows["offline"].total_tokens == 30 + 256 and rows["offline"].estimated_calls == 1
    assert await read_usage(database, other) == []


async def test_a_limit_change_applies_at_the_next_call(redis: Redis) -> None:
    tenant = new_tenant("live")
    limits = {"current": TenantLimits(llm_tokens="300/m")}
    budget = LlmBudget(redis, tenant, lambda: limits["current"])
    await (await budget.begin("m", 100, 100)).end(None)
    with pytest.raises(LlmBudgetExhausted):
        await budget.begin("m", 100, 100)
    limits["current"] = TenantLimits(llm_tokens="1000/m")
    await (await budget.begin("m", 100, 100)).end(None)
