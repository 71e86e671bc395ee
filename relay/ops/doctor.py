"""`relay doctor`: walk the path to Infobip step by step and say in plain words which step fails."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime

from relay.config import Settings
from relay.core.message import Prepared, Received
from relay.core.prepare import prepare
from relay.core.smtp_client import queued_id
from relay.upstream.connection import UpstreamConnection
from relay.upstream.errors import (
    UpstreamAuthError,
    UpstreamConnectError,
    UpstreamError,
    UpstreamGreetingError,
    UpstreamTLSError,
    UpstreamUnreachable,
)
from relay.upstream.tls import make_tls_context

ADVICE = {
    "dns": "check upstream.host and this machine's DNS (resolv.conf, a corporate resolver?)",
    "tcp": "check that outbound TCP to upstream.host:upstream.port is allowed (firewall, proxy, egress policy)",
    "greeting": "the server answered, but not as SMTP: is upstream.port right (587 STARTTLS, 465 implicit)?",
    "tls": "STARTTLS or the certificate failed: check upstream.tls, upstream.ca_file (a TLS-inspecting proxy needs its "
    "CA there) and the system clock",
    "auth": "Infobip refused the credentials: check RELAY_UPSTREAM__USERNAME / RELAY_UPSTREAM__PASSWORD (or the "
    "*_file secrets)",
    "mail": "Infobip refused the sender: use a sender on a domain verified in your Infobip account (--from)",
    "send": "Infobip refused the test message: its reply above says why",
}
# The step each handshake failure names; EHLO fails as "greeting" (same advice: is it SMTP on that port?).
FAILED_STEP: dict[type[UpstreamUnreachable], str] = {
    UpstreamConnectError: "tcp",
    UpstreamGreetingError: "greeting",
    UpstreamTLSError: "tls",
    UpstreamAuthError: "auth",
}


async def doctor(settings: Settings, sender: str, send_test: str | None, say: Callable[[str], None]) -> int:
    """Exit status 0 when every step passes; otherwise 1, after naming the failed step."""
    upstream = settings.upstream

    def ok(step: str, detail: str) -> None:
        say(f"  ok    {step:<8} {detail}")

    say(f"relay doctor: checking the path to {upstream.host}:{upstream.port} ({upstream.tls})")
    started = time.monotonic()
    try:
        addresses = await asyncio.wait_for(
            asyncio.get_running_loop().getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM),
            upstream.connect_timeout,
        )
    except (OSError, TimeoutError) as exc:
        return _failed("dns", f"cannot resolve {upstream.host}: {exc}", say)
    ok("dns", ", ".join(sorted({str(a[4][0]) for a in addresses})))
    try:
        connection = await UpstreamConnection.open(
            upstream, make_tls_context(upstream), settings.listen.hostname, 1, progress=ok
        )
    except UpstreamUnreachable as exc:
        return _failed(_failed_step(exc), exc.reply.text, say)
    try:
        reply = await connection.probe(sender)
        if not reply.ok:
            return _failed("mail", f"MAIL FROM:<{sender}> answered {reply}", say)
        ok("mail", f"MAIL FROM:<{sender}> accepted ({reply}); RSET, nothing was sent")
        if send_test is not None:
            message = _test_message(settings, sender, send_test)
            result = await connection.transact(message)
            if not result.final.ok:
                return _failed("send", f"the test message was refused: {result.final}", say)
            ok("send", f"test message to {send_test} accepted; Infobip message id {queued_id(result.final)}")
    except UpstreamError as exc:
        return _failed("send" if send_test else "mail", exc.reply.text, say)
    finally:
        await connection.quit()
    say(f"all good in {time.monotonic() - started:.2f} s")
    return 0


def _failed_step(exc: UpstreamUnreachable) -> str:
    """The class of a handshake failure says which step failed; no guessing from reply codes."""
    return next((step for error, step in FAILED_STEP.items() if isinstance(exc, error)), "tcp")


def _failed(step: str, why: str, say: Callable[[str], None]) -> int:
    say(f"  FAIL  {step:<8} {why}")
    say(f"what to check: {ADVICE.get(step, 'see the reply above')}")
    return 1


def _test_message(settings: Settings, sender: str, to: str) -> Prepared:
    now = datetime.now(UTC)
    data = (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: relay doctor test message\r\n\r\n"
        f"Sent by `relay doctor --send-test` from {settings.listen.hostname} at {now.isoformat()}.\r\n"
    ).encode()
    queue_id = f"doctor{int(now.timestamp())}"
    received = Received(queue_id, "127.0.0.1", sender, (to,), data, now, settings.listen.hostname)
    return prepare(received, settings.policy)
