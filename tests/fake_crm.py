"""A small CRM HTTP API (aiohttp) on loopback, speaking the contract of ``agentworker.tools.crm``.

One contact book per bearer token (so two tenants with two tokens see two books); writes with an
``Idempotency-Key`` already seen return the first answer. Every request is recorded.
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

BOOK = web.RequestKey("book", dict)

SEED_CONTACTS = [
    {"id": "c-1", "name": "Ada Lovelace", "email": "ada@example.com", "phone": "+44 1", "company": "Engines"},
    {"id": "c-2", "name": "Alan Turing", "email": "alan@example.com", "phone": "+44 2", "company": "Bletchley"},
]


class FakeCrm:
    def __init__(self, tokens: list[str]) -> None:
        self.books: dict[str, dict[str, dict[str, Any]]] = {
            token: {c["id"]: dict(c) for c in SEED_CONTACTS} for token in tokens}
        self.notes: dict[str, list[dict[str, Any]]] = {}
        self.requests: list[dict[str, Any]] = []
        self._replies: dict[str, Any] = {}
        self.base_url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/api/contacts", self._find)
        app.router.add_post("/api/contacts", self._create)
        app.router.add_get("/api/contacts/{id}", self._get)
        app.router.add_patch("/api/contacts/{id}", self._update)
        app.router.add_post("/api/contacts/{id}/notes", self._note)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.base_url = f"http://127.0.0.1:{port}/api"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        self.requests.append({"method": request.method, "path": request.path, "query": dict(request.query),
                              "token": token, "idempotency_key": request.headers.get("Idempotency-Key")})
        if token not in self.books:
            return web.json_response({"error": "unauthorized"}, status=401)
        request[BOOK] = self.books[token]
        key = request.headers.get("Idempotency-Key")
        if key is not None and (token, key) in self._replies:
            return web.json_response(self._replies[(token, key)])
        response = await handler(request)
        if key is not None and isinstance(response, web.Response) and response.status < 400:
            self._replies[(token, key)] = json.loads(response.text) if response.text else None
        return response

    async def _find(self, request: web.Request) -> web.Response:
        query = request.query.get("query", "").lower()
        found = [c for c in request[BOOK].values()
                 if any(query in str(c.get(k, "")).lower() for k in ("name", "email", "company"))]
        return web.json_response({"contacts": found})

    async def _get(self, request: web.Request) -> web.Response:
        contact = request[BOOK].get(request.match_info["id"])
        return web.json_response(contact) if contact else web.json_response({"error": "not found"}, status=404)

    async def _create(self, request: web.Request) -> web.Response:
        book = request[BOOK]
        contact = {"id": f"c-{len(book) + 1}", **await request.json()}
        book[contact["id"]] = contact
        return web.json_response(contact, status=201)

    async def _update(self, request: web.Request) -> web.Response:
        contact = request[BOOK].get(request.match_info["id"])
        if contact is None:
            return web.json_response({"error": "not found"}, status=404)
        contact.update(await request.json())
        return web.json_response(contact)

    async def _note(self, request: web.Request) -> web.Response:
        contact_id = request.match_info["id"]
        if contact_id not in request[BOOK]:
            return web.json_response({"error": "not found"}, status=404)
        notes = self.notes.setdefault(contact_id, [])
        note = {"id": f"n-{len(notes) + 1}", "contact_id": contact_id, **await request.json()}
        notes.append(note)
        return web.json_response(note, status=201)
