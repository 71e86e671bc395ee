"""One authenticated, reusable, pipelined session with Infobip's SMTP API: the I/O around `Transaction`.

aiosmtplib does not pipeline (its protocol parses one reply per read and drops replies that arrive
early), so the session is written here on asyncio streams, beside aiosmtplib: we use its AUTH
encoders, and `relay.core.smtp_client` for every decision that is not I/O. STARTTLS is required before
credentials are sent, and certificates and host names are always verified.
"""

from __future__ import annotations

import asyncio
import collections
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from aiosmtplib.auth import auth_login_encode, auth_plain_encode

from relay.config import UpstreamSettings
from relay.core.message import Prepared
from relay.core.prepare import is_safe_address
from relay.core.smtp_client import (
    CHUNK,
    DeliveryResult,
    Finished,
    NeedReply,
    OutOfStep,
    ReplyReader,
    Send,
    SendBody,
    ServerClosing,
    ServerReply,
    Transaction,
    ehlo_extensions,
    stuffed_chunks,
)
from relay.testing.failpoints import crashpoint
from relay.upstream.errors import (
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamGreetingError,
    UpstreamLost,
    UpstreamProtocolError,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamUnreachable,
)
from relay.upstream.tls import describe_certificate, describe_tls_failure

READ_SIZE = 64 * 1024  # bytes taken from the stream at a time: a 1000-recipient flight's replies in a read or two
# What a broken stream raises under us; TimeoutError is an OSError. Each becomes an UpstreamError.
IO_ERRORS = (OSError, asyncio.IncompleteReadError, ValueError)

Progress = Callable[[str, str], None]  # (step, detail) for each handshake step done: `relay doctor` prints them


