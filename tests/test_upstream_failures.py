"""What the client is told when Infobip (the stand-in) misbehaves, and that no credentials leak."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil

import pytest
import structlog.testing
import trustme

from relay.app import Relay
from relay.config import UpstreamSettings
from relay.testing.standin import InfobipStandIn
from relay.upstream.connection import UpstreamConnection
from relay.upstream.errors import UpstreamError
from relay.upstream.tls import make_tls_context
from tests.conftest import Dialog, StartRelay, message, relay_settings
from tests.helpers import send_one, until

SENDER = "billing@erp.example.com"


async def test_connection_closed_by_upstream_while_idle_is_replaced(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(upstream={"pool_size": 1})
    assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
    assert standin.close_idle_connections("421 4.4.2 Idle timeout, closing connection") == 1
    reply = await send_one(relay.port, SENDER, ["b@example.org"], message())
    assert reply.startswith("250 2.6.0 ")
    assert [m.connection for m in standin.messages] == [1, 2]


async def test_connection_dropped_silently_while_idle_is_replaced(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(upstream={"pool_size": 1})
    assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
    assert standin.close_idle_connections(reply=None) == 1
    reply = await send_one(relay.port, SENDER, ["b@example.org"], message())
    assert reply.startswith("250 2.6.0 ")
    assert len(standin.messages) == 2


async def test_upstream_without_starttls_gets_no_credentials(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    standin.behaviour.offer_starttls = False
    relay = await start_relay()
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("451 4.4.1 ")
    assert "does not offer STARTTLS" in reply
    assert standin.connections and all("AUTH" not in c.commands for c in standin.connections)
    assert standin.messages == []


async def test_untrusted_certificate_gets_no_credentials(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: pytest.TempPathFactory
) -> None:
    other_ca = tmp_path / "other-ca.pem"  # type: ignore[operator]
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    relay = await start_relay(upstream={"ca_file": str(other_ca)})
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("451 4.4.1 ")
    assert "certificate" in reply
    assert all(c.auth_user is None and "AUTH" not in c.commands for c in standin.connections)
    assert standin.messages == []


async def test_wrong_host_name_gets_no_credentials(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(upstream={"host": "127.0.0.2"})  # the certificate names localhost, 127.0.0.1, ::1
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("451 4.4.1 ")
    assert all("AUTH" not in c.commands for c in standin.connections)


async def test_wrong_credentials_are_a_temporary_failure(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(upstream={"password": "not-the-password"})
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("451 4.4.1 ")
    assert "credentials" in reply
    assert "not-the-password" not in reply


async def test_auth_login_only_upstream(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    standin.behaviour.auth_mechanisms = "LOGIN"
    relay = await start_relay()
    assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
    assert standin.messages[0].auth_user == standin.username


async def test_implicit_tls_on_465() -> None:
    standin = InfobipStandIn()
    await standin.start(implicit_tls=True)
    relay = Relay(relay_settings(standin, upstream={"tls": "implicit"}))
    await relay.start()
    try:
        assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
        assert standin.messages[0].tls and standin.messages[0].auth_user == standin.username
    finally:
        await relay.stop()
        await standin.stop()


async def test_upstream_down_is_a_temporary_failure(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay()
    await standin.stop()
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("451 4.4.1 Cannot reach Infobip")


async def test_upstream_5xx_at_end_of_data_reaches_the_client(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    standin.behaviour.data_replies.append("554 5.6.0 Message content rejected")
    relay = await start_relay()
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply == "554 5.6.0 Infobip refused the message: Message content rejected"


async def test_upstream_4xx_is_never_a_5xx(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    standin.behaviour.data_replies.append("452 4.3.1 Insufficient system storage")
    relay = await start_relay()
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("451 4.4.3 ")
    assert "452 4.3.1 Insufficient system storage" in reply


async def test_connection_lost_at_end_of_data_is_not_retried_and_is_temporary(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    standin.behaviour.drop_at_end_of_data = 1
    relay = await start_relay()
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("451 4.4.2 ")
    assert [c.commands.count("DATA") for c in standin.connections] == [1]  # not sent twice
    # and the relay recovers on a new connection
    assert (await send_one(relay.port, SENDER, ["b@example.org"], message())).startswith("250 2.6.0 ")


async def test_one_refused_recipient_of_three(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    standin.behaviour.refuse_recipients["blocked@example.org"] = "550 5.7.1 Recipient <blocked@example.org> not allowed"
    relay = await start_relay()
    reply = await send_one(relay.port, SENDER, ["a@example.org", "blocked@example.org", "c@example.org"], message())
    [got] = standin.messages
    assert got.rcpt_tos == ["a@example.org", "c@example.org"]
    assert reply.startswith(f"250 2.6.0 Message queued as {got.infobip_id}; 1 of 3 recipients refused")


async def test_all_recipients_refused_then_the_connection_is_reused_cleanly(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    standin.behaviour.refuse_recipients["blocked@example.org"] = "550 5.7.1 Recipient <blocked@example.org> not allowed"
    relay = await start_relay(upstream={"pool_size": 1})
    reply = await send_one(relay.port, SENDER, ["blocked@example.org"], message())
    assert reply == "550 5.7.1 Infobip refused the message: Recipient <blocked@example.org> not allowed"
    assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
    assert len(standin.connections) == 1
    assert standin.connections[0].commands.count("RSET") == 1  # pipelined ahead of the next MAIL


async def test_client_vanishing_mid_data_does_not_disturb_others(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    quitter = await Dialog.open(relay.port)
    await quitter.hello()
    await quitter.send(f"MAIL FROM:<{SENDER}>")
    await quitter.send("RCPT TO:<a@example.org>")
    await quitter.send("DATA")
    quitter.writer.write(b"From: <billing@erp.example.com>\r\n\r\nhalf a mess")
    await quitter.close()
    assert (await send_one(relay.port, SENDER, ["b@example.org"], message())).startswith("250 2.6.0 ")
    assert [m.rcpt_tos for m in standin.messages] == [["b@example.org"]]


async def test_aiosmtpd_does_not_log_addresses(
    standin: InfobipStandIn, start_relay: StartRelay, caplog: pytest.LogCaptureFixture
) -> None:
    from relay.config import LogSettings
    from relay.ops.logs import configure_logging

    configure_logging(LogSettings(level="debug", format="json"))
    caplog.set_level(logging.DEBUG)
    relay = await start_relay()
    await send_one(
        relay.port,
        "secret.sender@erp.example.com",
        ["patient@example.org"],
        message(sender="secret.sender@erp.example.com", body=b"diagnosis: confidential\r\n"),
    )
    assert standin.messages
    relay_records = [r for r in caplog.records if r.name == "mail.log" and r.levelno < logging.ERROR]
    relay_records = [r for r in relay_records if "standin" not in r.pathname]
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "mail.log")
    assert "patient@example.org" not in text and "confidential" not in text
    assert relay_records == []


@pytest.mark.skipif(
    shutil.which("swaks") is None and not os.environ.get("RELAY_TEST_REQUIRE_SWAKS"),
    reason="swaks is not installed (apt-get install swaks; .ci/run does)",
)
async def test_swaks_a_client_we_did_not_write(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(policy={"rules": [{"headers": {"X-IB-Bulk-Id": "swaks-{client_ip}"}}]})
    process = await asyncio.create_subprocess_exec(
        "swaks",
        "--server",
        f"127.0.0.1:{relay.port}",
        "--from",
        SENDER,
        "--to",
        "customer@example.org",
        "--header",
        "Subject: from swaks",
        "--body",
        "line one\n.leading dot\nline three",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode == 0, output.decode()
    [got] = standin.messages
    assert f"<~  250 2.6.0 Message queued as {got.infobip_id}" in output.decode() or (
        f"250 2.6.0 Message queued as {got.infobip_id}" in output.decode()
    )
    assert got.data.startswith(b"X-IB-Bulk-Id: swaks-127.0.0.1\r\n")
    assert b"\r\nSubject: from swaks\r\n" in got.data
    assert got.data.endswith(b"\r\n\r\nline one\r\n.leading dot\r\nline three\r\n\r\n\r\n")
    assert (got.mail_from, got.rcpt_tos) == (SENDER, ["customer@example.org"])


async def test_expired_certificate_gets_no_credentials() -> None:
    standin = InfobipStandIn(certificate_expired=True)
    await standin.start()
    relay = Relay(relay_settings(standin))
    await relay.start()
    try:
        reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
        assert reply.startswith("451 4.4.1 ") and "certificate has expired" in reply
        assert all(c.auth_user is None and "AUTH" not in c.commands for c in standin.connections)
        assert standin.messages == []
    finally:
        await relay.stop()
        await standin.stop()


async def test_insecure_skip_verify_is_explicit_and_loud(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: pytest.TempPathFactory
) -> None:
    other_ca = tmp_path / "other-ca.pem"  # type: ignore[operator]
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with structlog.testing.capture_logs() as logs:
        relay = await start_relay(upstream={"ca_file": str(other_ca), "insecure_skip_verify": True})
    assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
    [warning] = [e for e in logs if e["event"] == "upstream_tls_verification_disabled"]
    assert warning["log_level"] == "warning" and "Never use this in production" in warning["warning"]


async def test_an_overlong_reply_line_is_a_failure_not_a_leak() -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 " + b"x" * 100_000 + b"\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = UpstreamSettings(host="127.0.0.1", port=port, username="u", password="p", command_timeout=2)
    before = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(5):
            with pytest.raises(UpstreamError, match="reply line too long"):
                await UpstreamConnection.open(settings, make_tls_context(settings), "relay.test", 1)
        await until(lambda: len(os.listdir("/proc/self/fd")) <= before + 1, timeout=2.0)
    finally:
        server.close()
        await server.wait_closed()
