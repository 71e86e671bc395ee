"""The load client: N concurrent SMTP sessions, each reusing its connection and pipelining.

Per message one flight `MAIL, RCPT..., DATA` (RFC 2920: DATA ends a group), the replies, then the
body and the final dot, then the final reply: two round trips. With `tls` the session does
STARTTLS + AUTH PLAIN first (the ceiling run talks to the upstream directly, as the relay does).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field

SENDER = "billing@erp.example.com"
IB_HEADERS = b'X-IB-Tracking-Url: https://hooks.example.com/ib/track\r\nX-IB-Callback-Data: {"app":"bench"}\r\n'
_FILLER = b"Dear customer, please find attached the invoice for your order. Payment is due within 30 days.\r\n"


class SmtpError(Exception):
    pass


@dataclass
class Tls:
    ca_file: str
    username: str
    password: str
    server_hostname: str = "localhost"


@dataclass
class Load:
    host: str
    port: int
    clients: int
    messages: int  # per client, timed
    warmup: int = 2  # per client, untimed, before everyone starts together
    recipients: int = 1
    body_size: int = 600  # bytes of body after the headers
    with_ib_headers: bool = False  # the ceiling client sends what the relay would have sent
    tls: Tls | None = None
    ehlo: str = "app.bench.test"
    timeout: float = 120.0
    # Client i sends as senders[i % len(senders)] (envelope and aligned From): e.g. one sender domain per
    # profile, so a relay with [[profiles]] matched by sender_domain shares the load among them.
    senders: tuple[str, ...] = (SENDER,)


@dataclass
class LoadResult:
    started: float = 0.0  # monotonic: first timed send
    finished: float = 0.0  # monotonic: last timed final reply
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)
    replies: dict[str, int] = field(default_factory=dict)


def body(size: int) -> bytes:
    """Plain text lines (CRLF), about `size` bytes; no line starts with a dot."""
    reps = max(1, size // len(_FILLER))
    return _FILLER * reps


def one_sender_per_domain(count: int) -> tuple[str, ...]:
    """`count` senders, one per domain (app0.example.com, ...), each as long as the next (same bytes per message)."""
    return tuple(f"billing@app{i}.example.com" for i in range(count))


def message_bytes(tag: str, recipients: list[str], payload: bytes, *, ib_headers: bool, sender: str = SENDER) -> bytes:
    to = recipients[0] if len(recipients) == 1 else "undisclosed-recipients:;"
    head = (
        f"From: ERP Billing <{sender}>\r\n"  # aligned with the envelope sender (the bench's policy rejects others)
        f"To: {to}\r\n"
        f"Subject: Invoice {tag}\r\n"
        f"Message-ID: <{tag}@bench.erp.example.com>\r\n"
        f"Date: Mon, 03 Jun 2024 10:00:00 +0000\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
    ).encode()
    return (IB_HEADERS if ib_headers else b"") + head + b"\r\n" + payload


def recipient_list(client: int, count: int) -> list[str]:
    return [f"customer{client}.{i}@example.org" for i in range(count)]


class Session:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float) -> None:
        self.reader = reader
        self.writer = writer
        self.timeout = timeout

    @classmethod
    async def open(cls, load: Load) -> Session:
        reader, writer = await asyncio.open_connection(load.host, load.port, limit=1 << 20)
        session = cls(reader, writer, load.timeout)
        await session.expect(220)
        await session.command(f"EHLO {load.ehlo}", 250)
        if load.tls is not None:
            await session.command("STARTTLS", 220)
            context = ssl.create_default_context(cafile=load.tls.ca_file)
            await writer.start_tls(context, server_hostname=load.tls.server_hostname)
            await session.command(f"EHLO {load.ehlo}", 250)
            token = base64.b64encode(f"\0{load.tls.username}\0{load.tls.password}".encode()).decode()
            await session.command(f"AUTH PLAIN {token}", 235)
        return session

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readuntil(b"\n"), self.timeout)
            lines.append(line)
            if line[3:4] != b"-":
                return int(line[:3]), b"".join(lines).decode(errors="replace").rstrip()

    async def expect(self, code: int) -> str:
        got, text = await self.reply()
        if got != code:
            raise SmtpError(f"expected {code}, got {text!r}")
        return text

    async def command(self, line: str, code: int) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.expect(code)

    async def send(self, sender: str, recipients: list[str], data: bytes) -> tuple[int, str]:
        """One pipelined transaction; `data` must not need dot-stuffing and must end with CRLF."""
        flight = [f"MAIL FROM:<{sender}>\r\n"]
        flight.extend(f"RCPT TO:<{r}>\r\n" for r in recipients)
        flight.append("DATA\r\n")
        self.writer.write("".join(flight).encode())
        mail = await self.reply()
        rcpts = [await self.reply() for _ in recipients]
        data_reply = await self.reply()
        if data_reply[0] != 354:
            if mail[0] != 250:
                return mail
            return next((r for r in rcpts if r[0] >= 400), data_reply)
        self.writer.write(data)
        self.writer.write(b".\r\n")
        if len(data) > 1 << 20:
            await self.writer.drain()
        return await self.reply()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reader.read(1024), 2)
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


async def run_load(load: Load, *, on_warm: Callable[[], object] | None = None) -> LoadResult:
    """Open `clients` sessions, warm each up, then start the timed messages together."""
    result = LoadResult()
    payload = body(load.body_size)
    go = asyncio.Event()
    warm = 0
    all_warm = asyncio.Event()

    async def client(index: int) -> None:
        nonlocal warm
        recipients = recipient_list(index, load.recipients)
        sender = load.senders[index % len(load.senders)]
        session: Session | None = None
        try:
            session = await Session.open(load)
            for i in range(load.warmup):  # one recipient: warms the connections, not the recipient path
                tag = f"w{index}.{i}.{time.time_ns()}"
                data = message_bytes(tag, recipients[:1], payload, ib_headers=load.with_ib_headers, sender=sender)
                code, text = await session.send(sender, recipients[:1], data)
                if code != 250:
                    raise SmtpError(f"warm-up refused: {text}")
        except Exception as exc:
            result.errors.append(f"client {index} setup: {type(exc).__name__}: {exc}")
        finally:
            warm += 1
            if warm == load.clients:
                all_warm.set()
        await go.wait()
        if session is None:
            result.failed += load.messages
            return
        try:
            for i in range(load.messages):
                tag = f"m{index}.{i}.{time.time_ns()}"
                data = message_bytes(tag, recipients, payload, ib_headers=load.with_ib_headers, sender=sender)
                started = time.monotonic()
                code, text = await session.send(sender, recipients, data)
                done = time.monotonic()
                result.finished = max(result.finished, done)
                first = text.split("\n")[-1][4:].split(" ", 2)
                key = f"{code} {first[0] if first else ''}"
                result.replies[key] = result.replies.get(key, 0) + 1
                if code == 250:
                    result.accepted += 1
                    result.latencies.append(done - started)
                else:
                    result.failed += 1
                    if len(result.errors) < 20:
                        result.errors.append(f"client {index} msg {i}: {text}")
        except Exception as exc:
            result.errors.append(f"client {index}: {type(exc).__name__}: {exc}")
        finally:
            await session.close()

    tasks = [asyncio.create_task(client(i)) for i in range(load.clients)]
    await all_warm.wait()
    if on_warm is not None:
        maybe = on_warm()
        if asyncio.iscoroutine(maybe):
            await maybe
    result.started = time.monotonic()
    go.set()
    await asyncio.gather(*tasks)
    return result