class UpstreamConnection:
    """One authenticated session; `transact` may be called many times, one at a time."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, settings: UpstreamSettings, ident: int
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._settings = settings
        self.ident = ident
        self.extensions: dict[str, str] = {}
        self.last_used = time.monotonic()
        self._replies: collections.deque[ServerReply] = collections.deque()  # read, not yet asked for
        self._parser = ReplyReader()
        self._needs_rset = False  # the last transaction ended before its body: the server may hold its envelope

    @classmethod
    async def open(
        cls,
        settings: UpstreamSettings,
        context: ssl.SSLContext,
        local_name: str,
        ident: int,
        progress: Progress | None = None,
    ) -> UpstreamConnection:
        """Connect, TLS, EHLO, AUTH. Raises the UpstreamUnreachable subclass of the step that failed."""
        implicit = settings.tls == "implicit"
        report = progress or _silent
        try:
            # Not wait_for: on Python 3.11 it returns the connection and drops a cancel that lands as the connect
            # completes (uvloop connects on loopback within one loop turn; tests/test_doctor.py caught it).
            async with asyncio.timeout(settings.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    settings.host,
                    settings.port,
                    ssl=context if implicit else None,
                    server_hostname=settings.host if implicit else None,
                    limit=64 * 1024,
                )
        except ssl.SSLError as exc:  # implicit TLS: the handshake is part of connecting
            raise UpstreamTLSError(settings.host, settings.port, _why(exc)) from exc
        except (OSError, TimeoutError) as exc:
            raise UpstreamConnectError(settings.host, settings.port, _why(exc)) from exc
        report("tcp", f"connected to {writer.get_extra_info('peername')}" + (" with TLS" if implicit else ""))
        connection = cls(reader, writer, settings, ident)
        try:
            await connection._handshake(context, local_name, implicit, report)
        except BaseException:
            connection.abort()
            raise
        return connection

    async def _handshake(self, context: ssl.SSLContext, local_name: str, implicit: bool, report: Progress) -> None:
        timeout = self._settings.command_timeout
        with self._step(UpstreamGreetingError):
            greeting = await self._read_reply(timeout)
            if greeting.code != 220:
                raise self._failed(UpstreamGreetingError, f"greeting was {greeting}", greeting)
            report("greeting", str(greeting))
            ehlo = await self._command(f"EHLO {local_name}", timeout)
            if ehlo.code != 250:
                raise self._failed(UpstreamGreetingError, f"EHLO answered {ehlo}", ehlo)
            self.extensions = ehlo_extensions(ehlo)
            report("ehlo", " ".join(self.extensions))
        if not implicit:
            with self._step(UpstreamTLSError):
                await self._starttls(context, local_name, timeout)
        report("tls", describe_certificate(self._writer.get_extra_info("peercert")))
        with self._step(UpstreamAuthError):
            await self._authenticate(timeout)
        report("auth", "credentials accepted")

    async def _starttls(self, context: ssl.SSLContext, local_name: str, timeout: float) -> None:
        """Upgrade, then EHLO again: what the server offered in the clear counts for nothing."""
        if "STARTTLS" not in self.extensions:
            raise self._failed(UpstreamTLSError, "the server does not offer STARTTLS, so no credentials were sent")
        reply = await self._command("STARTTLS", timeout)
        if reply.code != 220:
            raise self._failed(UpstreamTLSError, f"STARTTLS answered {reply}", reply)
        # Bytes already here came in clear, yet would be read as the server's first words inside TLS
        # (CVE-2011-0411's pattern). Checked with no await before start_tls takes the socket over.
        if _buffered(self._reader) or self._replies or self._parser.pending:
            raise self._failed(UpstreamTLSError, "the server sent more after its 220 to STARTTLS, in clear")
        try:
            async with asyncio.timeout(timeout):  # not wait_for: a task would let more bytes in first
                await self._writer.start_tls(context, server_hostname=self._settings.host)
        except ssl.SSLError as exc:
            raise self._failed(UpstreamTLSError, f"TLS failed: {_why(exc)}") from exc
        ehlo = await self._command(f"EHLO {local_name}", timeout)
        if ehlo.code != 250:
            raise self._failed(UpstreamTLSError, f"EHLO after STARTTLS answered {ehlo}", ehlo)
        self.extensions = ehlo_extensions(ehlo)

    async def _authenticate(self, timeout: float) -> None:
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        reply = await _login(self._command, mechanisms, self._settings, timeout)
        if reply is None:
            raise self._failed(UpstreamAuthError, "the server offers neither AUTH PLAIN nor AUTH LOGIN")
        if reply.code != 235:
            raise self._failed(UpstreamAuthError, f"Infobip refused our credentials ({reply}); check them", reply)

    @contextmanager
    def _step(self, error: type[UpstreamUnreachable]) -> Iterator[None]:
        """A broken stream during one handshake step fails as that step, so `relay doctor` can name it."""
        try:
            yield
        except UpstreamError:
            raise
        except IO_ERRORS as exc:
            raise self._failed(error, _why(exc)) from exc

    def _failed(
        self, error: type[UpstreamUnreachable], why: str, server: ServerReply | None = None
    ) -> UpstreamUnreachable:
        return error(self._settings.host, self._settings.port, why, server)

    async def _read_reply(self, timeout: float) -> ServerReply:
        """The next reply. Replies already read come without an await; else whatever the stream holds is
        read and parsed at once (no await and no timer per line: a flight's replies often come together)."""
        if not self._replies:
            async with asyncio.timeout(timeout):  # at most `timeout` for the next reply, as before
                while not self._replies:
                    data = await self._reader.read(READ_SIZE)
                    if not data:
                        raise asyncio.IncompleteReadError(b"", None)
                    self._replies.extend(self._parser.feed(data))
        return self._replies.popleft()

    async def _command(self, line: str, timeout: float) -> ServerReply:
        self._writer.write(line.encode("ascii") + b"\r\n")
        return await self._read_reply(timeout)

    @property
    def usable(self) -> bool:
        """Still open and not idle so long that Infobip has probably dropped it."""
        if self._writer.is_closing() or self._reader.at_eof():
            return False
        return time.monotonic() - self.last_used < self._settings.idle_timeout

    async def transact(self, message: Prepared) -> DeliveryResult:
        """One pipelined transaction: two round trips whatever the recipient count.

        Raises an UpstreamLost subclass when the connection fails; `data_sent` tells whether Infobip may
        have the message, so the caller knows whether trying again on another connection is safe.
        """
        for address in (message.mail_from, *message.recipients):
            if not is_safe_address(address):
                raise ValueError(f"unsafe address {address!r}")  # inbound checks first; never reached
        transaction = Transaction(
            message.mail_from,
            message.recipients,
            size=message.size if "SIZE" in self.extensions else None,
            eight_bit="8BITMIME" in self.extensions and not _is_ascii(message),
            rset_first=self._needs_rset,
            connection_id=self.ident,
        )
        try:
            return await self._run(transaction, message)
        except UpstreamError:  # first: UpstreamDisconnected and UpstreamTimeout are OSErrors too
            self.abort()
            raise
        except IO_ERRORS as exc:
            self.abort()
            raise _lost(exc, data_sent=transaction.data_sent) from exc
        except BaseException:
            # Cancelled (the client hung up in pass-through) or anything unforeseen: replies may
            # still be on their way, so this connection must never serve another transaction.
            self.abort()
            raise
        finally:
            self._needs_rset = transaction.needs_rset
            self.last_used = time.monotonic()

    async def _run(self, transaction: Transaction, message: Prepared) -> DeliveryResult:
        """Write what the transaction asks for and feed it each reply until it has a verdict."""
        self._writer.write(transaction.start())
        timeout = self._settings.command_timeout
        while True:
            match transaction.receive(await self._read_reply(timeout)):
                case NeedReply():
                    pass
                case Send(data):
                    self._writer.write(data)
                case SendBody():
                    await self._write_body(message)
                    transaction.body_sent()
                    timeout = self._settings.data_timeout  # Infobip checks the whole message before it answers
                case Finished(result):
                    return result
                case ServerClosing() as closing:
                    raise UpstreamDisconnected(closing.why, closing.reply)
                case OutOfStep() as out_of_step:
                    raise UpstreamProtocolError(out_of_step.why, out_of_step.reply)

    async def _write_body(self, message: Prepared) -> None:
        """The stuffed body and the final dot, in writes of about CHUNK bytes (one for a small message)."""
        batch: list[bytes] = []
        size = 0
        pieces = stuffed_chunks(message.segments())
        for piece in pieces:
            batch.append(piece)
            size += len(piece)
            if size >= CHUNK:
                self._writer.write(b"".join(batch))
                batch, size = [], 0
                async with asyncio.timeout(self._settings.data_timeout):
                    await self._writer.drain()
                await asyncio.sleep(0)  # drain() does not yield while the socket takes it all: other clients wait
                crashpoint("mid_data")
        crashpoint("mid_data")  # a small message: killed before its last bytes went out
        self._writer.write(b"".join(batch))

    async def probe(self, sender: str) -> ServerReply:
        """MAIL FROM then RSET: does Infobip accept this sender? Nothing is sent (`relay doctor`)."""
        timeout = self._settings.command_timeout
        try:
            reply = await self._command(f"MAIL FROM:<{sender}>", timeout)
            await self._command("RSET", timeout)
        except IO_ERRORS as exc:
            self.abort()
            raise _lost(exc, data_sent=False) from exc
        return reply

    async def quit(self) -> None:
        """Say goodbye politely, but never wait long for the answer."""
        try:
            self._writer.write(b"QUIT\r\n")
            async with asyncio.timeout(2.0):  # not wait_for: on 3.11 it can swallow a cancel
                await self._reader.read(1024)
        except (OSError, TimeoutError):
            pass
        self.abort()

    def abort(self) -> None:
        self._writer.close()


async def _login(
    command: Callable[[str, float], Awaitable[ServerReply]],
    mechanisms: list[str],
    settings: UpstreamSettings,
    timeout: float,
) -> ServerReply | None:
    """AUTH PLAIN, else AUTH LOGIN (aiosmtplib's encoders); the last reply, or None if neither is offered."""
    username = settings.username.get_secret_value()
    password = settings.password.get_secret_value()
    if "PLAIN" in mechanisms:
        return await command(f"AUTH PLAIN {auth_plain_encode(username, password).decode('ascii')}", timeout)
    if "LOGIN" not in mechanisms:
        return None
    reply = await command("AUTH LOGIN", timeout)
    if reply.code == 334:
        user_token, password_token = auth_login_encode(username, password)
        reply = await command(user_token.decode("ascii"), timeout)
        if reply.code == 334:
            reply = await command(password_token.decode("ascii"), timeout)
    return reply


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes received and not yet read: StreamReader has no public view of its buffer (the injection
    test in tests/test_starttls_injection.py fails if this ever stops seeing them)."""
    return len(getattr(reader, "_buffer", b""))


def _silent(step: str, detail: str) -> None:
    pass


def _is_ascii(message: Prepared) -> bool:
    return message.prefix.isascii() and message.original.isascii()


def _why(exc: BaseException) -> str:
    """What went wrong, in the words our client and the operator see."""
    if isinstance(exc, asyncio.IncompleteReadError):
        return "Infobip closed the connection"
    if isinstance(exc, ssl.SSLError):
        return describe_tls_failure(exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _lost(exc: BaseException, *, data_sent: bool) -> UpstreamLost:
    """The class for a stream that broke mid-transaction: timed out, closed under us, or not SMTP."""
    if isinstance(exc, TimeoutError):
        return UpstreamTimeout(_why(exc), data_sent=data_sent)
    if isinstance(exc, OSError | asyncio.IncompleteReadError):
        return UpstreamDisconnected(_why(exc), data_sent=data_sent)
    return UpstreamProtocolError(_why(exc), data_sent=data_sent)
