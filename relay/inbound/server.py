"""The LAN-facing SMTP server: aiosmtpd, served from the app's own event loop.

Thin on purpose: each decision is a pure function (access, prepare, verdict); this module only
collects the envelope and bytes, asks, and replies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, AnyStr, cast

import structlog
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session

from relay.config import Settings
from relay.core.prepare import Prepared, Received, prepare
from relay.core.replies import Rejection, Reply, with_enhanced_code
from relay.inbound.access import check_client, check_recipient, check_sender, client_address
from relay.inbound.limits import MemoryBudget, RateLimits
from relay.ops.logs import log_message
from relay.ops.metrics import Metrics

log = structlog.get_logger("relay.inbound.server")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# A dot-atom address in angle brackets, then the parameters: parsed exactly as the email package would.
_PLAIN_ADDRESS = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)", re.DOTALL)

Deliver = Callable[[Prepared, "SessionInfo"], Awaitable[Reply]]


def new_queue_id() -> str:
    """Sortable by arrival (milliseconds), unique by 40 random bits: 11 + 10 hex digits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


class SessionInfo:
    __slots__ = ("client_ip",)

    def __init__(self, client_ip: str) -> None:
        self.client_ip = client_ip


class Sessions:
    """The live client connections, and how many are inside DATA (drain waits for those)."""

    def __init__(self) -> None:
        self.live: set[RelaySMTP] = set()
        self.in_data = 0
        self._changed = asyncio.Event()

    def data_started(self) -> None:
        self.in_data += 1

    def data_finished(self) -> None:
        self.in_data -= 1
        self._changed.set()

    async def wait_until_no_data(self, deadline: float) -> None:
        while self.in_data > 0 and (remaining := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def close_all(self, reply: str) -> None:
        for session in list(self.live):
            if session.transport is not None:
                session._writer.write(reply.encode() + b"\r\n")
                session.transport.close()


class RelaySession(Session):
    """aiosmtpd's session plus who the client is, as every check and log line needs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.client_ip = ""  # the TCP peer, or the PROXY header's source behind a balancer
        self.relay_user: str | None = None  # after AUTH


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with our limits, access check at connect, and enhanced codes on every reply."""

    def __init__(self, handler: RelayHandler, sessions: Sessions) -> None:
        listen = handler.settings.listen
        # Read by SMTP.__init__ for the stream limit; legacy apps send long unwrapped lines.
        self.line_length_limit = listen.max_line_length
        # aiosmtpd keeps these on the class, shared by every session; give each session its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self._sessions = sessions
        self._raw_replies = False
        self._unsent: list[bytes] = []
        super().__init__(
            handler,
            data_size_limit=listen.max_message_size,
            hostname=listen.hostname,
            ident="ESMTP relay",
            timeout=listen.timeout,
            enable_SMTPUTF8=False,
            decode_data=False,
            tls_context=handler.tls_context,
            require_starttls=False,
            auth_required=listen.auth_required,
            auth_require_tls=True,
            authenticator=handler.authenticate,
            proxy_protocol_timeout=10.0 if listen.proxy_protocol else None,
        )

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The common `<user@example.com> PARAMS` without the email package's full parser (a hot path)."""
        match = _PLAIN_ADDRESS.fullmatch(arg) if arg else None
        if match is not None:
            return match.group(1), match.group(2)
        try:
            result: tuple[str | None, str | None] = super()._getaddr(arg)
        except Exception:  # the email package raises IndexError on "user@": malformed, not our failure
            return None, None
        return result

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.session is not None and self.session.ssl is not None:
            await self.push("503 5.5.1 TLS is already active")
            return
        await super().smtp_STARTTLS(arg)

    def _create_session(self) -> RelaySession:
        return RelaySession(self.loop)

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, bytes):
            line = status
        else:
            text = _CONTROL.sub("?", status)  # aiosmtpd echoes commands and arguments: never raw bytes
            if not self._raw_replies or text[:1] in ("4", "5"):
                rewritten = with_enhanced_code(text)
                if rewritten != text and rewritten[:1] in ("4", "5"):  # aiosmtpd's own refusals
                    reason = "size" if rewritten.startswith("552") else "protocol"
                    self.event_handler.metrics.rejected.labels(reason).inc()
                text = rewritten
            line = text.encode("ascii", "replace")
        self._unsent.append(line + b"\r\n")
        # A client that pipelines (RFC 2920) gets its 250s in one write with the next reply, instead
        # of a send() each; anything else (354, errors, a close to follow) goes out at once.
        buffered = getattr(self._reader, "_buffer", b"")
        if line.startswith(b"250") and b"\n" in buffered:
            return
        self._writer.write(b"".join(self._unsent))
        self._unsent.clear()
        await self._writer.drain()

    async def smtp_EHLO(self, hostname: str) -> None:
        self._raw_replies = True  # EHLO lines are keywords, not replies to give codes to
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._raw_replies = False

    async def smtp_HELO(self, hostname: str) -> None:
        self._raw_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._raw_replies = False

    async def refuse_connection(self, reason: str, reply: Reply, client_ip: str) -> None:
        self.event_handler.metrics.rejected.labels(reason).inc()
        log.warning("client_refused", client_ip=client_ip, reply=str(reply))
        await self.push(str(reply))
        assert self.transport is not None
        self.transport.close()

    async def _handle_client(self) -> None:
        assert isinstance(self.session, RelaySession) and self.transport is not None
        listen = self.event_handler.settings.listen
        peer_ip = str(client_address(self.session.peer))
        self.session.client_ip = peer_ip
        # Behind a balancer the TCP peer is the balancer: it must be allowed too, then PROXY says who sent.
        refusal = check_client(self.session.peer, listen.allowed_networks)
        if refusal is not None:
            return await self.refuse_connection("client_refused", refusal, peer_ip)
        if len(self._sessions.live) > listen.max_connections:
            too_many = Reply(421, "4.7.0", "Too many connections to this relay; try again later")
            return await self.refuse_connection("too_many_connections", too_many, peer_ip)
        await super()._handle_client()

    def connection_made(self, transport: Any) -> None:
        self._sessions.live.add(self)
        before = self.session
        super().connection_made(transport)
        if isinstance(before, RelaySession) and isinstance(self.session, RelaySession):
            self.session.client_ip = before.client_ip  # after STARTTLS aiosmtpd starts a new session

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.live.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        self._sessions.data_started()
        try:
            await self._data(arg)
        finally:
            self._sessions.data_finished()

    async def _data(self, arg: str) -> None:
        """DATA, as aiosmtpd does it, plus: the memory budget, and time limits that let a slow upload
        finish while it makes progress but drop a client that trickles bytes forever."""
        assert self.envelope is not None and self.transport is not None and isinstance(self.session, RelaySession)
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        if not self.envelope.rcpt_tos:
            return await self.push("503 5.5.1 Send RCPT TO first: the message has no recipient")
        if arg:
            return await self.push("501 5.5.4 Syntax: DATA takes no argument")
        handler: RelayHandler = self.event_handler
        budget = handler.budget
        if budget.exhausted:
            handler.metrics.rejected.labels("memory_budget").inc()
            return await self.push("451 4.3.2 The relay holds too much message data right now; try again shortly")
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        listen = handler.settings.listen
        loop = asyncio.get_running_loop()
        deadline = loop.time() + listen.data_timeout
        last_progress = loop.time()
        progress_step = min(1.0, listen.timeout / 4)  # re-arming the timer per line would cost a handle each
        data = bytearray()
        held = 0
        problem: str | None = None
        mid_line = False  # after an over-long fragment, the next read is the rest of that line
        try:
            while True:
                try:
                    line = await self._reader.readuntil(b"\r\n")
                except asyncio.LimitOverrunError as overrun:
                    await self._reader.readexactly(overrun.consumed)
                    problem, mid_line = problem or "too_long", True
                    continue
                now = loop.time()
                if now - last_progress > progress_step:  # a slow upload making progress is not idle
                    self._reset_timeout()
                    last_progress = now
                if now > deadline:
                    log.warning("data_timeout", client_ip=self.session.client_ip, seconds=listen.data_timeout)
                    self.transport.close()
                    return
                if mid_line:
                    mid_line = False
                    continue
                if line == b".\r\n":
                    break
                if problem is not None:
                    continue  # read to the end of data, keep nothing, then say why
                if line[:1] == b".":
                    line = line[1:]
                if held + len(line) > listen.max_message_size:
                    problem = "too_big"
                elif not budget.take(len(line)):
                    problem = "memory_budget"
                else:
                    held += len(line)
                    data += line
                    continue
                budget.release(held)
                held, data = 0, bytearray()
            if problem is not None:
                handler.metrics.rejected.labels(problem).inc()
                self._set_post_data_state()  # type: ignore[no-untyped-call]  # the transaction is over
                return await self.push(_DATA_PROBLEMS[problem].format(limit=listen.max_message_size))
            # Handed on as is: bytes(data) would copy up to 20 MB. Readers only use the bytes API.
            self.envelope.original_content = self.envelope.content = cast(bytes, data)
            del data
            if self._timeout_handle is not None:  # waiting for Infobip's verdict is not the client idling
                self._timeout_handle.cancel()
            try:
                status = await self._call_handler_hook("DATA")
            finally:
                self._reset_timeout()
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(status)
        finally:
            budget.release(held)


