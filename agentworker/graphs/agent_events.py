"""Agent activity as tenant events, read from the agent graph's ``updates`` stream.

Every event's ``data`` starts with the agent's identity (``agent``: ``chat``, ``tool`` or ``step``, and
``conversation_id`` or ``run_id``) and adds:

* ``agent_tool_call``: ``tool``, ``args``, ``call_id`` — the model asked for a tool;
* ``agent_tool_result``: ``tool``, ``call_id``, ``status`` (``success``, ``error`` or ``rejected`` by a
  person), ``output`` (text, cut at 2,000 characters);
* ``agent_message``: ``content`` — the model's answer;
* ``agent_waiting_for_approval``: ``actions`` (``name``, ``args``, ``description`` of each call waiting).
"""

from __future__ import annotations

from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, ToolMessage

from agentworker.tools.registry import EmitFunction

_PREVIEW = 2000
_MODEL_NODE = "model"
_TOOLS_NODE = "tools"


class AgentEvents:
    """Publishes one agent run's activity; remembers what it published so nothing goes out twice."""

    def __init__(self, emit: EmitFunction, identity: dict[str, Any]) -> None:
        self._emit = emit
        self.identity = identity
        self._seen: set[str] = set()

    async def publish(self, event: str, data: dict[str, Any]) -> None:
        await self._emit(event, {**self.identity, **data})

    async def on_update(self, chunk: dict[str, Any]) -> None:
        """One item of ``astream(stream_mode="updates")``."""
        for node, update in chunk.items():
            if node == "__interrupt__":
                for pending in update:
                    await self.publish("agent_waiting_for_approval", {"actions": pending_actions(pending.value)})
                continue
            messages = update.get("messages", []) if isinstance(update, dict) else []
            for message in messages if isinstance(messages, list) else []:
                await self._message(node, message)

    async def _message(self, node: str, message: BaseMessage) -> None:
        key = f"{type(message).__name__}:{message.id or ''}:{getattr(message, 'tool_call_id', '')}"
        if key in self._seen:
            return
        self._seen.add(key)
        if isinstance(message, AIMessage) and node == _MODEL_NODE:
            for call in message.tool_calls:
                await self.publish("agent_tool_call", {"tool": call["name"], "args": call["args"],
                                                       "call_id": call.get("id")})
            if message.text and not message.tool_calls:
                await self.publish("agent_message", {"content": message.text})
        elif isinstance(message, ToolMessage):
            rejected = node != _TOOLS_NODE  # the approval middleware answered in the tool's place
            status = "rejected" if rejected else message.status
            await self.publish("agent_tool_result", {"tool": message.name, "call_id": message.tool_call_id,
                                                     "status": status, "output": message.text[:_PREVIEW]})


def pending_actions(value: Any) -> list[dict[str, Any]]:
    """The tool calls an approval interrupt waits on (HumanInTheLoopMiddleware's batched request)."""
    if not isinstance(value, dict):
        return []
    return [{"name": a.get("name"), "args": a.get("args"), "description": a.get("description")}
            for a in value.get("action_requests", []) if isinstance(a, dict)]
