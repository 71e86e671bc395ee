"""Issue 11, "Smaller promises", in the DATA path, over real sockets with the bytes that reached Infobip.

- A client that ends its data with a bare-LF `\\n.\\n` used to hang with no reply, and dots after a bare LF
  reached Infobip doubled. Now a dot line next to a bare LF is refused at once (554 5.6.0) and the connection
  closed (what follows may be a smuggled second message), and a line after a bare LF that starts with a dot
  (stuffed or not?) is refused at the end of data. The end of data is only CRLF.CRLF.
- An exact max_message_size message without Message-ID/Date grew past Infobip's limit once the relay added
  them. Now EHLO advertises SIZE with room for what the relay adds, and prepare refuses (552 5.3.4) whatever it
  made bigger than max_message_size.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
import structlog.testing

from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, record_wire

SENDER = "billing@erp.example.com"
RCPT = "customer@example.org"
HEAD = (
    b"From: <billing@erp.example.com>\r\nTo: <customer@example.org>\r\nMessage-ID: <m@x>\r\n"
    b"Date: Sat, 21 Nov 2026 10:00:00 +0000\r\n\r\n"
)
BARE_LF_END = (
    "554 5.6.0 Bare LF next to a dot line: end the message with CRLF.CRLF and every line with CRLF;"
    " nothing was sent; closing the connection"
)


@pytest.fixture
def upstream_wire(monkeypatch: pytest.MonkeyPatch) -> dict[int, bytearray]:
    return record_wire(monkeypatch)


async def in_data(port: int) -> Dialog:
    dialog = await Dialog.open(port)
    await dialog.hello()
    assert (await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await dialog.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await dialog.send("DATA")).startswith("354 ")
    return dialog


async def closed(dialog: Dialog) -> bool:
    """Whether the relay has closed the connection (nothing more comes)."""
    with contextlib.suppress(ConnectionError):
        return await asyncio.wait_for(dialog.reader.read(), 5) == b""
    return True


def rejected(relay: object, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value(  # type: ignore[attr-defined]
        "relay_messages_rejected_total", {"reason": reason}
    )
    return value or 0.0


@pytest.mark.parametrize(
    "upload",
    [
        b"From: <billing@erp.example.com>\nSubject: lf client\n\nHello.\n.\n",  # an app that writes LF only
        HEAD.replace(b"\r\n", b"\n") + b"Hello.\n.\r\n",
        HEAD + b"Hello.\r\n.\n",
    ],
    ids=["LF.LF", "LF.CRLF", "CRLF.LF"],
)
async def test_a_bare_lf_end_of_data_is_answered_at_once_and_the_connection_closed(
    standin: InfobipStandIn, start_relay: StartRelay, upstream_wire: dict[int, bytearray], upload: bytes
) -> None:
    relay = await start_relay()
    dialog = await in_data(relay.port)
    with structlog.testing.capture_logs() as logs:
        dialog.writer.write(upload)  # and wait: no CRLF.CRLF is coming
        assert await dialog.reply() == BARE_LF_END
    assert await closed(dialog)
    await dialog.close()
    assert standin.messages == [] and not upstream_wire
    assert rejected(relay, "protocol") == 1
    [line] = [e for e in logs if e["event"] == "message_rejected"]  # ops can tell an app why
    assert line["reply"] == BARE_LF_END and line["sender"] == SENDER and line["reason"] == "protocol"
    assert line["size"] == len(upload) and line["recipients"] == 1


async def test_a_message_smuggled_behind_a_bare_lf_end_never_runs(
    standin: InfobipStandIn, start_relay: StartRelay, upstream_wire: dict[int, bytearray]
) -> None:
    relay = await start_relay()
    dialog = await in_data(relay.port)
    smuggled = b"MAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.net>\r\nDATA\r\nowned\r\n"
    dialog.writer.write(HEAD + b"Line one\n.\n" + smuggled + b".\r\nNOOP\r\n")
    assert await dialog.reply() == BARE_LF_END  # and nothing after it: no 250 for the smuggled commands
    assert await closed(dialog)
    await dialog.close()
    assert standin.messages == [] and not upstream_wire


async def test_a_dot_after_a_bare_lf_is_refused_never_doubled(
    standin: InfobipStandIn, start_relay: StartRelay, upstream_wire: dict[int, bytearray]
) -> None:
    relay = await start_relay()
    dialog = await in_data(relay.port)
    reply = await dialog.send(HEAD + b"one\n..two\r\n.\r\n")
    assert reply == (
        "550 5.6.0 A line after a bare LF starts with a dot, which mail servers read in different ways;"
        " end every line with CRLF; nothing was sent"
    )
    assert await dialog.send("NOOP") == "250 2.0.0 OK"  # the session goes on
    await dialog.close()
    assert standin.messages == [] and not upstream_wire
    assert rejected(relay, "protocol") == 1


async def test_bare_lf_in_a_body_and_stuffed_dots_go_out_exactly(
    standin: InfobipStandIn, start_relay: StartRelay, upstream_wire: dict[int, bytearray]
) -> None:
    relay = await start_relay()
    dialog = await in_data(relay.port)
    # As the client sends it (dot-stuffed), then, pipelined behind the end of data, the next command.
    dialog.writer.write(HEAD + b"bare LF\nhere\r\n..dot line\r\n.\r\nNOOP\r\n")
    reply = await dialog.reply()
    assert await dialog.reply() == "250 2.0.0 OK"
    await dialog.close()
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert got.data == HEAD + b"bare LF\nhere\r\n.dot line\r\n"
    wire = bytes(upstream_wire[got.connection])
    assert wire.endswith(b"\r\nDATA\r\n" + HEAD + b"bare LF\nhere\r\n..dot line\r\n.\r\n")  # one dot, stuffed once


async def test_what_the_relay_adds_never_takes_a_message_past_max_message_size(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    limit = 100_000
    relay = await start_relay(listen={"max_message_size": limit})
    dialog = await Dialog.open(relay.port)
    await dialog.reply()
    size = int(next(line for line in (await dialog.send("EHLO app.test")).split("\n") if "SIZE" in line).split()[-1])
    assert size == limit - limit // 10  # room for the headers the relay adds
    # Exactly SIZE bytes, with no Message-ID or Date: the relay adds both, and stays within the limit.
    head = b"From: <billing@erp.example.com>\r\nSubject: full\r\n\r\n"
    body = b"x" * 98 + b"\r\n"
    data = head + body * ((size - len(head)) // 100) + b"y" * ((size - len(head)) % 100 - 2) + b"\r\n"
    assert len(data) == size
    reply = await dialog.mail(SENDER, [RCPT], data)
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert got.data.endswith(data) and len(data) < len(got.data) <= limit
    assert (await dialog.mail(SENDER, [RCPT], data + b"z\r\n")).startswith("552 5.3.4 ")  # over SIZE
    await dialog.close()


async def test_a_message_prepare_makes_too_big_is_refused_with_552(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    limit = 20_000
    big_rule = {"headers": {"X-IB-Callback-Data": " ".join(["{queue_id}"] * 150)}}  # about 3 KB
    relay = await start_relay(listen={"max_message_size": limit}, policy={"rules": [big_rule]})
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    data = HEAD + b"x" * (limit - limit // 10 - len(HEAD) - 2) + b"\r\n"
    reply = await dialog.mail(SENDER, [RCPT], data)
    await dialog.close()
    assert reply == (
        "552 5.3.4 Message too big once the relay's headers are added: at most 20000 bytes go on; nothing was sent"
    )
    assert standin.messages == [] and rejected(relay, "too_big") == 1
