"""A loopback TCP proxy in front of PostgreSQL that can break the way a restarting server does.

* ``hold_eofs``: the server's last bytes (the FATAL of a terminated backend) reach the client, but the
  server's closing of the connection is held back: the client then has a connection that has read its
  death notice yet still looks open (asyncpg: "cannot switch to state 15; another operation (2) is in
  progress"), the moment a server restart catches some connections in.
* ``silent``: new connections are accepted and never answered (a connect timeout).
* ``close()``: connections are dropped and new ones refused.
"""

from __future__ import annotations

import asyncio
import contextlib


class PostgresProxy:
    def __init__(self, upstream_port: int, *, hold_eofs: bool = False) -> None:
        self.upstream_port = upstream_port
        self.hold_eofs = hold_eofs
        self.silent = False
        #: connections whose server side closed while the client side is kept open
        self.eofs_held = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._release = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened = [writer]
        self._writers.add(writer)
        try:
            if self.silent:
                await self._release.wait()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            opened.append(up_writer)
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer, hold=False),
                                 self._pipe(up_reader, writer, hold=self.hold_eofs))
        except OSError:
            pass
        finally:
            for each in opened:
                self._writers.discard(each)
                each.close()

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, hold: bool) -> None:
        with contextlib.suppress(OSError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        if hold:
            self.eofs_held += 1
            await self._release.wait()
        sink.close()

    async def close(self) -> None:
        """Drop every connection (held ones too) and refuse new ones."""
        self._release.set()
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
