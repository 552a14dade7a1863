"""The supervisor's HTTP port against hostile clients, over real sockets: connections that never finish a
request head are closed on the deadline, busy ones are not, and malformed requests cost one WARNING line."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentworker.health.app import create_app
from agentworker.health.checks import PASS, Check
from agentworker.health.server import HttpServer
from tests.conftest import wait_for
from tests.supervisor_helpers import SupervisorProcess, supervisor_factory

TIMEOUT = 0.5


class Backend:
    """The least a HealthBackend does; ``ready_delay`` makes /ready slow."""

    admin_token: str | None = None
    ready_delay = 0.0

    def liveness_checks(self) -> list[Check]:
        return [Check("loop:turning", PASS)]

    async def readiness_checks(self) -> list[Check]:
        await asyncio.sleep(self.ready_delay)
        return [Check("redis:ping", PASS)]

    def status(self) -> dict[str, Any]:
        return {}

    def metrics(self) -> bytes:
        return b""

    async def reload(self, trigger: str) -> tuple[int, dict[str, Any]]:
        return 200, {}


@pytest.fixture
async def served() -> AsyncIterator[tuple[HttpServer, Backend]]:
    backend = Backend()
    server = HttpServer(create_app(backend), "127.0.0.1", 0, header_timeout=TIMEOUT)
    await server.start()
    try:
        yield server, backend
    finally:
        await server.close()


async def closed_after(reader: asyncio.StreamReader, limit: float) -> float:
    """Seconds until the server closes the connection (reading and dropping what it sends)."""
    started = time.monotonic()
    async with asyncio.timeout(limit):
        while await reader.read(65536):
            pass
    return time.monotonic() - started


async def read_response(reader: asyncio.StreamReader) -> bytes:
    """One whole response (status line, headers, a Content-Length body); returns the status line."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    await reader.readexactly(length)
    return head.split(b"\r\n", 1)[0]


async def test_twenty_half_sent_request_lines_are_closed_on_the_deadline(
        served: tuple[HttpServer, Backend]) -> None:
    server, _backend = served
    connections = [await asyncio.open_connection("127.0.0.1", server.bound_port) for _ in range(20)]
    started = time.monotonic()
    for _reader, writer in connections:
        writer.write(b"GET /hea")
        await writer.drain()
    waited = await asyncio.gather(*(closed_after(reader, 5 * TIMEOUT) for reader, _writer in connections))
    assert min(waited) >= TIMEOUT * 0.8, waited
    assert time.monotonic() - started < TIMEOUT * 2.5, waited
    for _reader, writer in connections:
        writer.close()


async def test_a_header_trickled_byte_by_byte_does_not_extend_the_deadline(
        served: tuple[HttpServer, Backend]) -> None:
    server, _backend = served
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    started = time.monotonic()

    async def trickle() -> None:
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")
        for byte in b"X-Slow: " + b"a" * 1000:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(TIMEOUT / 10)

    sending = asyncio.create_task(trickle())
    try:
        await closed_after(reader, 5 * TIMEOUT)
    finally:
        sending.cancel()
        writer.close()
    assert time.monotonic() - started < TIMEOUT * 2.5


async def test_requests_are_served_and_a_slow_handler_is_not_cut(served: tuple[HttpServer, Backend]) -> None:
    server, backend = served
    backend.ready_delay = TIMEOUT * 3
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert await read_response(reader) == b"HTTP/1.1 200 OK"
    # Kept alive: the next request on the same connection, whose handler outlasts the deadline.
    writer.write(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n")
    async with asyncio.timeout(10):
        assert await read_response(reader) == b"HTTP/1.1 200 OK"
    # Then idle: closed on the deadline after its last response.
    assert await closed_after(reader, 5 * TIMEOUT) < TIMEOUT * 2.5
    writer.close()


async def test_a_malformed_request_is_answered_400_and_logged_in_one_warning_line(
        served: tuple[HttpServer, Backend], caplog: pytest.LogCaptureFixture) -> None:
    server, _backend = served
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    for garbage in (b"GET /health HTTP/1.1\r\nBad Header\r\n\r\n", b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n",
                    b"GET /health HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
        writer.write(garbage)
        status = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        assert status.startswith(b"HTTP/1.1 400") or status.startswith(b"HTTP/1.0 400"), status
        writer.close()
    await wait_for(lambda: len([r for r in caplog.records if r.name == "aiohttp.server"]) >= 3, 5,
                   what="the three log lines")
    lines = [r for r in caplog.records if r.name.startswith("aiohttp")]
    assert len(lines) == 3, [r.getMessage() for r in lines]
    for record in lines:
        assert record.levelno == logging.WARNING and record.exc_info is None
        message = record.getMessage()
        assert message.startswith("malformed HTTP request from 127.0.0.1 refused: ") and "\n" not in message


async def test_a_handler_failure_is_still_an_error_with_its_traceback(
        served: tuple[HttpServer, Backend], caplog: pytest.LogCaptureFixture) -> None:
    server, backend = served

    def broken() -> list[Check]:
        raise RuntimeError("a bug")

    backend.liveness_checks = broken  # type: ignore[method-assign]
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    reader, writer = await asyncio.open_connection("127.0.0.1", server.bound_port)
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)).startswith(b"HTTP/1.1 500")
    writer.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors and errors[0].exc_info is not None


@pytest.fixture
def start_supervisor(redis_url: str, tmp_path: Path) -> Iterator[Callable[..., SupervisorProcess]]:
    yield from supervisor_factory(redis_url, tmp_path)


@pytest.mark.slow
async def test_the_supervisor_port_closes_slow_clients_and_logs_bad_requests_in_one_line(
        quota_file: Path, start_supervisor: Callable[..., SupervisorProcess]) -> None:
    from agentworker.health.server import HEADER_TIMEOUT_S

    sup = start_supervisor(quota_file)
    await sup.wait_up()
    slow = [socket.create_connection(("127.0.0.1", sup.port)) for _ in range(20)]
    started = time.monotonic()
    for sock in slow:
        sock.sendall(b"GET /hea")
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", sup.port), timeout=5) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\n\x00bad\r\n\r\n")
            assert b" 400 " in sock.recv(4096).split(b"\r\n", 1)[0]
    code, _headers, _body = await sup.request("/health")  # served meanwhile
    assert code == 200

    def all_closed() -> bool:
        for sock in slow:
            sock.setblocking(False)
            try:
                if sock.recv(4096) != b"":
                    return False
            except BlockingIOError:
                return False
        return True

    await wait_for(all_closed, HEADER_TIMEOUT_S + 5, what="the 20 slow connections to be closed")
    assert time.monotonic() - started >= HEADER_TIMEOUT_S * 0.8
    for sock in slow:
        sock.close()
    log = sup.log()
    assert log.count("malformed HTTP request from 127.0.0.1 refused") == 5
    assert "Traceback" not in log and "Error handling request" not in log
    warnings = [line for line in log.splitlines() if "malformed HTTP request" in line]
    assert all('"level": "warning"' in line for line in warnings), warnings
