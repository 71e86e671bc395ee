"""Issue 12 item 1: every sender allowlist holds for the sender actually sent upstream.

With `alignment = "rewrite"` the header From: becomes the envelope sender; the allowlist checked at MAIL
(global `policy.allowed_sender_domains`, or the AUTH user's own) must hold for that address too. Each test
talks to the real relay and asserts on what reached the Infobip stand-in.
"""

from __future__ import annotations

import base64
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay

ALLOWED = "app@allowed.example.com"
RCPT = "customer@example.org"
PASSWORD = "erp-pass-4711"


def data(header_from: str, tag: str = "x") -> bytes:
    return (
        f"From: {header_from}\r\nTo: <{RCPT}>\r\nSubject: {tag}\r\nMessage-ID: <{tag}@x>\r\n"
        "Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\nHello.\r\n"
    ).encode()


def rejected(relay: Any, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": reason})
    return value or 0.0


async def send(port: int, mail_from: str, message: bytes) -> str:
    dialog = await Dialog.open(port)
    await dialog.hello()
    try:
        return await dialog.mail(mail_from, [RCPT], message)
    finally:
        await dialog.close()


async def test_rewrite_to_a_header_from_outside_the_global_allowlist_is_refused(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(policy={"alignment": "rewrite", "allowed_sender_domains": ["allowed.example.com"]})
    reply = await send(relay.port, ALLOWED, data("CEO <ceo@evil.example>"))
    assert reply == (
        "550 5.7.1 Header From domain evil.example is not allowed to send through this relay"
        " (alignment = rewrite would make it the envelope sender)"
    )
    assert standin.messages == []
    assert rejected(relay, "sender") == 1


async def test_rewrite_within_the_global_allowlist_still_rewrites(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(
        policy={"alignment": "rewrite", "allowed_sender_domains": ["allowed.example.com", "billing.example.net"]}
    )
    message = data("Billing <invoices@billing.example.net>")
    reply = await send(relay.port, ALLOWED, message)
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert (got.mail_from, got.data) == ("invoices@billing.example.net", message)


async def test_an_aligned_message_is_not_affected_by_the_check(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(policy={"alignment": "rewrite", "allowed_sender_domains": ["allowed.example.com"]})
    message = data(f"App <{ALLOWED}>")
    reply = await send(relay.port, ALLOWED, message)
    [got] = standin.messages
    assert reply.startswith("250 2.6.0 ") and (got.mail_from, got.data) == (ALLOWED, message)


@pytest.fixture
def tls_user(tmp_path: Path) -> tuple[dict[str, Any], ssl.SSLContext]:
    """listen settings with STARTTLS and one AUTH user `erp` allowed only erp.allowed.example.com."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "relay.crt", tmp_path / "relay.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    listen = {
        "tls_cert_file": str(cert_file),
        "tls_key_file": str(key_file),
        "users": [{"username": "erp", "password": PASSWORD, "allowed_sender_domains": ["erp.allowed.example.com"]}],
    }
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return listen, context


async def test_rewrite_outside_the_auth_users_own_allowlist_is_refused(
    standin: InfobipStandIn, start_relay: StartRelay, tls_user: tuple[dict[str, Any], ssl.SSLContext]
) -> None:
    listen, context = tls_user
    # The global list would allow othercorp: the user's own list replaces it for that user.
    relay = await start_relay(
        listen=listen,
        policy={"alignment": "rewrite", "allowed_sender_domains": ["erp.allowed.example.com", "othercorp.example"]},
    )
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    assert (await dialog.send("STARTTLS")).startswith("220 ")
    await dialog.writer.start_tls(context, server_hostname="localhost")
    assert (await dialog.send("EHLO app.test")).startswith("250-")
    auth = base64.b64encode(f"\0erp\0{PASSWORD}".encode()).decode()
    assert await dialog.send(f"AUTH PLAIN {auth}") == "235 2.7.0 Authentication successful"
    refused = await dialog.mail("billing@erp.allowed.example.com", [RCPT], data("payroll@othercorp.example", "p"))
    aligned = data("ERP <billing@erp.allowed.example.com>", "ok")
    accepted = await dialog.mail("billing@erp.allowed.example.com", [RCPT], aligned)
    await dialog.close()
    assert refused == (
        "550 5.7.1 Header From domain othercorp.example is not allowed to send through this relay"
        " (alignment = rewrite would make it the envelope sender)"
    )
    [got] = standin.messages
    assert accepted == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert (got.mail_from, got.data) == ("billing@erp.allowed.example.com", aligned)
    assert rejected(relay, "sender") == 1
