"""The LAN-facing SMTP server: aiosmtpd, served from the app's own event loop.

Thin on purpose: each decision is a pure function (access, limits, upload, prepare) that returns the
reply together with its metric reason; this module only collects the envelope and bytes, asks, and
replies. Reply texts come from relay.core.replies; aiosmtpd's private API only through aiosmtpd_compat.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, AnyStr, cast

import structlog
from aiosmtpd.proxy_protocol import V2_CMD
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword, Session

from relay.config import ListenSettings, PolicySettings, Settings
from relay.core.hipaa import is_loopback
from relay.core.message import Prepared, Received
from relay.core.prepare import prepare
from relay.core.profiles import DEFAULT
from relay.core.replies import (
    CLEARTEXT_AFTER_STARTTLS,
    DATA_GO_AHEAD,
    DATA_TAKES_NO_ARGUMENT,
    HISTORY_BEHIND,
    INTERNAL_ERROR,
    MEMORY_BUDGET_FULL,
    NO_RECIPIENT,
    NO_SENDER,
    SHUTTING_DOWN,
    TLS_ALREADY_ACTIVE,
    TLS_REQUIRED,
    TOO_MANY_CONNECTIONS,
    Rejection,
    Reply,
    recipient_ok,
    sender_ok,
    too_many_client_connections,
    with_enhanced_code,
)
from relay.inbound import aiosmtpd_compat as compat
from relay.inbound.access import Refusal, check_client, check_proxy, check_recipient, check_sender, client_address
from relay.inbound.aiosmtpd_compat import CompatSMTP
from relay.inbound.auth import Authenticator, AuthGuard
from relay.inbound.limits import MemoryBudget, RateLimits, SharedBudget
from relay.inbound.profiles import ProfileRules
from relay.inbound.upload import Upload, prepared_in_a_thread
from relay.ops.logs import log_message
from relay.ops.metrics import Metrics

log = structlog.get_logger("relay.inbound.server")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
# A dot-atom address in angle brackets, then the parameters: parsed exactly as the email package would.
_PLAIN_ADDRESS = re.compile(rf"\s*<({_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>(.*)", re.DOTALL)

Deliver = Callable[[Prepared, "SessionInfo"], Awaitable[Reply]]


DATA_CHUNK = 65536  # bytes read at a time in DATA: each chunk is scanned at C speed (relay/inbound/upload.py)
SIZE_HEADROOM = 16384  # kept below listen.max_message_size for the Message-ID, Date and policy headers we add


def size_limit(listen: ListenSettings) -> int:
    """The SIZE we advertise and take in DATA: max_message_size, less room for the headers prepare adds, so that
    what goes to Infobip stays within max_message_size (prepare refuses it otherwise)."""
    return listen.max_message_size - min(SIZE_HEADROOM, listen.max_message_size // 10)


def new_queue_id() -> str:
    """Sortable by arrival (milliseconds), unique by 40 random bits: 11 + 10 hex digits."""
    return f"{int(time.time() * 1000):011x}{secrets.token_hex(5)}"


class SessionInfo:
    __slots__ = ("client_ip", "profile", "user")

    def __init__(self, client_ip: str, user: str | None = None, profile: str | None = None) -> None:
        self.client_ip = client_ip
        self.user = user  # after AUTH
        self.profile = profile  # picked at MAIL (None: not picked yet)


class Sessions:
    """The live client connections, and how many are inside DATA (drain waits for those)."""

    def __init__(self) -> None:
        self.live: set[RelaySMTP] = set()
        self.in_data = 0
        self._changed = asyncio.Event()
        self.per_client: collections.Counter[str] = collections.Counter()  # connections by client address
        self.stopping = False  # SIGTERM: sessions still open take no new transaction

    def stop_accepting(self) -> None:
        self.stopping = True

    def count_client(self, client_ip: str, cap: int) -> bool:
        """One more connection from `client_ip`, unless it holds `cap` already (0: no cap)."""
        if cap and self.per_client[client_ip] >= cap:
            return False
        self.per_client[client_ip] += 1
        return True

    def uncount_client(self, client_ip: str) -> None:
        self.per_client[client_ip] -= 1
        if self.per_client[client_ip] <= 0:
            del self.per_client[client_ip]

    def data_started(self) -> None:
        self.in_data += 1

    def data_finished(self) -> None:
        self.in_data -= 1
        self._changed.set()

    async def wait_until_no_data(self, deadline: float) -> None:
        while self.in_data > 0 and (remaining := deadline - time.monotonic()) > 0:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):  # not wait_for: on 3.11 it can swallow a cancel
                    await self._changed.wait()

    def close_all(self, reply: str | Reply) -> None:
        """Say `reply` to every client still connected and hang up, without waiting for them."""
        line = str(reply).encode() + b"\r\n"
        for session in list(self.live):
            transport = cast(asyncio.WriteTransport | None, session.transport)  # the TLS one after STARTTLS
            if transport is not None:
                transport.write(line)
                transport.close()


class RelaySession(Session):
    """aiosmtpd's session plus who the client is, as every check and log line needs it."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.client_ip = ""  # the TCP peer, or the PROXY header's source behind a balancer
        self.relay_user: str | None = None  # after AUTH
        self.pending_login: LoginPassword | None = None  # parsed by aiosmtpd's AUTH, for smtp_AUTH to check
        self.profile = DEFAULT  # picked at MAIL: which profile's limits, rules and credentials the message gets


