"""Authenticated, reused, pipelined connections to Infobip's SMTP API.

aiosmtplib does not pipeline (its protocol parses one reply per read and drops replies that arrive
early), so the transaction is written here on asyncio streams, beside aiosmtplib: we use its AUTH
encoders, and `wire` for everything that is not I/O. STARTTLS is required before credentials are sent,
and certificates and host names are always verified.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import structlog
from aiosmtplib.auth import auth_login_encode, auth_plain_encode

from relay.config import UpstreamSettings
from relay.core.prepare import Prepared, is_safe_address
from relay.core.replies import Reply
from relay.core.smtp_client import (
    CHUNK,
    DeliveryResult,
    ServerReply,
    ehlo_extensions,
    parse_reply_line,
    stuffed_chunks,
    transaction_commands,
)
from relay.ops.metrics import Metrics
from relay.testing.failpoints import crashpoint

log = structlog.get_logger("relay.upstream.pool")
MAX_REPLY_LINES = 1000 + 64  # one per recipient plus slack, per reply read


class UpstreamError(Exception):
    """Delivery did not get a verdict from Infobip; `reply` is what our client is told (always 4xx)."""

    def __init__(self, reply: Reply, *, data_sent: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.data_sent = data_sent  # the body's final dot went out: Infobip may have the message


def make_tls_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """System trust store plus `ca_file`. Only the explicit `insecure_skip_verify` turns checks off."""
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning(
            "upstream_tls_verification_disabled",
            warning="upstream.insecure_skip_verify = true: ANY certificate is accepted and the Infobip credentials "
            "can be stolen by whoever intercepts the connection. Never use this in production.",
        )
    return context


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
        self._needs_rset = False

    @classmethod
    async def open(
        cls,
        settings: UpstreamSettings,
        context: ssl.SSLContext,
        local_name: str,
        ident: int,
        progress: Progress | None = None,
    ) -> UpstreamConnection:
        """Connect, TLS, EHLO, AUTH. `progress(step, detail)` hears of each step done (`relay doctor`)."""
        implicit = settings.tls == "implicit"
        report = progress or _silent
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    settings.host,
                    settings.port,
                    ssl=context if implicit else None,
                    server_hostname=settings.host if implicit else None,
                    limit=64 * 1024,
                ),
                settings.connect_timeout,
            )
        except (OSError, TimeoutError) as exc:
            raise _unreachable(settings, _why(exc)) from exc
        report("tcp", f"connected to {writer.get_extra_info('peername')}" + (" with TLS" if implicit else ""))
        connection = cls(reader, writer, settings, ident)
        try:
            await connection._handshake(context, local_name, implicit, report)
        except UpstreamError:
            connection.abort()
            raise
        except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError) as exc:
            connection.abort()
            raise _unreachable(settings, _why(exc)) from exc
        return connection

    async def _handshake(self, context: ssl.SSLContext, local_name: str, implicit: bool, report: Progress) -> None:
        timeout = self._settings.command_timeout
        greeting = await self._read_reply(timeout)
        if greeting.code != 220:
            raise _unreachable(self._settings, f"greeting was {greeting}")
        report("greeting", str(greeting))
        ehlo = await self._command(f"EHLO {local_name}", timeout)
        if ehlo.code != 250:
            raise _unreachable(self._settings, f"EHLO answered {ehlo}")
        self.extensions = ehlo_extensions(ehlo)
        report("ehlo", " ".join(self.extensions))
        if not implicit:
            if "STARTTLS" not in self.extensions:
                raise _unreachable(self._settings, "the server does not offer STARTTLS, so no credentials were sent")
            reply = await self._command("STARTTLS", timeout)
            if reply.code != 220:
                raise _unreachable(self._settings, f"STARTTLS answered {reply}")
            try:
                await asyncio.wait_for(self._writer.start_tls(context, server_hostname=self._settings.host), timeout)
            except ssl.SSLError as exc:
                raise _unreachable(self._settings, f"TLS failed: {_why(exc)}") from exc
            ehlo = await self._command(f"EHLO {local_name}", timeout)
            if ehlo.code != 250:
                raise _unreachable(self._settings, f"EHLO after STARTTLS answered {ehlo}")
            self.extensions = ehlo_extensions(ehlo)
        report("tls", _describe_certificate(self._writer.get_extra_info("peercert")))
        await self._authenticate(timeout)
        report("auth", "credentials accepted")

    async def _authenticate(self, timeout: float) -> None:
        username = self._settings.username.get_secret_value()
        password = self._settings.password.get_secret_value()
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if "PLAIN" in mechanisms:
            token = auth_plain_encode(username, password).decode("ascii")
            reply = await self._command(f"AUTH PLAIN {token}", timeout)
        elif "LOGIN" in mechanisms:
            reply = await self._command("AUTH LOGIN", timeout)
            if reply.code == 334:
                user_token, password_token = auth_login_encode(username, password)
                reply = await self._command(user_token.decode("ascii"), timeout)
                if reply.code == 334:
                    reply = await self._command(password_token.decode("ascii"), timeout)
        else:
            raise _unreachable(self._settings, "the server offers neither AUTH PLAIN nor AUTH LOGIN")
        if reply.code != 235:
            raise _unreachable(self._settings, f"Infobip refused our credentials ({reply}); check them")

    async def _read_reply(self, timeout: float) -> ServerReply:
        lines: list[str] = []
        async with asyncio.timeout(timeout):  # one timer per reply, not a task per line as wait_for makes
            for _ in range(MAX_REPLY_LINES):
                try:
                    raw = await self._reader.readuntil(b"\n")
                except asyncio.LimitOverrunError as exc:
                    raise ValueError("reply line too long") from exc
                code, last, text = parse_reply_line(raw)
                lines.append(text)
                if last:
                    return ServerReply(code, "\n".join(lines))
        raise ValueError("reply too long")

    async def _command(self, line: str, timeout: float) -> ServerReply:
        self._writer.write(line.encode("ascii") + b"\r\n")
        return await self._read_reply(timeout)

    @property
    def usable(self) -> bool:
        if self._writer.is_closing() or self._reader.at_eof():
            return False
        return time.monotonic() - self.last_used < self._settings.idle_timeout

    async def transact(self, message: Prepared) -> DeliveryResult:
        """One pipelined transaction: two round trips whatever the recipient count.

        Raises UpstreamError when the connection fails; `data_sent` tells whether Infobip may have
        the message, so the caller knows whether trying again on another connection is safe.
        """
        for address in (message.mail_from, *message.recipients):
            if not is_safe_address(address):
                raise ValueError(f"unsafe address {address!r}")  # inbound checks first; never reached
        timeout = self._settings.command_timeout
        data_sent = False
        try:
            flight = transaction_commands(
                message.mail_from,
                message.recipients,
                size=message.size if "SIZE" in self.extensions else None,
                eight_bit="8BITMIME" in self.extensions and not _is_ascii(message),
            )
            if self._needs_rset:
                flight = b"RSET\r\n" + flight
            self._writer.write(flight)
            if self._needs_rset:
                await self._read_reply(timeout)
                self._needs_rset = False
            mail_reply = await self._read_reply(timeout)
            if mail_reply.code == 421:
                raise _lost(f"Infobip closed the connection: {mail_reply}")
            rcpt_replies = [await self._read_reply(timeout) for _ in message.recipients]
            data_reply = await self._read_reply(timeout)

            accepted = tuple(r for r, reply in zip(message.recipients, rcpt_replies, strict=True) if reply.ok)
            refused = {r: reply for r, reply in zip(message.recipients, rcpt_replies, strict=True) if not reply.ok}
            if data_reply.ok:  # a 2xx to DATA is not a reply to DATA: we are out of step with the server
                raise ValueError(f"out of step with the server: DATA answered {data_reply}")
            if not mail_reply.ok or not accepted or data_reply.code != 354:
                if data_reply.code == 354:  # a server that said 354 anyway gets an empty message ended
                    self._writer.write(b".\r\n")
                    await self._read_reply(timeout)
                self._needs_rset = True
                final = mail_reply if not mail_reply.ok else _worst(refused) if not accepted else data_reply
                return DeliveryResult(final, (), refused if mail_reply.ok else {}, self.ident)

            await self._write_body(message)
            data_sent = True
            final = await self._read_reply(self._settings.data_timeout)
            return DeliveryResult(final, accepted if final.ok else (), refused, self.ident)
        except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
            self.abort()
            raise _lost(_why(exc), data_sent=data_sent) from exc
        except TimeoutError as exc:
            self.abort()
            raise _lost("Infobip did not answer in time", data_sent=data_sent) from exc
        except BaseException:
            # Cancelled (the client hung up in pass-through) or anything unforeseen: replies may still be
            # on their way, so this connection must never serve another transaction.
            self.abort()
            raise
        finally:
            self.last_used = time.monotonic()

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
                crashpoint("mid_data")
        crashpoint("mid_data")  # a small message: killed before its last bytes went out
        self._writer.write(b"".join(batch))

    async def probe(self, sender: str) -> ServerReply:
        """MAIL FROM then RSET: does Infobip accept this sender? Nothing is sent (`relay doctor`)."""
        timeout = self._settings.command_timeout
        reply = await self._command(f"MAIL FROM:<{sender}>", timeout)
        await self._command("RSET", timeout)
        return reply

    async def quit(self) -> None:
        try:
            self._writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self._reader.read(1024), 2.0)
        except (OSError, TimeoutError):
            pass
        self.abort()

    def abort(self) -> None:
        self._writer.close()


Progress = Callable[[str, str], None]


def _silent(step: str, detail: str) -> None:
    pass


def _describe_certificate(cert: object) -> str:
    """Subject and expiry of the server's certificate, for `relay doctor`."""
    if not isinstance(cert, dict):
        return "TLS established"
    subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    names = ", ".join(v for _, v in cert.get("subjectAltName", ()))
    return f"certificate {subject or '(no subject)'}; names {names or '-'}; expires {cert.get('notAfter', '?')}"


