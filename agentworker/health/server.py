"""Serving an aiohttp app on a port: a deadline on request heads, one-line logs for malformed requests.

**Request heads.** A connection must deliver a complete request head (request line and headers) within
:data:`HEADER_TIMEOUT_S` of opening, or of its previous response: otherwise it is closed. Without
this, a peer that sends half a request line, or one header byte a minute, holds a connection (and a
file descriptor) for as long as it likes: aiohttp 3.14.3 and older arm their keep-alive timer only after
a first response, newer ones at connect but with an hour's default. The deadline is
enforced here, through public aiohttp API only, so it holds on every aiohttp the package allows: a
middleware marks connections busy while their request is handled, and a sweep every fraction of the
timeout closes every other connection that has waited longer than the deadline. Request bodies are not
covered: the one handler that reads a body (``PATCH /admin/tenants/{id}``) sets its own size and time
limits (:mod:`agentworker.health.app`).

**Malformed requests** (a bad request line, a header too long, an invalid header: aiohttp's
``HttpProcessingError``) are the client's mistake, answered ``400`` by aiohttp: they are logged as one
WARNING line naming the peer and the problem, not as an ERROR with a traceback. A handler's own
failure stays an ERROR with its traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Middleware

#: seconds a connection may take to send a complete request head (from opening, or from its last response)
HEADER_TIMEOUT_S = 10.0
_MAX_LOGGED_CHARS = 300

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ClientErrorLog(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's server logger, with a malformed request logged as one WARNING line (see the module)."""

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            peer = args[0] if args else "?"
            problem = " ".join(str(exc_info).split())[:_MAX_LOGGED_CHARS]
            self.warning("malformed HTTP request from %s refused: %s", peer, problem)
            return
        super().exception(msg, *args, exc_info=exc_info, **kwargs)


class RequestHeadDeadline:
    """Closes connections that have not delivered a complete request head within ``timeout`` seconds."""

    def __init__(self, timeout: float = HEADER_TIMEOUT_S) -> None:
        if timeout <= 0:
            raise ValueError(f"the request head timeout must be positive, not {timeout!r}")
        self.timeout = timeout
        #: connections whose request is being handled: how many (pipelining may stack two)
        self._busy: dict[web.RequestHandler, int] = {}
        #: loop time since when each other connection has been waiting for a request head
        self._waiting_since: dict[web.RequestHandler, float] = {}
        #: to install (outermost) in the app whose connections :meth:`sweep` watches
        self.middleware = self._make_middleware()

    def _make_middleware(self) -> Middleware:
        @web.middleware
        async def request_head_deadline(request: web.Request, handler: Handler) -> web.StreamResponse:
            # The head has arrived: the deadline is off until this request is answered.
            connection = request.protocol
            self._busy[connection] = self._busy.get(connection, 0) + 1
            try:
                return await handler(request)
            finally:
                left = self._busy.pop(connection, 1) - 1
                if left > 0:
                    self._busy[connection] = left
                else:
                    self._waiting_since[connection] = asyncio.get_running_loop().time()

        return request_head_deadline

    def sweep(self, connections: list[web.RequestHandler], now: float) -> int:
        """Close the connections of ``connections`` past their deadline at loop time ``now``; return how
        many. A connection seen for the first time counts from ``now``."""
        closed = 0
        waiting: dict[web.RequestHandler, float] = {}
        for connection in connections:
            if connection in self._busy:
                continue
            since = self._waiting_since.get(connection, now)
            if now - since >= self.timeout:
                connection.force_close()
                closed += 1
            else:
                waiting[connection] = since
        self._waiting_since = waiting  # forgets connections gone since the last sweep
        return closed

    async def run(self, server: web.Server) -> None:
        """Sweep ``server``'s connections until cancelled."""
        loop = asyncio.get_running_loop()
        interval = min(1.0, self.timeout / 4)
        while True:
            await asyncio.sleep(interval)
            self.sweep(server.connections, loop.time())


class HttpServer:
    """``app`` on ``host:port`` with the request-head deadline and the one-line malformed-request logs.

    ``await start()`` binds the port (raising :class:`OSError` when it cannot); ``await close()`` stops.
    Call it before the app is frozen: it adds its middleware (outermost) to ``app``.
    """

    def __init__(self, app: web.Application, host: str, port: int, *,
                 header_timeout: float = HEADER_TIMEOUT_S) -> None:
        self.host = host
        self.port = port
        self.deadline = RequestHeadDeadline(header_timeout)
        app.middlewares.insert(0, self.deadline.middleware)
        # keepalive_timeout: an idle keep-alive connection is closed on the same deadline (aiohttp's own
        # timer, which newer aiohttp also arms before the first request).
        self.runner = web.AppRunner(app, access_log=None, keepalive_timeout=header_timeout,
                                    logger=ClientErrorLog(logging.getLogger("aiohttp.server"), {}))
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, self.port)
        await site.start()
        assert self.runner.server is not None
        self._sweeper = asyncio.create_task(self.deadline.run(self.runner.server), name="http-head-deadline")

    @property
    def bound_port(self) -> int:
        """The port listened on (what the OS chose when ``port`` was 0)."""
        return int(self.runner.addresses[0][1])

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.runner.cleanup()
