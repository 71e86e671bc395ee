"""A local stand-in for Infobip's SMTP API, for `relay serve --demo` and for the tests.

It behaves as seed 002 describes: STARTTLS (a throwaway trustme certificate), AUTH LOGIN/PLAIN only
after TLS and required before MAIL, the same EHLO list and reply texts, at most 1000 recipients, the
relaxed From alignment check, and `250 2.6.0 Message queued as <id>`. It records every accepted
message with its connection, and has knobs to misbehave the ways a real upstream does.
Where the seed gives no reply text (alignment failure, recipient limit) the text here is our guess.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import secrets
import ssl
import tempfile
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import getaddresses
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from relay.core.alignment import aligned, domain_of
from relay.core.headers import find_field, parse_header_fields
from relay.testing.reports import ReportsEndpoint

# aiosmtpd warns about its own use of a deprecated attribute on every AUTH; it says nothing to us.
logging.getLogger("mail.log").addFilter(lambda record: "login_data is deprecated" not in record.getMessage())

MAX_SIZE = 20971520
MAX_RECIPIENTS = 1000


@dataclass
class StandInMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes  # exactly as received after dot-unstuffing
    infobip_id: str
    connection: int
    tls: bool
    auth_user: str | None
    pipelined: bool  # RCPT and DATA had already arrived when MAIL was read


@dataclass
class StandInConnection:
    ident: int
    commands: list[str] = field(default_factory=list)  # command verbs, in order
    tls: bool = False
    auth_user: str | None = None
    protocol: Any = None


@dataclass
class Behaviour:
    """Knobs tests turn to make the stand-in misbehave."""

    offer_starttls: bool = True
    auth_mechanisms: str = "LOGIN PLAIN"
    refuse_recipients: dict[str, str] = field(default_factory=dict)  # address -> full reply line
    data_replies: deque[str] = field(default_factory=deque)  # next end-of-data replies instead of 250
    drop_at_end_of_data: int = 0  # the next N messages: drop the connection instead of answering
    data_delay: float = 0.0  # seconds to think before answering the end of data
    check_alignment: bool = True
    down: bool = False  # greet with 421 and hang up, as a server in trouble does
    max_line_length: int = 1048576  # the seed sets no line limit; we assume Infobip takes what we pass


class _StandInSMTP(SMTP):
    AuthLoginUsernameChallenge = "Username:"  # 334 VXNlcm5hbWU6, as the seed shows
    AuthLoginPasswordChallenge = "Password:"  # 334 UGFzc3dvcmQ6

    def __init__(self, standin: InfobipStandIn, record: StandInConnection, **kwargs: Any) -> None:
        self.standin = standin
        self.record = record
        record.protocol = self
        self.line_length_limit = standin.behaviour.max_line_length
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(standin, **kwargs)

    async def _handle_client(self) -> None:
        if self.standin.behaviour.down:
            await self.push("421 4.3.2 Service not available, closing transmission channel")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    def _note(self, verb: str) -> None:
        self.record.commands.append(verb)

    async def smtp_AUTH(self, arg: str) -> None:
        self._note("AUTH")
        await super().smtp_AUTH(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        self._note("STARTTLS")
        await super().smtp_STARTTLS(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:
        self._note("MAIL")
        buffered = bytes(self._reader._buffer)  # type: ignore[attr-defined]  # test instrumentation
        self.pipelined_flight = buffered.endswith(b"DATA\r\n") and b"RCPT" in buffered
        await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str | None) -> None:
        self._note("RCPT")
        await super().smtp_RCPT(arg)

    async def smtp_DATA(self, arg: str) -> None:
        self._note("DATA")
        await super().smtp_DATA(arg)

    async def smtp_RSET(self, arg: str) -> None:
        self._note("RSET")
        await super().smtp_RSET(arg)

    async def smtp_NOOP(self, arg: str) -> None:
        self._note("NOOP")
        await super().smtp_NOOP(arg)


class InfobipStandIn:
    """Start with `await standin.start()`; point the relay at `host`, `port`, `ca_file`."""

    def __init__(
        self,
        *,
        username: str = "demo",
        password: str = "demo-password",
        hostname: str = "smtp.email-messaging.com",
        on_message: Callable[[StandInMessage], None] | None = None,
        certificate_expired: bool = False,
    ) -> None:
        self.username = username
        self.password = password
        self.accounts: dict[str, str] = {}  # more Infobip accounts (user -> password), as for per-app profiles
        self.hostname = hostname
        self.behaviour = Behaviour()
        self.messages: list[StandInMessage] = []
        self.connections: list[StandInConnection] = []
        self.on_message = on_message
        self.host = "127.0.0.1"
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="relay-standin-")
        self.ca = trustme.CA()
        self.ca_file = Path(self._tmp.name) / "standin-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self._tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        now = datetime.now(UTC)
        expired = certificate_expired  # for the "expired certificate: no credentials" test
        self.ca.issue_cert(
            "localhost",
            "127.0.0.1",
            "::1",
            not_before=now - timedelta(days=30) if expired else None,
            not_after=now - timedelta(days=1) if expired else None,
        ).configure_cert(self._tls)
        self.arrived = asyncio.Condition()
        self.implicit_tls = False
        self.reports = ReportsEndpoint(self.ca)  # HTTPS delivery reports: `await standin.reports.start()`

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, implicit_tls: bool = False) -> None:
        """Listen; `implicit_tls` serves TLS from the first byte, as on port 465."""
        loop = asyncio.get_running_loop()
        self.implicit_tls = implicit_tls
        self._server = await loop.create_server(
            self._make_protocol, host, port, ssl=self._tls if implicit_tls else None
        )
        self.host = host
        self.port = self._server.sockets[0].getsockname()[1]

    def _make_protocol(self) -> _StandInSMTP:
        record = StandInConnection(ident=len(self.connections) + 1)
        self.connections.append(record)
        return _StandInSMTP(
            self,
            record,
            hostname=self.hostname,
            data_size_limit=MAX_SIZE,
            tls_context=self._tls if self.behaviour.offer_starttls and not self.implicit_tls else None,
            require_starttls=self.behaviour.offer_starttls and not self.implicit_tls,
            auth_required=True,
            auth_require_tls=not self.implicit_tls,  # aiosmtpd cannot see implicit TLS itself
            authenticator=self._authenticate,
            timeout=30,
        )

    def go_down(self) -> None:
        """An outage: every open connection drops and new ones are greeted with 421 until `down` is False."""
        self.behaviour.down = True
        for record in self.connections:
            if record.protocol is not None and record.protocol.transport is not None:
                record.protocol.transport.abort()

    async def stop(self) -> None:
        for record in self.connections:
            if record.protocol is not None and record.protocol.transport is not None:
                record.protocol.transport.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await self.reports.stop()
        self._tmp.cleanup()

    def close_idle_connections(self, reply: str | None = "421 4.4.2 Idle timeout, closing connection") -> int:
        """Do what Infobip does to idle sessions: say 421 (or nothing) and close. Returns how many."""
        closed = 0
        for record in self.connections:
            protocol = record.protocol
            if protocol is None or protocol.transport is None or protocol.envelope.mail_from:
                continue
            if reply is not None:
                protocol._writer.write(reply.encode() + b"\r\n")
                protocol.transport.close()
            else:
                protocol.transport.abort()
            closed += 1
        return closed

    async def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[StandInMessage]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.messages) >= count), timeout)
        return self.messages

    # aiosmtpd hooks

    def _authenticate(
        self, server: _StandInSMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if isinstance(auth_data, LoginPassword):
            user = auth_data.login.decode("utf-8", "replace")
            expected = self.password if user == self.username else self.accounts.get(user)
            if expected is not None and auth_data.password.decode("utf-8", "replace") == expected:
                server.record.auth_user = user
                return AuthResult(success=True)
        return AuthResult(success=False, handled=False)

    async def handle_EHLO(
        self, server: _StandInSMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        offer_tls = self.behaviour.offer_starttls and session.ssl is None and not self.implicit_tls
        lines = [self.hostname, "8BITMIME", f"SIZE {MAX_SIZE}"]
        lines += ["STARTTLS"] if offer_tls else []
        lines += [f"AUTH {self.behaviour.auth_mechanisms}", "ENHANCEDSTATUSCODES", "PIPELINING", "OK"]
        return [f"250-{line}" for line in lines[:-1]] + [f"250 {lines[-1]}"]

    async def handle_MAIL(
        self, server: _StandInSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return f"250 2.1.0 Sender <{address}> OK"

    async def handle_RCPT(
        self, server: _StandInSMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if address in self.behaviour.refuse_recipients:
            return self.behaviour.refuse_recipients[address]
        if len(envelope.rcpt_tos) >= MAX_RECIPIENTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return f"250 2.1.5 Recipient <{address}> OK"

    async def handle_DATA(self, server: _StandInSMTP, session: Any, envelope: Any) -> str:
        if self.behaviour.data_delay:
            await asyncio.sleep(self.behaviour.data_delay)
        if self.behaviour.drop_at_end_of_data > 0:
            self.behaviour.drop_at_end_of_data -= 1
            assert isinstance(server.transport, asyncio.Transport)
            server.transport.abort()
            return "421 4.4.2 dropped"  # never reaches the client
        if self.behaviour.data_replies:
            return self.behaviour.data_replies.popleft()
        data: bytes = envelope.original_content
        if self.behaviour.check_alignment:
            from_field = find_field(parse_header_fields(data), "From")
            addresses = [a for _, a in getaddresses([from_field.value])] if from_field else []
            if not addresses or not aligned(domain_of(envelope.mail_from), domain_of(addresses[0])):
                return "550 5.7.1 Envelope From and header From domains are not aligned"
        message = StandInMessage(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            infobip_id=secrets.token_hex(12),
            connection=server.record.ident,
            tls=session.ssl is not None or self.implicit_tls,
            auth_user=server.record.auth_user,
            pipelined=getattr(server, "pipelined_flight", False),
        )
        account = message.auth_user if message.auth_user in self.accounts else None  # whose reports
        self.reports.sent(message.infobip_id, data, message.rcpt_tos, account, message.mail_from)
        async with self.arrived:
            self.messages.append(message)
            self.arrived.notify_all()
        if self.on_message is not None:
            self.on_message(message)
        return f"250 2.6.0 Message queued as {message.infobip_id}"
