"""The contract with aiosmtpd's private API: every use in relay/inbound/aiosmtpd_compat.py, pinned here.

If an aiosmtpd upgrade renames, removes or changes one of these, a test below fails and names it. Each
private name gets a shape check (it exists, with the signature we call it with) and, where cheap, a
behavioural check through a real socket on a bare `CompatSMTP` (no relay around it).
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import re
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiosmtpd
import aiosmtpd.smtp
import pytest
import trustme
from aiosmtpd.smtp import SMTP, Envelope, Session

from relay.config import Settings
from relay.inbound import aiosmtpd_compat as compat
from relay.inbound.aiosmtpd_compat import CompatSMTP
from relay.inbound.server import RelayHandler, RelaySMTP, Sessions
from relay.ops.metrics import Metrics
from tests.conftest import Dialog

SOURCE = inspect.getsource(aiosmtpd.smtp)


def parameters(function: Any) -> list[str]:
    return list(inspect.signature(function).parameters)


# --- shapes ---------------------------------------------------------------------------------------


def test_the_version_is_the_one_pinned() -> None:
    # pyproject: aiosmtpd>=1.4.6,<1.5. A new minor version: re-read aiosmtpd_compat.py against its source.
    major, minor, patch = (int(part) for part in aiosmtpd.__version__.split(".")[:3])
    assert (1, 4, 6) <= (major, minor, patch) < (1, 5, 0), aiosmtpd.__version__


@pytest.mark.parametrize(
    ("name", "expected", "is_coroutine"),
    [
        ("_getaddr", ["self", "arg"], False),  # CompatSMTP.parse_address
        ("_create_session", ["self"], False),  # CompatSMTP.new_session
        ("_handle_client", ["self"], True),  # CompatSMTP.admit
        ("_set_post_data_state", ["self"], False),  # end_transaction
        ("_reset_timeout", ["self", "duration"], False),  # restart_idle_timer; CompatSMTP's lazy idle timer
        ("_timeout_cb", ["self"], False),  # what CompatSMTP's idle timer calls when the deadline has passed
        ("_cb_client_connected", ["self", "reader", "writer"], False),  # sets _reader, _writer: reader(), writer()
        ("check_helo_needed", ["self", "helo"], True),  # called by our DATA
        ("check_auth_needed", ["self", "caller_method"], True),
        ("push", ["self", "status"], True),  # every reply goes through it: ours adds enhanced codes
        ("connection_made", ["self", "transport"], False),
        ("connection_lost", ["self", "error"], False),
        ("smtp_DATA", ["self", "arg"], True),
        ("smtp_MAIL", ["self", "arg"], True),  # ours refuses with 421 while stopping, else hands over
        ("smtp_AUTH", ["self", "arg"], True),  # ours checks what the authenticator kept, after it
        ("smtp_STARTTLS", ["self", "arg"], True),
        ("smtp_EHLO", ["self", "hostname"], True),
        ("smtp_HELO", ["self", "hostname"], True),
    ],
)
def test_the_methods_we_override_or_call_keep_their_shape(name: str, expected: list[str], is_coroutine: bool) -> None:
    method = getattr(SMTP, name)
    assert parameters(method) == expected
    assert inspect.iscoroutinefunction(method) is is_coroutine


def test_the_constructor_takes_the_options_the_relay_passes() -> None:
    options = {"handler", "data_size_limit", "hostname", "ident", "timeout", "enable_SMTPUTF8", "decode_data"}
    options |= {"tls_context", "require_starttls", "auth_required", "auth_require_tls", "authenticator"}
    options |= {"proxy_protocol_timeout", "loop"}
    assert options <= set(parameters(SMTP.__init__))
    assert parameters(Session.__init__) == ["self", "loop"]


def test_the_class_attributes_compat_sets_before_the_constructor() -> None:
    assert isinstance(SMTP.line_length_limit, int)
    assert isinstance(SMTP.command_size_limits, collections.defaultdict)
    assert SMTP.command_size_limits["ANY"] == SMTP.command_size_limit == 512
    init = inspect.getsource(SMTP.__init__)
    assert "limit=self.line_length_limit" in init  # the StreamReader's line limit comes from the attribute
    assert "self.command_size_limits.clear()" in init  # why each session needs a dict of its own


async def test_the_private_attributes_compat_reads() -> None:
    for attribute in (
        "self._reader = reader",
        "self._writer = writer",
        "self._timeout_handle",
        "self.envelope =",
        "self._timeout_duration = timeout",
    ):
        assert attribute in SOURCE, attribute
    assert "self._timeout_handle: Optional[asyncio.TimerHandle] = None" in SOURCE
    assert isinstance(asyncio.StreamReader()._buffer, bytearray)  # next_command_waiting and buffered look into it
    assert "self._reader._buffer.clear()" in SOURCE  # after STARTTLS: the cleartext bytes `buffered` counts first


def test_an_authenticator_result_marked_handled_makes_auth_say_nothing() -> None:
    # RelayHandler.authenticate keeps the credentials and returns AuthResult(success=False, handled=True), so
    # aiosmtpd's AUTH answers nothing and RelaySMTP.smtp_AUTH answers after checking them off the event loop.
    auth = inspect.getsource(SMTP.smtp_AUTH)
    assert "if auth_result.handled:\n                        status = None" in auth
    assert "if status is not None:" in auth and "self._authenticate(" in inspect.getsource(SMTP.auth_PLAIN)
    assert "self._authenticate(" in inspect.getsource(SMTP.auth_LOGIN)


def test_the_size_refusals_are_the_only_stock_552s() -> None:
    stock = {match.group(1) for match in re.finditer(r"""['"](552 [^'"]*)""", SOURCE)}
    assert len(stock) == len(compat.STOCK_SIZE_REFUSALS)
    for prefix in compat.STOCK_SIZE_REFUSALS:
        assert any(line.startswith(prefix) for line in stock), prefix
        assert compat.stock_refusal_reason(prefix + " ...") == "size"
    assert compat.stock_refusal_reason("503 Error: need MAIL command") == "protocol"


