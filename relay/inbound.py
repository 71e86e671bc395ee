"""The LAN-facing SMTP server: aiosmtpd, served from the app's own event loop.

Thin on purpose: each decision is a pure function (access, prepare, verdict); this module only
collects the envelope and bytes, asks, and replies.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, AnyStr

import structlog
from aiosmtpd.smtp import SMTP

from relay.access import check_client, check_recipient, check_sender, client_address
from relay.config import Settings
from relay.metrics import Metrics
from relay.prepare import Prepared, Received, prepare
from relay.replies import Rejection, Reply, with_enhanced_code

log = structlog.get_logger("relay.inbound")

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
        super().__init__(
            handler,
            data_size_limit=listen.max_message_size,
            hostname=listen.hostname,
            ident="ESMTP relay",
            timeout=listen.timeout,
            enable_SMTPUTF8=False,
            decode_data=False,
        )

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str) and not self._raw_replies:
            rewritten = with_enhanced_code(status)
            if rewritten != status and rewritten[:1] in ("4", "5"):  # aiosmtpd's own refusals
                reason = "size" if rewritten.startswith("552") else "protocol"
                self.event_handler.metrics.rejected.labels(reason).inc()
            await super().push(rewritten)
        else:
            await super().push(status)

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

    async def _handle_client(self) -> None:
        assert self.session is not None and self.transport is not None
        listen = self.event_handler.settings.listen
        refusal = check_client(self.session.peer, listen.allowed_networks)
        reason = "client_refused"
        if refusal is None and len(self._sessions.live) > listen.max_connections:
            refusal = Reply(421, "4.7.0", "Too many connections to this relay; try again later")
            reason = "too_many_connections"
        if refusal is not None:
            self.event_handler.metrics.rejected.labels(reason).inc()
            log.warning("client_refused", client_ip=str(client_address(self.session.peer)), reply=str(refusal))
            await self.push(str(refusal))
            self.transport.close()
            return
        await super()._handle_client()

    def connection_made(self, transport: Any) -> None:
        self._sessions.live.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.live.discard(self)
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        self._sessions.data_started()
        try:
            await super().smtp_DATA(arg)
        finally:
            self._sessions.data_finished()


class RelayHandler:
    """aiosmtpd hooks: check at MAIL and RCPT, prepare and deliver at DATA."""

    def __init__(self, settings: Settings, deliver: Deliver, metrics: Metrics) -> None:
        self.settings = settings
        self.deliver = deliver
        self.metrics = metrics

    def _refuse(self, reason: str, reply: Reply) -> str:
        self.metrics.rejected.labels(reason).inc()
        return str(reply)

    async def handle_EHLO(
        self, server: RelaySMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        listen = self.settings.listen
        return [
            f"250-{listen.hostname}",
            f"250-SIZE {listen.max_message_size}",
            "250-8BITMIME",
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
            "250 HELP",
        ]

    async def handle_MAIL(
        self, server: RelaySMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refusal = check_sender(address, self.settings.policy.allowed_sender_domains)
        if refusal is not None:
            return self._refuse("sender", refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return f"250 2.1.0 Sender <{address}> OK"

    async def handle_RCPT(
        self, server: RelaySMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refusal = check_recipient(address, len(envelope.rcpt_tos), self.settings.listen.max_recipients)
        if refusal is not None:
            return self._refuse("too_many_recipients" if refusal.code == 452 else "recipient", refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return f"250 2.1.5 Recipient <{address}> OK"

    async def handle_DATA(self, server: RelaySMTP, session: Any, envelope: Any) -> str:
        client_ip = str(client_address(session.peer))
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
            log.info(
                "message_rejected",
                queue_id=received.queue_id,
                client_ip=client_ip,
                sender=received.mail_from,
                recipients=len(received.recipients),
                size=len(received.data),
                reply=str(rejection.reply),
            )
            reason = {"5.7.1": "misaligned", "5.6.0": "bad_headers"}.get(rejection.reply.enhanced, "content")
            return self._refuse(reason, rejection.reply)
        del received
        return str(await self.deliver(prepared, SessionInfo(client_ip)))

    async def handle_exception(self, error: Exception) -> str:
        log.error("session_error", error_type=type(error).__name__)
        return "451 4.3.0 Internal error in the relay; try again later"
