"""The relay end to end: a real client, the real relay, the real (stand-in) upstream, over loopback."""

from __future__ import annotations

import asyncio
import re

from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, message
from tests.helpers import SENDER, send_one, until

ERP_RULE = {
    "sender_domain": "erp.example.com",
    "headers": {
        "X-IB-Tracking-Url": "https://hooks.example.com/ib/track",
        "X-IB-Callback-Data": '{"app":"erp","queue_id":"{queue_id}","from":"{sender}","ip":"{client_ip}"}',
    },
}


async def test_message_arrives_with_policy_headers_and_original_bytes_untouched(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(policy={"rules": [ERP_RULE]})
    original = message(Message_ID="<inv-42@erp.example.com>", Date="Sat, 21 Nov 2026 10:00:00 +0000")
    original += b".leading dot line\r\n\xc3\xa9 8-bit line   with trailing spaces   \r\n"

    reply = await send_one(relay.port, "billing@erp.example.com", ["customer@example.org"], original)

    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    queue_id = re.search(rb'"queue_id":"([0-9a-f]+)"', got.data).group(1).decode()  # type: ignore[union-attr]
    assert got.data == (
        b"X-IB-Tracking-Url: https://hooks.example.com/ib/track\r\n"
        b'X-IB-Callback-Data: {"app":"erp","queue_id":"' + queue_id.encode() + b'",'
        b'"from":"billing@erp.example.com","ip":"127.0.0.1"}\r\n' + original
    )
    assert (got.mail_from, got.rcpt_tos) == ("billing@erp.example.com", ["customer@example.org"])
    assert (got.tls, got.auth_user, got.pipelined) == (True, standin.username, True)


async def test_missing_message_id_and_date_are_added_and_nothing_else(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    original = message()
    await send_one(relay.port, "billing@erp.example.com", ["customer@example.org"], original)
    [got] = standin.messages
    head, _, rest = got.data.partition(b"\r\nDate: ")
    assert re.fullmatch(rb"Message-ID: <[0-9a-f]+@relay\.test>", head)
    date_line, _, after = rest.partition(b"\r\n")
    assert re.fullmatch(rb"\w{3}, \d{2} \w{3} \d{4} \d{2}:\d{2}:\d{2} \+0000", date_line)
    assert after == original


async def test_rule_for_another_sender_domain_adds_nothing(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(policy={"rules": [ERP_RULE]})
    original = message(sender="hr@hr.example.net", Message_ID="<a@b>", Date="Sat, 21 Nov 2026 10:00:00 +0000")
    await send_one(relay.port, "hr@hr.example.net", ["x@example.org"], original)
    assert standin.messages[0].data == original


async def test_replace_existing_false_keeps_the_apps_header(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    rule = {"headers": {"X-IB-Bulk-Id": "relay-bulk"}, "replace_existing": False}
    relay = await start_relay(policy={"rules": [rule]})
    original = message(X_IB_Bulk_Id="app-bulk", Message_ID="<a@b>", Date="Sat, 21 Nov 2026 10:00:00 +0000")
    await send_one(relay.port, "billing@erp.example.com", ["x@example.org"], original)
    assert standin.messages[0].data == original


async def test_replace_existing_true_swaps_the_apps_header(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    rule = {"headers": {"X-IB-Bulk-Id": "relay-bulk"}, "replace_existing": True}
    relay = await start_relay(policy={"rules": [rule]})
    original = message(X_IB_Bulk_Id="app-bulk", Message_ID="<a@b>", Date="Sat, 21 Nov 2026 10:00:00 +0000")
    await send_one(relay.port, "billing@erp.example.com", ["x@example.org"], original)
    assert standin.messages[0].data == b"X-IB-Bulk-Id: relay-bulk\r\n" + original.replace(
        b"X-IB-Bulk-Id: app-bulk\r\n", b""
    )


async def test_ehlo_advertises_what_legacy_apps_and_infobip_need(start_relay: StartRelay) -> None:
    relay = await start_relay()
    dialog = await Dialog.open(relay.port)
    greeting = await dialog.reply()
    ehlo = await dialog.send("EHLO app.test")
    await dialog.close()
    assert greeting.startswith("220 relay.test ")
    assert ehlo.split("\n") == [
        "250-relay.test",
        "250-SIZE 20955136",  # 20 MB less 16 KiB for the headers the relay adds (tests/test_data_framing.py)
        "250-8BITMIME",
        "250-PIPELINING",
        "250-ENHANCEDSTATUSCODES",
        "250 HELP",
    ]


async def test_client_outside_allowed_networks_is_refused_before_mail(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(listen={"allowed_networks": ["10.0.0.0/8"]})
    dialog = await Dialog.open(relay.port)
    assert await dialog.reply() == "554 5.7.1 Client address 127.0.0.1 is not allowed to relay through this server"
    assert await dialog.reader.read() == b""  # closed: it never gets to send
    await dialog.close()
    assert standin.connections == []


async def test_allowed_network_is_exact(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"allowed_networks": ["127.0.0.1/32"], "host": "0.0.0.0"})
    allowed = await Dialog.open(relay.port)
    assert (await allowed.reply()).startswith("220 ")
    refused = await Dialog.open(relay.port, local_addr="127.0.0.2")
    assert (await refused.reply()).startswith("554 5.7.1 Client address 127.0.0.2 ")
    await allowed.close()
    await refused.close()


async def test_declared_size_over_the_limit_is_refused_at_mail(start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"max_message_size": 5000})
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    reply = await dialog.send("MAIL FROM:<billing@erp.example.com> SIZE=5001")
    await dialog.close()
    assert reply.startswith("552 5.3.4 ")


async def test_data_over_the_limit_is_refused_and_nothing_is_sent(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(listen={"max_message_size": 5000})
    reply = await send_one(
        relay.port, "billing@erp.example.com", ["x@example.org"], message(body=b"x" * 6000 + b"\r\n")
    )
    assert reply.startswith("552 5.3.4 ")
    assert standin.messages == []


async def test_sender_domain_not_allowed_is_refused_naming_it(start_relay: StartRelay) -> None:
    relay = await start_relay(policy={"allowed_sender_domains": ["erp.example.com"]})
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    refused = await dialog.send("MAIL FROM:<spam@evil.example>")
    accepted = await dialog.send("MAIL FROM:<billing@erp.example.com>")
    await dialog.close()
    assert refused == "550 5.7.1 Sender domain evil.example is not allowed to send through this relay"
    assert accepted == "250 2.1.0 Sender <billing@erp.example.com> OK"


async def test_too_many_recipients_get_452(start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"max_recipients": 2})
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    await dialog.send("MAIL FROM:<billing@erp.example.com>")
    replies = [await dialog.send(f"RCPT TO:<r{i}@example.org>") for i in range(3)]
    await dialog.close()
    assert [r[:9] for r in replies] == ["250 2.1.5", "250 2.1.5", "452 4.5.3"]


async def test_long_lines_pass_through_untouched(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay()
    html = b"<html>" + b"<td>cell</td>" * 8000 + b"</html>\r\n"  # ~104 KB on one line
    original = message(body=html, Message_ID="<a@b>", Date="Sat, 21 Nov 2026 10:00:00 +0000")
    reply = await send_one(relay.port, "billing@erp.example.com", ["x@example.org"], original)
    assert reply.startswith("250 2.6.0 ")
    assert standin.messages[0].data == original


async def test_misaligned_sender_is_rejected_naming_both_domains(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(policy={"alignment": "reject"})
    reply = await send_one(relay.port, "bounces@other.example.net", ["x@example.org"], message())
    assert reply == (
        "550 5.7.1 Envelope sender domain other.example.net and header From domain erp.example.com are not "
        "aligned; Infobip requires the same organizational domain"
    )
    assert standin.messages == []


async def test_subdomains_of_one_organization_are_aligned(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(policy={"alignment": "reject"})
    reply = await send_one(relay.port, "bounce@mail.example.com", ["x@example.org"], message())
    assert reply.startswith("250 2.6.0 ")
    assert standin.messages[0].mail_from == "bounce@mail.example.com"


async def test_rewrite_makes_the_envelope_sender_the_header_from(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(policy={"alignment": "rewrite"})
    original = message(Message_ID="<a@b>", Date="Sat, 21 Nov 2026 10:00:00 +0000")
    reply = await send_one(relay.port, "bounces@other.example.net", ["x@example.org"], original)
    assert reply.startswith("250 2.6.0 ")
    assert standin.messages[0].mail_from == "billing@erp.example.com"
    assert standin.messages[0].data == original


async def test_alignment_off_lets_infobip_decide_and_its_5xx_reaches_the_client(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(policy={"alignment": "off"})
    reply = await send_one(relay.port, "bounces@other.example.net", ["x@example.org"], message())
    assert reply == "550 5.7.1 Infobip refused the message: Envelope From and header From domains are not aligned"
    assert standin.messages == []


async def test_message_without_from_is_refused(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay()
    reply = await send_one(relay.port, "billing@erp.example.com", ["x@example.org"], b"Subject: no from\r\n\r\nhi\r\n")
    assert reply.startswith("550 5.6.0 ")
    assert standin.messages == []


async def test_hundred_messages_reuse_at_most_pool_size_connections(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(upstream={"pool_size": 3})

    async def client(n: int) -> list[str]:
        dialog = await Dialog.open(relay.port)
        await dialog.hello()
        replies = [
            await dialog.mail("billing@erp.example.com", [f"c{n}-{i}@example.org"], message(Message_ID=f"<{n}.{i}@x>"))
            for i in range(10)
        ]
        await dialog.close()
        return replies

    results = await asyncio.gather(*(client(n) for n in range(10)))
    assert all(r.startswith("250 2.6.0 Message queued as ") for replies in results for r in replies)
    assert len(standin.messages) == 100
    assert len({m.data for m in standin.messages}) == 100
    assert len(standin.connections) <= 3
    assert all(m.pipelined for m in standin.messages)
    assert sum(c.commands.count("RSET") + c.commands.count("NOOP") for c in standin.connections) == 0


async def test_thousand_recipients_in_one_pipelined_transaction(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    recipients = [f"r{i}@example.org" for i in range(1000)]
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    dialog.writer.write(
        b"MAIL FROM:<billing@erp.example.com>\r\n" + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
    )
    for _ in range(1001):
        assert (await dialog.reply()).startswith("250 ")
    assert (await dialog.send("DATA")).startswith("354")
    reply = await dialog.send(message() + b".\r\n")
    await dialog.close()
    assert reply.startswith("250 2.6.0 ")
    [got] = standin.messages
    assert got.rcpt_tos == recipients
    assert got.pipelined


async def test_a_client_hanging_up_in_pass_through_never_gets_another_message_a_false_250(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(upstream={"pool_size": 1})
    assert (await send_one(relay.port, SENDER, ["warm@example.org"], message())).startswith("250 2.6.0 ")
    standin.behaviour.data_delay = 0.5
    quitter = await Dialog.open(relay.port)
    await quitter.hello()
    for line in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<first@example.org>", "DATA"):
        await quitter.send(line)
    quitter.writer.write(message(Message_ID="<first@x>") + b".\r\n")
    await until(lambda: sum(c.commands.count("DATA") for c in standin.connections) == 2)  # waiting on "first"
    await quitter.close()
    standin.behaviour.data_delay = 0.0
    reply = await send_one(relay.port, SENDER, ["second@example.org"], message(Message_ID="<second@x>"))
    await until(lambda: any(m.rcpt_tos == ["second@example.org"] for m in standin.messages))
    [second] = [m for m in standin.messages if m.rcpt_tos == ["second@example.org"]]
    assert reply == f"250 2.6.0 Message queued as {second.infobip_id}"