def test_our_names_do_not_shadow_aiosmtpd_ones() -> None:
    # CompatSMTP's own extension points, and every private name RelaySMTP adds, must be new to aiosmtpd:
    # otherwise aiosmtpd would call (or overwrite) ours meaning something else.
    ours = {"new_session", "parse_address", "admit"}
    ours |= {name for name in vars(RelaySMTP) if name.startswith("_") and not name.startswith("__")}
    clashes = {name for name in ours if hasattr(SMTP, name)}
    assert clashes == set()


async def test_instance_attributes_of_ours_are_new_to_aiosmtpd() -> None:
    loop = asyncio.get_running_loop()
    plain = SMTP(object(), loop=loop)
    relay = RelaySMTP(RelayHandler(Settings(), deliver, Metrics()), Sessions())
    added = set(vars(relay)) - set(vars(plain)) - {"line_length_limit", "command_size_limits"}
    assert added and not any(hasattr(SMTP, name) for name in added)


async def deliver(*args: Any) -> Any:
    raise AssertionError("not reached")


# --- behaviour, with a bare CompatSMTP over a real socket ----------------------------------------------


@dataclass
class Seen:
    admit: bool = True
    sessions: list[Session] = field(default_factory=list)
    parsed: list[str] = field(default_factory=list)
    pipelined: list[bool] = field(default_factory=list)
    buffered: list[int] = field(default_factory=list)
    servers: list[Probe] = field(default_factory=list)


class Handler:
    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        return "250 OK"


class Probe(CompatSMTP):
    """Records what aiosmtpd calls, through compat's names only."""

    def __init__(self, seen: Seen, line_length_limit: int, tls_context: ssl.SSLContext | None) -> None:
        self.seen = seen
        seen.servers.append(self)
        super().__init__(Handler(), line_length_limit=line_length_limit, tls_context=tls_context, timeout=30)

    def new_session(self) -> Session:
        session = super().new_session()
        self.seen.sessions.append(session)
        return session

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        self.seen.parsed.append(arg)
        return super().parse_address(arg)

    async def admit(self) -> bool:
        if not self.seen.admit:
            assert self.transport is not None
            self.transport.close()
        return self.seen.admit

    async def smtp_NOOP(self, arg: str) -> None:
        self.seen.pipelined.append(compat.next_command_waiting(self))
        self.seen.buffered.append(compat.buffered(self))
        await super().smtp_NOOP(arg)


