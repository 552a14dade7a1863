"""Shared pieces of the agent end-to-end tests."""

from __future__ import annotations

from typing import Any

from agentworker.client import AgentWorkerClient
from agentworker.events import Event
from tests.conftest import CRM_TOKENS
from tests.workflow_helpers import collect_events


def model_settings(fake_openai: Any, model: str = "gpt-fake", **extra: Any) -> dict[str, Any]:
    return {"model": f"openai:{model}", "base_url": fake_openai.base_url, "api_key": "sk-fake-key",
            "timeout": 20, "max_retries": 0, **extra}


def smtp_settings(smtp: Any) -> dict[str, Any]:
    return {"host": "127.0.0.1", "port": smtp.port, "security": "none", "from_address": "assistant@acme.example",
            "password": "smtp-secret-xyz", "timeout": 60}


def crm_settings(fake_crm: Any) -> dict[str, Any]:
    return {"base_url": fake_crm.base_url, "token": CRM_TOKENS[0]}


async def agent_events(client: AgentWorkerClient, tenant_id: str, last: str, **match: Any) -> list[Event]:
    """The tenant's agent events up to the first ``last`` event whose data has ``match``."""
    events = await collect_events(client, tenant_id, lambda e: e.event == last and all(
        e.data.get(k) == v for k, v in match.items()), timeout=60)
    return [e for e in events if e.event.startswith("agent_")]