@compat.keep_help
class RelaySMTP(CompatSMTP):
    """aiosmtpd's SMTP with our limits, access check at connect, and enhanced codes on every reply."""

    def __init__(self, handler: RelayHandler, sessions: Sessions) -> None:
        listen = handler.settings.listen
        self._sessions = sessions
        self._raw_replies = False
        self._unsent: list[bytes] = []
        self._counted_as: str | None = None  # the client address this connection counts under
        self._auth_failures = 0
        super().__init__(
            handler,
            line_length_limit=listen.max_line_length,  # legacy apps send long unwrapped lines
            data_size_limit=size_limit(listen),
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

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """The common `<user@example.com> PARAMS` without the email package's full parser (a hot path)."""
        match = _PLAIN_ADDRESS.fullmatch(arg) if arg else None
        if match is not None:
            return match.group(1), match.group(2)
        try:
            return super().parse_address(arg)
        except Exception:  # the email package raises IndexError on "user@": malformed, not our failure
            return None, None

    def new_session(self) -> RelaySession:
        return RelaySession(self.loop)

    async def smtp_AUTH(self, arg: str) -> None:
        """aiosmtpd's AUTH (TLS required, syntax, challenges), then our check, off the event loop and within the
        guessing limits (relay/inbound/auth.py)."""
        assert isinstance(self.session, RelaySession)
        if await self.event_handler.auth.refused_before(self, self.session):
            return
        self.session.pending_login = None
        await super().smtp_AUTH(arg)
        if self.session.pending_login is not None:  # else aiosmtpd has answered (no TLS, bad syntax, aborted)
            self._auth_failures += not await self.event_handler.auth.answer(self, self.session, self._auth_failures)

    async def smtp_MAIL(self, arg: str | None) -> None:
        """After SIGTERM a session still open gets 421 at its next MAIL, instead of a transaction the drain
        would cut short; one already in DATA finishes."""
        if self._sessions.stopping:
            assert isinstance(self.session, RelaySession)
            await self.refuse_connection(Refusal("shutting_down", SHUTTING_DOWN), self.session.client_ip)
            return
        await super().smtp_MAIL(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self.session is not None and self.session.ssl is not None:
            await self.push(str(TLS_ALREADY_ACTIVE))
            return
        await super().smtp_STARTTLS(arg)

    async def push(self, status: AnyStr) -> None:
        line = status if isinstance(status, bytes) else self._reply_line(status)
        self._unsent.append(line + b"\r\n")
        # A client that pipelines (RFC 2920) gets its 250s in one write with the next reply, instead
        # of a send() each; anything else (354, errors, a close to follow) goes out at once.
        if line.startswith(b"250") and compat.next_command_waiting(self):
            return
        out = compat.writer(self)
        out.write(b"".join(self._unsent))
        self._unsent.clear()
        await out.drain()

    def _reply_line(self, status: str) -> bytes:
        """A reply as the client gets it: no control characters, an enhanced code on every verdict."""
        text = _CONTROL.sub("?", status)  # aiosmtpd echoes commands and arguments: never raw bytes
        if not self._raw_replies or text[:1] in ("4", "5"):
            rewritten = with_enhanced_code(text)
            if rewritten != text and rewritten[:1] in ("4", "5"):  # one of aiosmtpd's own refusals
                self.event_handler.metrics.rejected.labels(compat.stock_refusal_reason(text)).inc()
            text = rewritten
        return text.encode("ascii", "replace")

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

    async def refuse(self, refusal: Refusal) -> None:
        """Count the refusal under its reason and say so; the session goes on."""
        self.event_handler.metrics.rejected.labels(refusal.reason).inc()
        await self.push(str(refusal.reply))

    async def refuse_connection(self, refusal: Refusal, client_ip: str) -> None:
        log.warning("client_refused", client_ip=client_ip, reply=str(refusal.reply))
        await self.refuse(refusal)
        assert self.transport is not None
        self.transport.close()

    async def admit(self) -> bool:
        assert isinstance(self.session, RelaySession)
        listen = self.event_handler.settings.listen
        peer_ip = str(client_address(self.session.peer))
        self.session.client_ip = peer_ip
        # Behind a balancer the TCP peer is the balancer: it must be a trusted proxy, then PROXY says who sent
        # (and that client is checked and counted in handle_PROXY).
        if listen.proxy_protocol:
            refusal = check_proxy(self.session.peer, listen.trusted_proxies)
        else:
            refusal = check_client(self.session.peer, listen.allowed_networks)
        if refusal is None and len(self._sessions.live) > listen.max_connections:
            refusal = Refusal("too_many_connections", TOO_MANY_CONNECTIONS)
        if refusal is None and not listen.proxy_protocol:
            refusal = self.count_client(peer_ip)
        if refusal is not None:
            await self.refuse_connection(refusal, peer_ip)
            return False
        return True

    def connection_made(self, transport: Any) -> None:
        self._sessions.live.add(self)
        before = self.session
        # After STARTTLS: bytes that came in clear before the switch are an injection (CVE-2011-0411).
        injected = compat.buffered(self) if isinstance(before, RelaySession) else 0
        super().connection_made(transport)
        if isinstance(before, RelaySession) and isinstance(self.session, RelaySession):
            self.session.client_ip = before.client_ip  # after STARTTLS aiosmtpd starts a new session
            if injected:
                log.warning("client_refused", client_ip=before.client_ip, reply=str(CLEARTEXT_AFTER_STARTTLS))
                self.event_handler.metrics.rejected.labels("starttls_injection").inc()
                transport.write(str(CLEARTEXT_AFTER_STARTTLS).encode() + b"\r\n")
                transport.close()

    def count_client(self, client_ip: str) -> Refusal | None:
        """Take one of `client_ip`'s connection slots (listen.connections_per_client), or say no."""
        cap = self.event_handler.settings.listen.connections_per_client
        if not self._sessions.count_client(client_ip, cap):
            return Refusal("too_many_connections", too_many_client_connections(client_ip, cap))
        self._counted_as = client_ip
        return None

    def connection_lost(self, error: Exception | None) -> None:
        self._sessions.live.discard(self)
        if self._counted_as is not None:
            self._sessions.uncount_client(self._counted_as)
            self._counted_as = None
        super().connection_lost(error)

    async def smtp_DATA(self, arg: str) -> None:
        """DATA, as aiosmtpd does it, plus: the memory budget, and time limits that let a slow upload
        finish while it makes progress but drop a client that trickles bytes forever."""
        self._sessions.data_started()
        try:
            if await self._data_may_start(arg):
                await self.push(DATA_GO_AHEAD)
                await self._data()
        finally:
            self._sessions.data_finished()

    async def _data_may_start(self, arg: str) -> bool:
        """The checks before the 354; each refusal is said here."""
        assert self.envelope is not None
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return False
        if self.envelope.mail_from is None:
            await self.push(str(NO_SENDER))
        elif not self.envelope.rcpt_tos:
            await self.push(str(NO_RECIPIENT))
        elif arg:
            await self.push(str(DATA_TAKES_NO_ARGUMENT))
        elif self.event_handler.budget.exhausted:
            await self.refuse(Refusal("memory_budget", MEMORY_BUDGET_FULL))
        else:
            return True
        return False

    async def _data(self) -> None:
        listen = self.event_handler.settings.listen
        upload = Upload(self.event_handler.budget, size_limit(listen), listen.max_line_length)
        try:
            if not await self._receive(upload):
                return  # the client is gone, or was dropped
            if upload.refusal is None:
                upload.hold_for_parsing(listen.max_header_bytes)
            if upload.refusal is not None:
                log_refused_upload(self.session, self.envelope, upload)
                compat.end_transaction(self)
                return await self.refuse(upload.refusal)
            assert self.envelope is not None
            # Handed on as is: bytes(data) would copy up to 20 MB. Readers only use the bytes API.
            self.envelope.original_content = self.envelope.content = cast(bytes, upload.take())
            compat.pause_idle_timer(self)  # waiting for Infobip's verdict is not the client idling
            try:
                status = await self.event_handler.handle_DATA(self, self.session, self.envelope)
            finally:
                compat.restart_idle_timer(self)
            compat.end_transaction(self)
            await self.push(status)
        finally:
            upload.release()

    async def _receive(self, upload: Upload) -> bool:
        """Read to the end of data into `upload`, in large chunks so that no client holds the loop; False when
        the client is gone or dropped: past data_timeout, or told off at once for a bare-LF end of data."""
        assert self.transport is not None and isinstance(self.session, RelaySession)
        listen = self.event_handler.settings.listen
        stream = compat.reader(self)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + listen.data_timeout
        last_progress = loop.time()
        progress_step = min(1.0, listen.timeout / 4)  # re-arming the timer per chunk would cost a handle each
        while not upload.ended:
            chunk = await stream.read(DATA_CHUNK)
            if not chunk:
                self.transport.close()
                return False
            used = upload.feed(chunk)
            if used < len(chunk):
                compat.unread(self, chunk[used:])  # pipelined commands behind the dot
            if not upload.ended:  # the stream may hold megabytes already: let other clients in between chunks
                await asyncio.sleep(0)  # (not after the last one: a small message would wait a loop turn for nothing)
            now = loop.time()
            if now - last_progress > progress_step:  # a slow upload making progress is not idle
                compat.restart_idle_timer(self)
                last_progress = now
            if now > deadline:
                log.warning("data_timeout", client_ip=self.session.client_ip, seconds=listen.data_timeout)
                self.transport.close()
                return False
        if upload.hang_up and upload.refusal is not None:
            log_refused_upload(self.session, self.envelope, upload)
            await self.refuse(upload.refusal)
            self.transport.close()
            return False
        return True


def log_refused_upload(session: Any, envelope: Any, upload: Upload) -> None:
    """A message refused while it came in (too big, a line too long, a bare LF): the line ops look for when an
    app says its mail was refused, as for the checks at the end of DATA (RelayHandler.handle_DATA)."""
    assert upload.refusal is not None
    log_message(
        log, "message_rejected", queue_id=new_queue_id(), client_ip=session.client_ip,
        sender=envelope.mail_from or "", recipients=len(envelope.rcpt_tos), size=upload.received,
        outcome="rejected", reply=str(upload.refusal.reply), reason=upload.refusal.reason,
    )  # fmt: skip


class RelayHandler:
    """aiosmtpd hooks: check at MAIL and RCPT, prepare and deliver at DATA."""

    def __init__(
        self,
        settings: Settings,
        deliver: Deliver,
        metrics: Metrics,
        shared_budget: SharedBudget | None = None,
        backlogged: Callable[[], bool] = lambda: False,
    ) -> None:
        self.deliver = deliver
        self.backlogged = backlogged  # the message history is held up (relay/outcomes): no new mail for now
        self.metrics = metrics
        self.shared_budget = shared_budget  # replicas: messages_per_minute for the cluster (relay/cluster)
        self.budget = MemoryBudget(settings.limits.memory_budget)
        self.auth_guard = AuthGuard(settings.listen)  # kept across reloads: a SIGHUP does not forgive guessing
        self.apply(settings)

    def apply(self, settings: Settings) -> None:
        """Take a (re)loaded config: new sessions see it; sessions already open keep their limits."""
        self.settings = settings
        self.limits = RateLimits(settings.limits, self.shared_budget)
        self.budget.limit = settings.limits.memory_budget
        self.users = {user.username: user for user in settings.listen.users}
        self.auth = Authenticator(settings.listen, self.metrics, self.auth_guard)
        self.profiles = ProfileRules(settings)
        self.tls_context: ssl.SSLContext | None = None
        listen = settings.listen
        if listen.tls_cert_file is not None and listen.tls_key_file is not None:
            self.tls_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            self.tls_context.minimum_version = ssl.TLSVersion.TLSv1_2
            self.tls_context.load_cert_chain(listen.tls_cert_file, listen.tls_key_file)

    def authenticate(self, server: SMTP, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
        """aiosmtpd has parsed AUTH PLAIN/LOGIN: keep the credentials for RelaySMTP.smtp_AUTH, which checks
        them off the event loop and answers (handled: aiosmtpd says nothing itself)."""
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        session.pending_login = auth_data
        return AuthResult(success=False, handled=True)

    async def handle_PROXY(self, server: RelaySMTP, session: Any, envelope: Any, proxy_data: Any) -> bool:
        """Behind a load balancer: the PROXY header's source is the client for every check, count and log.
        A v2 LOCAL header (the balancer's own health check) names no client: its addresses are ignored and
        the balancer itself is the client."""
        if getattr(proxy_data, "version", None) == 2 and getattr(proxy_data, "command", None) == V2_CMD.LOCAL:
            peer = session.peer
        else:
            source = getattr(proxy_data, "src_addr", None)
            if not getattr(proxy_data, "valid", False) or source is None:
                return False
            peer = (str(source), getattr(proxy_data, "src_port", 0))
        client_ip = str(client_address(peer))
        refusal = check_client(peer, self.settings.listen.allowed_networks) or server.count_client(client_ip)
        if refusal is not None:
            await server.refuse_connection(refusal, client_ip)
            return False
        session.client_ip = client_ip
        return True

    def _refused(self, refusal: Refusal) -> str:
        self.metrics.rejected.labels(refusal.reason).inc()
        return str(refusal.reply)

    async def handle_EHLO(
        self, server: RelaySMTP, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        listen = self.settings.listen
        lines = [listen.hostname, f"SIZE {size_limit(listen)}", "8BITMIME", "PIPELINING", "ENHANCEDSTATUSCODES"]
        if self.tls_context is not None and session.ssl is None:
            lines.append("STARTTLS")
        if self.users and session.ssl is not None:
            lines.append("AUTH PLAIN LOGIN")
        return [f"250-{line}" for line in lines] + ["250 HELP"]

    def sender_domains(self, session: Any) -> list[str]:
        """The allowlist this client is held to: its AUTH user's own when it has one, else the policy's."""
        user = self.users.get(session.relay_user or "")
        return (user.allowed_sender_domains if user else None) or self.settings.policy.allowed_sender_domains

    async def handle_MAIL(
        self, server: RelaySMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.settings.listen.require_tls and session.ssl is None and not is_loopback(session.client_ip):
            return self._refused(Refusal("tls_required", TLS_REQUIRED))  # a sidecar on loopback may stay plain
        if self.backlogged():
            return self._refused(Refusal("history_behind", HISTORY_BEHIND))
        refusal = check_sender(address, self.sender_domains(session)) or await self.limits.admit(
            session.client_ip, time.monotonic()
        )
        if refusal is not None:
            return self._refused(refusal)
        session.profile = self.profiles.select(address, session.client_ip, session.relay_user)
        refusal = self.profiles.admit(session.profile, time.monotonic())
        if refusal is not None:
            return self._refused(refusal)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(sender_ok(address))

    async def handle_RCPT(
        self, server: RelaySMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        refusal = check_recipient(
            address, len(envelope.rcpt_tos), self.settings.listen.max_recipients
        ) or self.limits.recipient(session.client_ip, time.monotonic())
        if refusal is not None:
            return self._refused(refusal)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return str(recipient_ok(address))

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
            allowed_sender_domains=tuple(self.sender_domains(session)),
        )
        envelope.original_content = envelope.content = b""  # the Received holds the only reference
        self.metrics.received.inc()
        try:
            prepared = await self._prepare(received, self.profiles.policy(session.profile))
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
            return self._refused(Refusal(rejection.reason, rejection.reply))
        del received
        return str(await self.deliver(prepared, SessionInfo(client_ip, session.relay_user, session.profile)))

    async def _prepare(self, received: Received, policy: PolicySettings) -> Prepared:
        """prepare() on the loop for the usual message; in a thread when its header block is big enough to keep
        other clients waiting (tests/test_loop_responsive.py). It is pure, so either is the same."""
        if prepared_in_a_thread(received.data):
            return await asyncio.to_thread(prepare, received, policy, self.settings.listen)
        return prepare(received, policy, self.settings.listen)

    async def handle_exception(self, error: Exception) -> str:
        log.error("session_error", error_type=type(error).__name__)
        return str(INTERNAL_ERROR)