@dataclass
class Served:
    port: int
    seen: Seen


@pytest.fixture
def tls() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


@pytest.fixture
async def serve(tls: tuple[ssl.SSLContext, ssl.SSLContext]) -> AsyncIterator[Any]:
    servers: list[asyncio.Server] = []

    async def start(line_length_limit: int = 1001) -> Served:
        seen = Seen()
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: Probe(seen, line_length_limit, tls[0]), "127.0.0.1", 0)
        servers.append(server)
        return Served(int(server.sockets[0].getsockname()[1]), seen)

    yield start
    for server in servers:
        server.close()
        await server.wait_closed()


async def opened(port: int) -> Dialog:
    dialog = await Dialog.open(port)
    assert (await dialog.reply()).startswith("220 ")
    assert (await dialog.send("EHLO client.test")).startswith("250-")
    return dialog


async def test_admit_runs_before_the_greeting(serve: Any) -> None:
    served = await serve()
    served.seen.admit = False
    dialog = await Dialog.open(served.port)
    assert await dialog.reader.read() == b""  # closed, and not a byte said
    await dialog.close()
    served.seen.admit = True
    dialog = await opened(served.port)
    await dialog.close()


async def test_parse_address_parses_mail_and_rcpt(serve: Any) -> None:
    served = await serve()
    dialog = await opened(served.port)
    assert (await dialog.send("MAIL FROM:<a@example.com> BODY=8BITMIME")).startswith("250")
    assert (await dialog.send("RCPT TO:<b@example.org>")).startswith("250")
    assert (await dialog.send("RCPT TO:<b@>")).startswith("553")
    await dialog.close()
    assert served.seen.parsed == ["<a@example.com> BODY=8BITMIME", "<b@example.org>", "<b@>"]


