"""A polling source (aiohttp) on loopback speaking the contract of ``agentworker.schedules.sources``.

``GET /feed?cursor=N`` answers the items from offset N (``page_size`` at most) and ``next_cursor`` the
offset after them, or null when that page reaches the end. ``failing`` makes it answer 500. Every
request is recorded (its cursor and Authorization header).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web


class FakeFeed:
    def __init__(self, page_size: int = 2) -> None:
        self.items: list[dict[str, Any]] = []
        self.page_size = page_size
        self.failing = False
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    def add(self, *ids: str) -> None:
        self.items.extend({"id": item_id, "title": f"item {item_id}"} for item_id in ids)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/feed", self._feed)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/feed"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _feed(self, request: web.Request) -> web.Response:
        cursor = request.query.get("cursor")
        self.requests.append({"cursor": cursor, "authorization": request.headers.get("Authorization")})
        if self.failing:
            return web.json_response({"error": "down for maintenance"}, status=500)
        start = int(cursor or 0)
        page = self.items[start:start + self.page_size]
        end = start + len(page)
        return web.json_response({"items": page, "next_cursor": str(end) if end < len(self.items) else None})