def _is_ascii(message: Prepared) -> bool:
    return message.prefix.isascii() and message.original.isascii()


def _worst(refused: dict[str, ServerReply]) -> ServerReply:
    """The reply to report when every recipient was refused: a temporary one wins (it may still work)."""
    replies = list(refused.values())
    return next((r for r in replies if r.transient), replies[0])


def _why(exc: BaseException) -> str:
    if isinstance(exc, asyncio.IncompleteReadError):
        return "Infobip closed the connection"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc)
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__


def _unreachable(settings: UpstreamSettings, why: str) -> UpstreamError:
    return UpstreamError(Reply(451, "4.4.1", f"Cannot reach Infobip at {settings.host}:{settings.port}: {why}"))


def _lost(why: str, *, data_sent: bool = False) -> UpstreamError:
    return UpstreamError(
        Reply(451, "4.4.2", f"Connection to Infobip lost: {why}; try again later"), data_sent=data_sent
    )


class UpstreamPool:
    """At most `pool_size` connections, each reused for many messages; idle ones are kept warm."""

    def __init__(self, settings: UpstreamSettings, local_name: str, metrics: Metrics | None = None) -> None:
        self._settings = settings
        self._metrics = metrics
        self._closed = False
        self._local_name = local_name
        self._context = make_tls_context(settings)
        self._slots = asyncio.Semaphore(settings.pool_size)
        self._idle: list[UpstreamConnection] = []
        self._ids = itertools.count(1)
        self._in_use = 0
        self.last_authenticated: float | None = None  # monotonic time of the last successful AUTH
        self.last_failure: str | None = None  # why the last connection attempt failed (None after a success)

    @property
    def size(self) -> int:
        """Connections open now: idle ones plus those in use."""
        return len(self._idle) + self._in_use

    async def _open(self) -> UpstreamConnection:
        try:
            connection = await UpstreamConnection.open(self._settings, self._context, self._local_name, next(self._ids))
        except UpstreamError as exc:
            if self._metrics is not None:
                self._metrics.upstream_failures.inc()
            self.last_failure = exc.reply.text
            log.warning("upstream_connect_failed", host=self._settings.host, reply=str(exc.reply))
            raise
        if self._metrics is not None:
            self._metrics.upstream_connects.inc()
        self.last_authenticated = time.monotonic()
        self.last_failure = None
        log.info("upstream_connected", connection=connection.ident, host=self._settings.host)
        return connection

    @asynccontextmanager
    async def _connection(self, *, fresh: bool = False) -> AsyncIterator[tuple[UpstreamConnection, bool]]:
        async with self._slots:
            connection: UpstreamConnection | None = None
            while self._idle and not fresh:
                candidate = self._idle.pop()
                if candidate.usable:
                    connection = candidate
                    break
                candidate.abort()
            reused = connection is not None
            if connection is None:
                connection = await self._open()
            self._in_use += 1
            try:
                yield connection, reused
            finally:
                self._in_use -= 1
                if connection.usable and not self._closed:
                    self._idle.append(connection)
                else:
                    connection.abort()

    async def deliver(self, message: Prepared) -> DeliveryResult:
        async with self._connection() as (connection, reused):
            try:
                return await connection.transact(message)
            except UpstreamError as exc:
                if not reused or exc.data_sent:
                    raise
                # A warm connection Infobip dropped while idle: nothing was sent, so try a fresh one.
                log.info("upstream_stale_connection", connection=connection.ident, reason=str(exc.reply))
        async with self._connection(fresh=True) as (connection, _):
            return await connection.transact(message)

    async def close(self) -> None:
        """Quit idle connections; those in use are closed when their transaction ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        await asyncio.gather(*(c.quit() for c in idle), return_exceptions=True)