async def test_new_session_at_connect_and_again_after_starttls(
    serve: Any, tls: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    # RelaySMTP.connection_made carries the client's address over to the session STARTTLS starts.
    served = await serve()
    dialog = await opened(served.port)
    [first] = served.seen.sessions
    assert (await dialog.send("STARTTLS")).startswith("220")
    await dialog.writer.start_tls(tls[1], server_hostname="localhost")
    assert (await dialog.send("EHLO client.test")).startswith("250-")
    await dialog.close()
    [_, second] = served.seen.sessions
    assert second is not first and second.ssl is not None


async def test_next_command_waiting_sees_a_pipelined_line(serve: Any) -> None:
    served = await serve()
    dialog = await opened(served.port)
    dialog.writer.write(b"NOOP\r\nNOOP\r\n")
    assert await dialog.reply() == await dialog.reply() == "250 OK"
    assert await dialog.send("NOOP") == "250 OK"
    await dialog.close()
    assert served.seen.pipelined == [True, False, False]


async def test_buffered_counts_the_bytes_received_behind_the_current_command(serve: Any) -> None:
    served = await serve()
    dialog = await opened(served.port)
    dialog.writer.write(b"NOOP\r\nNOOP\r\nQU")
    assert await dialog.reply() == await dialog.reply() == "250 OK"
    assert await dialog.send("IT") == "221 Bye"
    await dialog.close()
    assert served.seen.buffered == [len(b"NOOP\r\nQU"), len(b"QU")]


async def test_line_length_limit_is_the_stream_limit(serve: Any) -> None:
    line = b"x" * 3000 + b"\r\n"
    for limit, reply in ((1001, "500 Line too long"), (4000, "250 OK")):
        served = await serve(line_length_limit=limit)
        dialog = await opened(served.port)
        assert (await dialog.send("MAIL FROM:<a@example.com>")).startswith("250")
        assert (await dialog.send("RCPT TO:<b@example.org>")).startswith("250")
        assert (await dialog.send("DATA")).startswith("354")
        assert (await dialog.send(b"Subject: x\r\n\r\n" + line + b".\r\n")).startswith(reply)
        await dialog.close()


async def test_command_size_limits_are_per_session(serve: Any) -> None:
    served = await serve()
    first, second = await opened(served.port), await opened(served.port)
    await first.close()
    await second.close()
    one, two = served.seen.servers
    assert one.command_size_limits is not two.command_size_limits
    assert one.command_size_limits is not SMTP.command_size_limits


async def test_the_reader_writer_and_idle_timer_of_a_live_session(serve: Any) -> None:
    served = await serve()
    dialog = await opened(served.port)
    [probe] = served.seen.servers
    assert isinstance(compat.reader(probe), asyncio.StreamReader)
    assert isinstance(compat.writer(probe), asyncio.StreamWriter)
    loop = asyncio.get_running_loop()
    compat.restart_idle_timer(probe)
    handle = probe._timeout_handle
    assert handle is not None and not handle.cancelled()  # the loop's TimerHandle (uvloop's is not asyncio's class)
    # the `timeout` the server was built with (uvloop's millisecond clock can put when() a hair past 30)
    assert 25 < handle.when() - loop.time() <= 30.01
    compat.pause_idle_timer(probe)
    assert handle.cancelled() and probe._timeout_handle is handle  # connection_lost asserts it is not None
    compat.restart_idle_timer(probe)
    assert not probe._timeout_handle.cancelled()
    armed = probe._timeout_handle
    for _ in range(3):  # each command moves the deadline; the one armed timer stays
        assert (await dialog.send("NOOP")).startswith("250")
    assert probe._timeout_handle is armed and not armed.cancelled()
    await dialog.close()


async def test_end_transaction_leaves_a_fresh_envelope(serve: Any) -> None:
    served = await serve()
    dialog = await opened(served.port)
    assert (await dialog.send("MAIL FROM:<a@example.com>")).startswith("250")
    [probe] = served.seen.servers
    assert probe.envelope is not None and probe.envelope.mail_from == "a@example.com"
    compat.end_transaction(probe)
    assert isinstance(probe.envelope, Envelope) and probe.envelope.mail_from is None
    assert probe.envelope.rcpt_tos == []
    assert (await dialog.send("MAIL FROM:<c@example.com>")).startswith("250")  # no "nested MAIL"
    await dialog.close()


async def test_unread_bytes_are_the_next_the_command_loop_reads(serve: Any) -> None:
    served = await serve()
    dialog = await opened(served.port)
    dialog.writer.write(b"NOOP\r\nNO")
    assert await dialog.reply() == "250 OK"
    [server] = served.seen.servers
    compat.unread(server, b"NOOP\r\n")  # as if read past the end of data and put back
    assert await dialog.send("OP") == "250 OK"
    assert await dialog.reply() == "250 OK"
    await dialog.close()


def test_command_lines_are_logged_through_the_module_global_compat_replaces(caplog: pytest.LogCaptureFixture) -> None:
    handle_client = inspect.getsource(SMTP._handle_client)
    assert "sanitized_log(log.info, '%r >> %r', self.session.peer, line)" in handle_client
    assert aiosmtpd.smtp.sanitized_log is compat.sanitized_log_when_enabled
    mail_log = logging.getLogger("mail.log")
    mail_log.setLevel(logging.INFO)
    try:
        with caplog.at_level(logging.INFO, logger="mail.log"):
            compat.sanitized_log_when_enabled(mail_log.info, "%r >> %r", "peer", b"AUTH PLAIN c2VjcmV0\r\n")
            compat.sanitized_log_when_enabled(mail_log.debug, "%r", b"not logged at INFO")
    finally:
        mail_log.setLevel(logging.ERROR)
    assert [r.getMessage() for r in caplog.records] == ["'peer' >> b'AUTH PLAIN ********\\r\\n'"]
