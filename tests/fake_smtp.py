"""A real SMTP server (aiosmtpd) on loopback that keeps what it receives.

``hold_first`` delays the server's reply to the first message's data by that many seconds, after the
message has been received: the client is then between "the server has the message" and "the client
knows", the window a crash-after-send test needs.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass
from email import message_from_bytes
from email.message import Message
from typing import Any

from aiosmtpd.controller import Controller


@dataclass(frozen=True)
class Received:
    mail_from: str
    rcpt_tos: list[str]
    message: Message


class _Handler:
    def __init__(self, server: SmtpServer) -> None:
        self.server = server

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str,
                          rcpt_options: list[str]) -> str:
        if address in self.server.refuse_once:
            self.server.refuse_once.discard(address)
            return "451 4.3.0 try again later"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        with self.server.lock:
            self.server.received.append(Received(envelope.mail_from, list(envelope.rcpt_tos),
                                                 message_from_bytes(envelope.content)))
            first = len(self.server.received) == 1
        if first and self.server.hold_first:
            await asyncio.sleep(self.server.hold_first)
        return "250 Message accepted for delivery"


class SmtpServer:
    def __init__(self, port: int, *, hold_first: float = 0.0) -> None:
        self.port = port
        self.hold_first = hold_first
        self.received: list[Received] = []
        self.refuse_once: set[str] = set()
        self.lock = threading.Lock()
        self._controller = Controller(_Handler(self), hostname="127.0.0.1", port=port)

    def start(self) -> None:
        self._controller.start()

    def stop(self) -> None:
        self._controller.stop()

    def messages(self) -> list[Received]:
        with self.lock:
            return list(self.received)
