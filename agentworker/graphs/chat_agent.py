"""The chat agent: a conversation with memory, one checkpointed thread per tenant and conversation.

Each turn appends the person's message to thread ``{tenant}:chat:{conversation_id}`` (in PostgreSQL,
so the next turn may run in any worker process) and answers from the whole conversation — trimmed to the
model's context window, newest turns first. It may use the tenant's read-only tools (CRM look-ups,
calendar queries); actions with side effects belong to the tool agent.

A turn is identified by its job: the person's message is stored with the id ``turn-{turn_id}``, so a
retried job finds its turn and continues it (or returns its answer) instead of asking twice.
"""

from __future__ import annotations

from langchain_core.messages import HumanMessage

from agentworker.graphs.agent_events import AgentEvents
from agentworker.graphs.agent_runtime import (
    AgentOutcome,
    agent_config,
    agent_model,
    build_agent,
    drive,
    outcome_of,
)
from agentworker.tools.scope import TenantScope
from agentworker.tools.toolset import open_toolset

CHAT_PROMPT = (
    "You are a helpful assistant in a conversation with a person. Answer their latest message, using what "
    "they said earlier in this conversation. Use your tools to look things up when that helps; keep answers "
    "short.")
MAX_ITERATIONS = 6


def chat_thread(tenant_id: str, conversation_id: str) -> str:
    return f"{tenant_id}:chat:{conversation_id}"


async def run_chat_turn(env: TenantScope, *, conversation_id: str, message: str, turn_id: str) -> AgentOutcome:
    """Answer ``message`` in the conversation; publish the reply and any tool activity as events."""
    if env.checkpoints is None:
        raise RuntimeError("the chat agent needs the checkpoint store")
    chosen = await agent_model(env)
    thread = chat_thread(env.tenant_id, conversation_id)
    events = AgentEvents(env.emit, {"agent": "chat", "conversation_id": conversation_id})
    config = agent_config(thread, MAX_ITERATIONS)
    human_id = f"turn-{turn_id}"
    async with open_toolset(env, run_id=f"chat:{conversation_id}", step_id=f"turn:{turn_id}",
                            read_only=True) as toolset, \
            env.checkpoints.saver(env.tenant_id, thread) as saver:
        agent = build_agent(chosen, toolset, system_prompt=CHAT_PROMPT, checkpointer=saver,
                            max_iterations=MAX_ITERATIONS, approval=False)
        snapshot = await agent.aget_state(config)
        known = any(getattr(m, "id", None) == human_id for m in (snapshot.values or {}).get("messages", []))
        if known and not snapshot.next:
            return outcome_of(snapshot, chosen.spec)  # this turn was answered by an earlier try
        payload = None if known else {"messages": [HumanMessage(content=message, id=human_id)]}
        snapshot = await drive(agent, payload, config, events)
    return outcome_of(snapshot, chosen.spec)
