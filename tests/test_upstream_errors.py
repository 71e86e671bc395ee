"""relay.upstream.errors: each way of getting no verdict from Infobip has its class, its code and text,
and the exact 4xx our client sees; `relay doctor` names the failed step from the class."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import trustme

from relay.config import UpstreamSettings
from relay.core.message import Prepared
from relay.core.replies import Reply
from relay.core.smtp_client import ServerReply
from relay.ops.doctor import doctor
from relay.testing.standin import InfobipStandIn
from relay.upstream.connection import UpstreamConnection
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
from relay.upstream.tls import make_tls_context
from tests.conftest import free_port, message, relay_settings

SENDER = "billing@erp.example.com"


def upstream(standin: InfobipStandIn, **values: Any) -> UpstreamSettings:
    return relay_settings(standin, upstream=values).upstream


async def connect(settings: UpstreamSettings) -> UpstreamConnection:
    return await UpstreamConnection.open(settings, make_tls_context(settings), "relay.test", 1)


def prepared(*recipients: str) -> Prepared:
    return Prepared("q1", SENDER, recipients, "<q1@relay.test>", b"", message())


# --- the classes with plain values ---------------------------------------------------------------


def test_unreachable_errors_carry_the_4_4_1_reply_and_the_servers_words() -> None:
    refused = ServerReply(535, "5.7.8 Authentication credentials invalid")
    why = f"Infobip refused our credentials ({refused}); check them"
    exc = UpstreamAuthError("smtp.example.com", 587, why, refused)
    assert exc.reply == Reply(
        451,
        "4.4.1",
        "Cannot reach Infobip at smtp.example.com:587: Infobip refused our credentials "
        "(535 5.7.8 Authentication credentials invalid); check them",
    )
    assert (exc.code, exc.text) == (535, "5.7.8 Authentication credentials invalid")
    assert str(exc) == str(exc.reply) and not exc.data_sent
    assert isinstance(exc, UpstreamUnreachable) and isinstance(exc, UpstreamError)


def test_without_a_server_reply_the_text_is_ours() -> None:
    exc = UpstreamConnectError("smtp.example.com", 587, "timed out")
    assert (exc.code, exc.text, exc.why) == (None, "timed out", "timed out")
    assert str(exc.reply) == "451 4.4.1 Cannot reach Infobip at smtp.example.com:587: timed out"


def test_lost_errors_carry_the_4_4_2_reply_and_whether_data_went_out() -> None:
    exc = UpstreamTimeout("timed out", data_sent=True)
    assert exc.reply == Reply(451, "4.4.2", "Connection to Infobip lost: timed out; try again later")
    assert exc.data_sent and isinstance(exc, TimeoutError) and isinstance(exc, UpstreamLost)
    closing = ServerReply(421, "4.4.2 Idle timeout, closing connection")
    disconnected = UpstreamDisconnected(f"Infobip closed the connection: {closing}", closing)
    assert isinstance(disconnected, ConnectionError) and (disconnected.code, disconnected.text) == (421, closing.text)
    assert not disconnected.data_sent
    assert not isinstance(UpstreamProtocolError("out of step"), OSError)


def test_every_class_is_always_a_4xx() -> None:
    for exc in (
        UpstreamConnectError("h", 1, "x"),
        UpstreamGreetingError("h", 1, "x", ServerReply(554, "no")),
        UpstreamTLSError("h", 1, "x"),
        UpstreamAuthError("h", 1, "x", ServerReply(535, "no")),
        UpstreamDisconnected("x"),
        UpstreamTimeout("x"),
        UpstreamProtocolError("x", ServerReply(250, "OK")),
    ):
        assert 400 <= exc.reply.code < 500 and exc.reply.enhanced.startswith("4.4."), exc


# --- the handshake against the stand-in ----------------------------------------------------------


async def test_nothing_listening_is_a_connect_error(standin: InfobipStandIn) -> None:
    port = free_port()
    with pytest.raises(UpstreamConnectError) as caught:
        await connect(upstream(standin, port=port))
    assert caught.value.code is None
    assert caught.value.reply.text.startswith(f"Cannot reach Infobip at localhost:{port}: ")


async def test_a_421_greeting_is_a_greeting_error_with_the_servers_reply(standin: InfobipStandIn) -> None:
    standin.behaviour.down = True
    with pytest.raises(UpstreamGreetingError) as caught:
        await connect(upstream(standin))
    assert (caught.value.code, caught.value.text) == (421, "4.3.2 Service not available, closing transmission channel")
    assert caught.value.reply.text == (
        f"Cannot reach Infobip at localhost:{standin.port}: "
        "greeting was 421 4.3.2 Service not available, closing transmission channel"
    )


async def test_no_starttls_is_a_tls_error_and_no_credentials_go_out(standin: InfobipStandIn) -> None:
    standin.behaviour.offer_starttls = False
    with pytest.raises(UpstreamTLSError, match="does not offer STARTTLS, so no credentials were sent"):
        await connect(upstream(standin))
    assert all("AUTH" not in c.commands for c in standin.connections)


async def test_an_untrusted_certificate_is_a_tls_error(standin: InfobipStandIn, tmp_path: Any) -> None:
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    with pytest.raises(UpstreamTLSError) as caught:
        await connect(upstream(standin, ca_file=str(other_ca)))
    assert caught.value.why.startswith("TLS failed: certificate not trusted: ")
    assert all(c.auth_user is None for c in standin.connections)


async def test_an_untrusted_certificate_on_implicit_tls_is_a_tls_error_too(tmp_path: Any) -> None:
    standin = InfobipStandIn()
    await standin.start(implicit_tls=True)
    other_ca = tmp_path / "other-ca.pem"
    trustme.CA().cert_pem.write_to_path(str(other_ca))
    try:
        with pytest.raises(UpstreamTLSError) as caught:
            await connect(upstream(standin, tls="implicit", ca_file=str(other_ca)))
        assert caught.value.why.startswith("certificate not trusted: ")  # the text the client saw before
    finally:
        await standin.stop()


async def test_wrong_credentials_are_an_auth_error_with_infobips_reply(standin: InfobipStandIn) -> None:
    with pytest.raises(UpstreamAuthError) as caught:
        await connect(upstream(standin, password="not-the-password"))
    assert caught.value.code == 535
    assert "credentials" in caught.value.reply.text and "not-the-password" not in str(caught.value)


async def test_no_auth_mechanism_we_speak_is_an_auth_error(standin: InfobipStandIn) -> None:
    standin.behaviour.auth_mechanisms = "CRAM-MD5"
    with pytest.raises(UpstreamAuthError, match="offers neither AUTH PLAIN nor AUTH LOGIN") as caught:
        await connect(upstream(standin))
    assert caught.value.code is None


# --- a transaction that breaks -------------------------------------------------------------------


async def test_a_connection_dropped_at_the_end_of_data_is_a_disconnect_after_data(standin: InfobipStandIn) -> None:
    connection = await connect(upstream(standin))
    standin.behaviour.drop_at_end_of_data = 1
    with pytest.raises(UpstreamDisconnected) as caught:
        await connection.transact(prepared("a@example.org"))
    assert caught.value.data_sent  # Infobip may have it: never retried on another connection
    assert (caught.value.reply.code, caught.value.reply.enhanced) == (451, "4.4.2")
    assert caught.value.reply.text.startswith("Connection to Infobip lost: ")
    assert not connection.usable


async def test_no_answer_to_the_end_of_data_is_a_timeout_after_data(standin: InfobipStandIn) -> None:
    connection = await connect(upstream(standin, data_timeout=0.2))
    standin.behaviour.data_delay = 1.0
    with pytest.raises(UpstreamTimeout) as caught:
        await connection.transact(prepared("a@example.org"))
    assert caught.value.data_sent and isinstance(caught.value, TimeoutError)
    assert str(caught.value.reply) == "451 4.4.2 Connection to Infobip lost: timed out; try again later"
    assert not connection.usable


async def test_a_421_instead_of_the_mail_reply_is_a_disconnect_before_data(standin: InfobipStandIn) -> None:
    connection = await connect(upstream(standin))
    assert standin.close_idle_connections("421 4.4.2 Idle timeout, closing connection") == 1
    async with asyncio.timeout(5):  # the 421 and the close arrived (not a reset racing our flight)
        while connection.usable:
            await asyncio.sleep(0.01)
    with pytest.raises(UpstreamDisconnected) as caught:
        await connection.transact(prepared("a@example.org"))
    assert (caught.value.code, caught.value.text) == (421, "4.4.2 Idle timeout, closing connection")
    assert str(caught.value.reply) == (
        "451 4.4.2 Connection to Infobip lost: Infobip closed the connection: "
        "421 4.4.2 Idle timeout, closing connection; try again later"
    )
    assert not caught.value.data_sent  # nothing went out: the pool may try again on a fresh connection
    assert standin.messages == []


async def test_after_an_early_end_the_next_flight_starts_with_rset(standin: InfobipStandIn) -> None:
    standin.behaviour.refuse_recipients["blocked@example.org"] = "550 5.7.1 Recipient <blocked@example.org> not allowed"
    connection = await connect(upstream(standin))
    refused = await connection.transact(prepared("blocked@example.org"))
    assert refused.final == ServerReply(550, "5.7.1 Recipient <blocked@example.org> not allowed")
    assert refused.accepted == () and list(refused.refused) == ["blocked@example.org"]
    delivered = await connection.transact(prepared("a@example.org"))
    assert delivered.final.ok and delivered.accepted == ("a@example.org",)
    [record] = standin.connections
    assert record.commands == ["STARTTLS", "AUTH", "MAIL", "RCPT", "DATA", "RSET", "MAIL", "RCPT", "DATA"]
    assert [m.rcpt_tos for m in standin.messages] == [["a@example.org"]]
    await connection.quit()


# --- relay doctor names the step from the class --------------------------------------------------


async def run_doctor(standin: InfobipStandIn, **values: Any) -> tuple[int, str]:
    lines: list[str] = []
    settings = relay_settings(standin, upstream=values)
    code = await asyncio.wait_for(doctor(settings, SENDER, None, lines.append), 30)
    return code, "\n".join(lines)


@pytest.mark.parametrize(
    ("knob", "step"),
    [
        ("down", "greeting"),
        ("no_starttls", "tls"),
        ("wrong_password", "auth"),
        ("nothing_listening", "tcp"),
    ],
)
async def test_doctor_names_the_step_from_the_error_class(standin: InfobipStandIn, knob: str, step: str) -> None:
    values: dict[str, Any] = {}
    if knob == "down":
        standin.behaviour.down = True
    elif knob == "no_starttls":
        standin.behaviour.offer_starttls = False
    elif knob == "wrong_password":
        values["password"] = "wrong"
    else:
        values["port"] = free_port()
    code, out = await run_doctor(standin, **values)
    assert code == 1
    [failed] = [line for line in out.splitlines() if "FAIL" in line]
    assert failed.startswith(f"  FAIL  {step:<8} Cannot reach Infobip at localhost:"), out
    assert "what to check: " in out


async def test_doctor_passes_every_step(standin: InfobipStandIn) -> None:
    code, out = await run_doctor(standin)
    assert code == 0, out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("  ok")] == [
        "dns",
        "tcp",
        "greeting",
        "ehlo",
        "tls",
        "auth",
        "mail",
    ]
