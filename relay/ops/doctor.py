"""`relay doctor`: walk the path to Infobip step by step and say in plain words which step fails."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime

from relay.config import Settings, UpstreamSettings
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


DOCTOR_TIMEOUT = 10.0  # seconds at most for each step: a port where nothing answers is named, not waited out


async def doctor(settings: Settings, sender: str, send_test: str | None, say: Callable[[str], None]) -> int:
    """Exit status 0 when every step passes; otherwise 1, after naming the failed step."""
    upstream = settings.upstream
    say(f"relay doctor: checking the path to {upstream.host}:{upstream.port} ({upstream.tls})")
    started = time.monotonic()
    failed = await _reach(settings, say)
    if isinstance(failed, int):
        return failed
    connection = failed
    try:
        reply = await connection.probe(sender)
        if not reply.ok:
            return _failed("mail", f"MAIL FROM:<{sender}> answered {reply}", say, upstream)
        _ok(say, "mail", f"MAIL FROM:<{sender}> accepted ({reply}); RSET, nothing was sent")
        if send_test is not None:
            message = _test_message(settings, sender, send_test)
            result = await connection.transact(message)
            if not result.final.ok:
                return _failed("send", f"the test message was refused: {result.final}", say, upstream)
            _ok(say, "send", f"test message to {send_test} accepted; Infobip message id {queued_id(result.final)}")
    except UpstreamError as exc:
        return _failed("send" if send_test else "mail", exc.reply.text, say, upstream)
    finally:
        await connection.quit()
    say(f"all good in {time.monotonic() - started:.2f} s")
    return 0


def _ok(say: Callable[[str], None], step: str, detail: str) -> None:
    say(f"  ok    {step:<8} {detail}")


async def _reach(settings: Settings, say: Callable[[str], None]) -> UpstreamConnection | int:
    """DNS, then a plain TCP connect of our own (so a failure after it is the TLS or SMTP layer's), then
    the relay's own connection: greeting, EHLO, TLS, AUTH. Each wait is announced and bounded."""
    upstream = settings.upstream.model_copy(
        update={
            "connect_timeout": min(settings.upstream.connect_timeout, DOCTOR_TIMEOUT),
            "command_timeout": min(settings.upstream.command_timeout, DOCTOR_TIMEOUT),
        }
    )
    host, port = upstream.host, upstream.port
    try:
        async with asyncio.timeout(upstream.connect_timeout):
            addresses = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError) as exc:
        return _failed("dns", f"cannot resolve {host}: {exc}", say, upstream)
    _ok(say, "dns", ", ".join(sorted({str(a[4][0]) for a in addresses})))
    say(f"  ...   {'tcp':<8} connecting (at most {upstream.connect_timeout:g} s)")
    try:
        async with asyncio.timeout(upstream.connect_timeout):
            _, writer = await asyncio.open_connection(host, port)
    except (OSError, TimeoutError) as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        return _failed("tcp", UpstreamConnectError(host, port, why).reply.text, say, upstream)
    _ok(say, "tcp", f"connected to {writer.get_extra_info('peername')}")
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    step, first = ("tls", "the TLS handshake") if upstream.tls == "implicit" else ("greeting", "the 220 greeting")
    say(f"  ...   {step:<8} waiting for {first} (at most {upstream.command_timeout:g} s)")

    def progress(step: str, detail: str) -> None:
        if step != "tcp":  # said above
            _ok(say, step, detail)

    try:
        return await UpstreamConnection.open(
            upstream, make_tls_context(upstream), settings.listen.hostname, 1, progress
        )
    except UpstreamUnreachable as exc:
        step = _failed_step(exc)
        if step == "tcp" and upstream.tls == "implicit":  # TCP worked a moment ago: the handshake broke
            step = "tls"
        return _failed(step, exc.reply.text, say, upstream, timed_out=exc.why == "timed out")


def _failed_step(exc: UpstreamUnreachable) -> str:
    """The class of a handshake failure says which step failed; no guessing from reply codes."""
    return next((step for error, step in FAILED_STEP.items() if isinstance(exc, error)), "tcp")


def _failed(
    step: str, why: str, say: Callable[[str], None], upstream: UpstreamSettings, *, timed_out: bool = False
) -> int:
    say(f"  FAIL  {step:<8} {why}")
    say(f"what to check: {_advice(step, upstream, timed_out)}")
    return 1


def _advice(step: str, upstream: UpstreamSettings, timed_out: bool) -> str:
    """A wrong upstream.tls for the port fails as TLS (implicit against STARTTLS) or as a silent greeting
    (STARTTLS against implicit): say so rather than blame the firewall."""
    if step == "tls" and upstream.tls == "implicit":
        return (
            f'upstream.tls = "implicit" but {upstream.host}:{upstream.port} does not speak TLS from its first byte: '
            'is upstream.tls right? (587 wants "starttls", 465 "implicit"); otherwise ' + ADVICE["tls"]
        )
    if step == "greeting" and timed_out:
        return (
            f"{upstream.host}:{upstream.port} accepted the connection but sent no SMTP greeting: is upstream.port "
            "right, and is upstream.tls right? (a port that speaks TLS from its first byte, such as 465, needs "
            'tls = "implicit")'
        )
    return ADVICE.get(step, "see the reply above")


def _test_message(settings: Settings, sender: str, to: str) -> Prepared:
    now = datetime.now(UTC)
    data = (
        f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: relay doctor test message\r\n\r\n"
        f"Sent by `relay doctor --send-test` from {settings.listen.hostname} at {now.isoformat()}.\r\n"
    ).encode()
    queue_id = f"doctor{int(now.timestamp())}"
    received = Received(queue_id, "127.0.0.1", sender, (to,), data, now, settings.listen.hostname)
    return prepare(received, settings.policy)
