"""Real servers on ephemeral loopback ports: the Infobip stand-in upstream and the relay under test."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from relay.app import Relay
from relay.config import Settings
from relay.delivery.clock import Clock
from relay.testing.standin import InfobipStandIn, _StandInSMTP

# Every test's event loop (pytest-asyncio's, and asyncio.run in sync tests) is uvloop, the loop `relay serve` runs
# on; RELAY_TEST_LOOP=asyncio runs them on asyncio's own, the loop of RELAY_EVENT_LOOP=asyncio. Set as the policy,
# which every pytest-asyncio version reads when it makes a loop.
TEST_LOOP = os.environ.get("RELAY_TEST_LOOP", "uvloop")
if TEST_LOOP == "uvloop":
    import uvloop

    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
elif TEST_LOOP != "asyncio":
    raise pytest.UsageError(f"RELAY_TEST_LOOP={TEST_LOOP!r}: expected 'asyncio' or 'uvloop'")


def relay_settings(standin: InfobipStandIn, **sections: Any) -> Settings:
    """Settings pointing at the stand-in; `sections` update the defaults section by section."""
    base: dict[str, dict[str, Any]] = {
        "listen": {"host": "127.0.0.1", "port": 0, "hostname": "relay.test", "timeout": 10},
        "upstream": {
            "host": "localhost",
            "port": standin.port,
            "username": standin.username,
            "password": standin.password,
            "ca_file": str(standin.ca_file),
            "pool_size": 4,
            "connect_timeout": 5,
            "command_timeout": 5,
            "data_timeout": 10,
        },
        "spool": {"enabled": False},
        "http": {"host": "127.0.0.1", "port": 0},
        "policy": {"alignment": "reject"},
    }
    for name, values in sections.items():
        if isinstance(values, list):  # [[profiles]]: a list of tables, given whole
            base[name] = values
        else:
            base.setdefault(name, {}).update(values)
    return Settings(**base)


@pytest.fixture
async def standin() -> AsyncIterator[InfobipStandIn]:
    server = InfobipStandIn()
    await server.start()
    yield server
    await server.stop()


StartRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def start_relay(standin: InfobipStandIn) -> AsyncIterator[StartRelay]:
    started: list[Relay] = []

    async def start(clock: Clock | None = None, **sections: Any) -> Relay:
        relay = Relay(relay_settings(standin, **sections), clock)
        await relay.start()
        started.append(relay)
        return relay

    yield start
    for relay in started:
        await relay.stop()


class Dialog:
    """A raw SMTP client: send exact lines, read exact replies (no client library in the way)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1", local_addr: str | None = None) -> Dialog:
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(local_addr, 0) if local_addr else None, limit=2**22
        )
        return cls(reader, writer)

    async def reply(self) -> str:
        """One whole reply; multi-line replies joined with newlines."""
        lines = []
        while True:
            line = (await asyncio.wait_for(self.reader.readline(), 10)).decode()
            if not line:
                raise ConnectionError("closed: " + "\n".join(lines))
            lines.append(line.rstrip("\r\n"))
            if line[3:4] != "-":
                return "\n".join(lines)

    async def send(self, line: str | bytes) -> str:
        self.writer.write(line if isinstance(line, bytes) else line.encode() + b"\r\n")
        return await self.reply()

    async def hello(self) -> str:
        await self.reply()
        return await self.send("EHLO app.test")

    async def mail(self, sender: str, recipients: list[str], data: bytes) -> str:
        """A whole transaction; `data` is the message with CRLF endings, not yet dot-stuffed."""
        assert (await self.send(f"MAIL FROM:<{sender}>")).startswith("250")
        for rcpt in recipients:
            assert (await self.send(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await self.send("DATA")).startswith("354")
        stuffed = b"\r\n".join(b"." + line if line.startswith(b".") else line for line in data.split(b"\r\n"))
        return await self.send(stuffed + b".\r\n")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()


def message(
    sender: str = "billing@erp.example.com",
    to: str = "customer@example.org",
    body: bytes = b"Hello.\r\n",
    **headers: str,
) -> bytes:
    lines = [f"From: ERP <{sender}>", f"To: <{to}>", "Subject: Invoice 42"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def free_port() -> int:
    """A loopback port for a relay started as its own process (the OS picks, we pass it on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def record_wire(monkeypatch: pytest.MonkeyPatch) -> dict[int, bytearray]:
    """Stand-in connection ident -> every byte the relay wrote to it (after TLS decryption)."""
    wire: dict[int, bytearray] = collections.defaultdict(bytearray)
    original = _StandInSMTP.data_received

    def recording(self: _StandInSMTP, data: bytes) -> None:
        wire[self.record.ident] += data
        original(self, data)

    monkeypatch.setattr(_StandInSMTP, "data_received", recording)
    return wire
