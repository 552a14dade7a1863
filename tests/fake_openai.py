"""A fake OpenAI-compatible chat completions endpoint (aiohttp), scripted, on loopback.

It speaks ``POST /v1/chat/completions`` in both forms the real client uses: one JSON answer, or SSE
chunks (``stream: true``) with ``delta.tool_calls`` and a final usage chunk. Its answers come from a
small deterministic script (:func:`scripted_reply`) that reads the conversation it is sent:

* a routing prompt gets a JSON routing decision ("run X": workflow X, "send": tool, else chat);
* "email <name> ..." looks the contact up with ``crm_find_contacts``, then sends them an email with
  ``send_email``, then says it is done;
* "what is my name" answers from an earlier "my name is X" of the same conversation;
* anything else is echoed back as ``Noted: <message>``.

A model named ``hang`` never answers (until the client gives up). Every request is recorded.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Reply:
    content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def _tool_name(messages: list[dict[str, Any]], call_id: str) -> str:
    for message in messages:
        for call in message.get("tool_calls") or []:
            if call.get("id") == call_id:
                return str(call["function"]["name"])
    return ""


def scripted_reply(body: dict[str, Any]) -> Reply:
    messages: list[dict[str, Any]] = body["messages"]
    tools = {t["function"]["name"] for t in body.get("tools") or []}
    turn = sum(1 for m in messages if m["role"] == "assistant")
    first = _text(messages[0].get("content")) if messages else ""
    if first.startswith("Route the user's message"):
        text = _text(messages[-1]["content"]).lower()
        run = re.search(r"\brun ([\w.-]+)", text)
        if run:
            decision = {"agent": "workflow", "workflow_id": run.group(1), "reason": "asked to run it"}
        elif "send" in text:
            decision = {"agent": "tool", "workflow_id": None, "reason": "asks for an action"}
        else:
            decision = {"agent": "chat", "workflow_id": None, "reason": "conversation"}
        return Reply(content=json.dumps(decision))
    last = messages[-1]
    if last["role"] == "tool":
        name = _tool_name(messages, last["tool_call_id"])
        result = _text(last["content"])
        if name == "crm_find_contacts" and "send_email" in tools:
            contacts = json.loads(result).get("contacts") or []
            if not contacts:
                return Reply(content="I found no such contact.")
            contact = contacts[0]
            return Reply(tool_calls=[{"id": f"call_{turn}", "name": "send_email", "arguments": {
                "to": [contact["email"]], "subject": "Our meeting",
                "body": f"Hello {contact['name']},\n\nsee you on Monday.\n"}}])
        return Reply(content=f"Done: {name} answered.")
    users = [_text(m["content"]) for m in messages if m["role"] == "user"]
    request = users[-1]
    email = re.match(r"email (\w+(?: \w+)?)", request, re.IGNORECASE)
    if email and "crm_find_contacts" in tools:
        return Reply(tool_calls=[{"id": f"call_{turn}", "name": "crm_find_contacts",
                                  "arguments": {"query": email.group(1)}}])
    if "what is my name" in request.lower():
        for earlier in users[:-1]:
            named = re.search(r"my name is (\w+)", earlier, re.IGNORECASE)
            if named:
                return Reply(content=f"Your name is {named.group(1)}.")
        return Reply(content="I do not know your name.")
    return Reply(content=f"Noted: {request}")


class FakeOpenAI:
    """The endpoint's state: requests received (``requests``) and its base URL once started."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        #: one (time served, Authorization header, total tokens reported) per answered request
        self.served: list[tuple[float, str | None, int]] = []
        #: requests being answered now, and the most seen at once, per Authorization header
        self.in_flight: dict[str | None, int] = {}
        self.max_in_flight: dict[str | None, int] = {}
        #: usage from the request's size (characters / 4, like a tokenizer would roughly count) rather than
        #: a fixed 11 tokens a message
        self.usage_by_size = False
        #: seconds a request of the model ``slow`` takes
        self.slow_seconds = 1.5
        self.base_url = ""
        self._runner: web.AppRunner | None = None
        self._release = asyncio.Event()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def stop(self) -> None:
        self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        who = request.headers.get("Authorization")
        self.in_flight[who] = self.in_flight.get(who, 0) + 1
        self.max_in_flight[who] = max(self.max_in_flight.get(who, 0), self.in_flight[who])
        try:
            return await self._answer(request, who)
        finally:
            self.in_flight[who] -= 1

    async def _answer(self, request: web.Request, who: str | None) -> web.StreamResponse:
        body = await request.json()
        self.requests.append({"model": body.get("model"), "stream": bool(body.get("stream")),
                              "messages": body["messages"], "authorization": request.headers.get("Authorization"),
                              "organization": request.headers.get("OpenAI-Organization"),
                              "tools": [t["function"]["name"] for t in body.get("tools") or []]})
        if body.get("model") == "hang":
            await self._release.wait()  # until the test ends
            return web.json_response({"error": {"message": "stopped"}}, status=503)
        if body.get("model") == "slow":
            await asyncio.sleep(self.slow_seconds)
        reply = scripted_reply(body)
        usage = {"prompt_tokens": 11 * len(body["messages"]), "completion_tokens": 7,
                 "total_tokens": 11 * len(body["messages"]) + 7}
        if self.usage_by_size:
            prompt = sum(len(_text(m.get("content"))) // 4 + 4 for m in body["messages"])
            completion = len(reply.content or json.dumps(reply.tool_calls)) // 4 + 1
            usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        self.served.append((time.time(), who, usage["total_tokens"]))
        if body.get("stream"):
            return await self._stream(request, body, reply, usage)
        message: dict[str, Any] = {"role": "assistant", "content": reply.content}
        if reply.tool_calls:
            message["tool_calls"] = [{"id": c["id"], "type": "function", "function": {
                "name": c["name"], "arguments": json.dumps(c["arguments"])}} for c in reply.tool_calls]
        return web.json_response({
            "id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion", "created": int(time.time()),
            "model": body["model"], "usage": usage,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "tool_calls" if reply.tool_calls else "stop"}]})

    async def _stream(self, request: web.Request, body: dict[str, Any], reply: Reply,
                      usage: dict[str, int]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        base = {"id": f"chatcmpl-{len(self.requests)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": body["model"]}

        async def send(choices: list[dict[str, Any]], **extra: Any) -> None:
            await response.write(f"data: {json.dumps({**base, 'choices': choices, **extra})}\n\n".encode())

        await send([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        if reply.content:
            for start in range(0, len(reply.content), 8):  # several content deltas
                await send([{"index": 0, "delta": {"content": reply.content[start:start + 8]},
                             "finish_reason": None}])
        for index, call in enumerate(reply.tool_calls):
            arguments = json.dumps(call["arguments"])
            await send([{"index": 0, "delta": {"tool_calls": [{"index": index, "id": call["id"], "type": "function",
                                                               "function": {"name": call["name"], "arguments": ""}}]},
                         "finish_reason": None}])
            for start in range(0, len(arguments), 10):  # the arguments in pieces, as the real API does
                await send([{"index": 0, "delta": {"tool_calls": [{"index": index, "function": {
                    "arguments": arguments[start:start + 10]}}]}, "finish_reason": None}])
        await send([{"index": 0, "delta": {}, "finish_reason": "tool_calls" if reply.tool_calls else "stop"}])
        if (body.get("stream_options") or {}).get("include_usage"):
            await send([], usage=usage)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response
