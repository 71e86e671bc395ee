"""A mail server that keeps what it is sent: the company server bounces go to, in the tests and the demo.

An aiosmtpd server in the caller's own event loop on a loopback port. `refuse` holds replies for the
next RCPTs (a 4xx or 5xx), so tests can make it refuse without a mock.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass(frozen=True)
class SunkMessage:
    mail_from: str  # "" for the null sender, as a bounce's MAIL FROM:<>
    rcpt_tos: list[str]
    data: bytes


@dataclass
class MailSink:
    hostname: str = "mail.company.test"
    on_message: Callable[[SunkMessage], None] | None = None
    messages: list[SunkMessage] = field(default_factory=list)
    refuse: deque[str] = field(default_factory=deque)  # replies to the next RCPTs instead of 250
    port: int = 0
    _server: asyncio.Server | None = None
    _arrived: asyncio.Condition | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self, hostname=self.hostname, timeout=30), host, port or self.port
        )
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    def _condition(self) -> asyncio.Condition:
        if self._arrived is None:
            self._arrived = asyncio.Condition()
        return self._arrived

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[SunkMessage]:
        condition = self._condition()
        async with condition:
            await asyncio.wait_for(condition.wait_for(lambda: len(self.messages) >= count), timeout)
        return self.messages

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.refuse:
            return self.refuse.popleft()
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        sender = "" if envelope.mail_from in (None, "<>") else envelope.mail_from
        message = SunkMessage(sender, list(envelope.rcpt_tos), bytes(envelope.original_content))
        condition = self._condition()
        async with condition:
            self.messages.append(message)
            condition.notify_all()
        if self.on_message is not None:
            self.on_message(message)
        return "250 2.0.0 Accepted"