_DATA_PROBLEMS = {
    "too_long": "500 5.5.6 A message line is longer than this relay accepts; nothing was sent",
    "too_big": "552 5.3.4 Message too big: this relay takes at most {limit} bytes; nothing was sent",
    "memory_budget": "451 4.3.2 The relay holds too much message data right now; try again shortly",
}


class RelayHandler:
    """aiosmtpd hooks: check at MAIL and RCPT, prepare and deliver at DATA."""

    def __init__(self, settings: Settings, deliver: Deliver, metrics: Metrics) -> None:
        self.deliver = deliver
        self.metrics = metrics
        self.budget = MemoryBudget(settings.limits.memory_budget)
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Take a (re)loaded config: new sessions see it; sessions already open keep their limits."""
        self.settings = settings
        self.limits = RateLimits(settings.limits)
        self.budget.limit = settings.limits.memory_budget
        self.users = {user.username: user for user in settings.listen.users}
        self.tls_context: ssl.SSLContext | None = None
        listen = settings.listen
        if listen.tls_cert_file is not None and listen.tls_key_file is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.minimum_version = ssl.TLSVersion.TLSv1_2
            self.tls_context.load_cert_chain(listen.tls_cert_file, listen.tls_key_file)

    def authenticate(self, server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        """AUTH PLAIN/LOGIN against listen.users, in constant time."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user = self.users.get(auth_data.login.decode("utf-8", "replace"))
        expected = user.password.get_secret_value().encode() if user else secrets.token_bytes(16)
        if user is None or not hmac.compare_digest(auth_data.password, expected):
            self.metrics.rejected.labels("auth_failed").inc()
            log.warning("client_auth_failed", client_ip=session.client_ip)
            return AuthResult(success=False, handled=False)
        session.relay_user = user.username
        return AuthResult(success=True, auth_data=user.username)

    async def handle_PROXY(self, server: RelaySMTP, session: Any, envelope: Any, proxy_data: Any) -> bool:
        """Behind a load balancer: the PROXY header's source is the client for every check and log."""
        source = getattr(proxy_data, "src_addr", None)
        if not getattr(proxy_data, "valid", False) or source is None:
            return False
        peer = (str(source), getattr(proxy_data, "src_port", 0))
        refusal = check_client(peer, self.settings.listen.allowed_networks)
        if refusal is not None:
            await server.refuse_connection("client_refused", refusal, str(client_address(peer)))
            return False
        session.client_ip = str(client_address(peer))
        return True

    def _refuse(self, reason: str, reply: Reply) -> str:
        self.metrics.rejected.labels(reason).inc()
        return str(reply)

    async def handle_EHLO(
        self, server: RelaySMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        listen = self.settings.listen
        lines = [listen.hostname, f"SIZE {listen.max_message_size}", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and session.ssl is None:
            lines.append("STARTTLS")
        if self.users and session.ssl is not None:
            lines.append("AUTH PLAIN LOGIN")
        return [f"250-{line}" for line in lines] + ["250 HELP"]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        user = self.users.get(session.relay_user or "")
        domains = user.allowed_sender_domains if user and user.allowed_sender_domains else None
        refusal = check_sender(address, domains or self.settings.policy.allowed_sender_domains)
        if refusal is not None:
            return self._refuse("sender", refusal)
        refusal = self.limits.message(session.client_ip, time.monotonic())
        if refusal is not None:
            return self._refuse("rate_limit", refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return f"250 2.1.0 Sender <{address}> OK"

    async def handle_RCPT(
        self, server: RelaySMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refusal = check_recipient(address, len(envelope.rcpt_tos), self.settings.listen.max_recipients)
        if refusal is not None:
            return self._refuse("too_many_recipients" if refusal.code == 452 else "recipient", refusal)
        refusal = self.limits.recipient(session.client_ip, time.monotonic())
        if refusal is not None:
            return self._refuse("rate_limit", refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return f"250 2.1.5 Recipient <{address}> OK"

    async def handle_DATA(self, server: RelaySMTP, session: Any, envelope: Any) -> str:
        client_ip = session.client_ip
        received = Received(
            queue_id=new_queue_id(),
            client_ip=client_ip,
            mail_from=envelope.mail_from,
            recipients=tuple(envelope.rcpt_tos),
            data=envelope.original_content,
            received_at=datetime.now(UTC),
            hostname=self.settings.listen.hostname,
        )
        envelope.original_content = envelope.content = b""  # the Received holds the only reference
        self.metrics.received.inc()
        try:
            prepared = prepare(received, self.settings.policy)
        except Rejection as rejection:
            log_message(
                log,
                "message_rejected",
                queue_id=received.queue_id,
                client_ip=client_ip,
                sender=received.mail_from,
                recipients=len(received.recipients),
                size=len(received.data),
                outcome="rejected",
                reply=str(rejection.reply),
            )
            reason = {"5.7.1": "misaligned", "5.6.0": "bad_headers"}.get(rejection.reply.enhanced, "content")
            return self._refuse(reason, rejection.reply)
        del received
        return str(await self.deliver(prepared, SessionInfo(client_ip)))

    async def handle_exception(self, error: Exception) -> str:
        log.error("session_error", error_type=type(error).__name__)
        return "451 4.3.0 Internal error in the relay; try again later"
