"""Issue 12 item 3: one message never freezes the relay for everyone.

While one client uploads a message that is hard work (20 MB of tiny header lines, a header block of many
fields), another client's NOOP is answered within 100 ms, the big one gets a clear reply, and the memory budget
holds. On 7eaaba9 the 20 MB case stalled a NOOP for about 12 s (DATA read line by line, every field parsed on
the event loop). The relay runs in this test's own event loop, so the latency measured is the loop's; the
Infobip stand-in runs there too, so where a message gets as far as delivery, the stand-in is down (it greets
421): the reply `451 4.4.1` then shows the message was received and prepared, and no stand-in work is timed.
"""

from __future__ import annotations

import asyncio
import time

from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay

SENDER = "billing@erp.example.com"
RCPT = "customer@example.org"
NOOP_WITHIN = 0.1


async def noop_latencies_while(port: int, upload: bytes) -> tuple[str, list[float]]:
    """Send `upload` (with its end of data) as one client's DATA while a second client sends NOOPs; the big
    one's reply, and the seconds each NOOP took."""
    other = await Dialog.open(port)
    await other.hello()
    big = await Dialog.open(port)
    await big.hello()
    assert (await big.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await big.send(f"RCPT TO:<{RCPT}>")).startswith("250 ")
    assert (await big.send("DATA")).startswith("354 ")
    reply = asyncio.ensure_future(big.send(upload))
    latencies: list[float] = []
    while not reply.done():
        started = time.monotonic()
        assert await other.send("NOOP") == "250 2.0.0 OK"
        latencies.append(time.monotonic() - started)
        await asyncio.sleep(0.01)  # pacing the NOOPs, not an assertion
    await other.close()
    await big.close()
    return await reply, latencies


async def test_20_mb_of_tiny_header_lines_never_holds_up_another_client(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(limits={"memory_budget": 64 << 20})
    upload = b"From: <billing@erp.example.com>\r\n" + b"a:\r\n" * 5_000_000 + b"\r\nbody\r\n.\r\n"
    reply, latencies = await noop_latencies_while(relay.port, upload)
    assert reply == "552 5.3.4 The header block is over 262144 bytes, more than this relay reads; nothing was sent"
    assert len(latencies) >= 5 and max(latencies) < NOOP_WITHIN, latencies
    assert standin.messages == []
    assert relay.handler.budget.used == 0 and relay.handler.budget.peak <= 64 << 20


async def test_a_big_header_block_is_read_beside_other_clients(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay()
    standin.behaviour.down = True
    # Within the caps (under 1000 fields, 256 KiB), and each field folded over many short lines.
    fields = b"".join(b"X-F%03d: v\r\n" % n + b" w\r\n" * 60 for n in range(900))
    head = b"From: <billing@erp.example.com>\r\nMessage-ID: <big@x>\r\nDate: Sat, 21 Nov 2026 10:00:00 +0000\r\n"
    upload = head + fields + b"\r\nbody\r\n.\r\n"
    assert 200_000 < len(upload) < 262_144
    reply, latencies = await noop_latencies_while(relay.port, upload)
    assert reply.startswith("451 4.4.1 Cannot reach Infobip at ")  # prepared, then delivery failed
    assert max(latencies) < NOOP_WITHIN, latencies
    assert relay.handler.budget.used == 0


async def test_a_plain_20_mb_upload_never_holds_up_another_client(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(listen={"max_message_size": 21_000_000})
    standin.behaviour.down = True
    line = b"x" * 76 + b"\r\n"
    upload = b"From: <billing@erp.example.com>\r\nSubject: big\r\n\r\n" + line * 250_000 + b".\r\n"
    reply, latencies = await noop_latencies_while(relay.port, upload)
    assert reply.startswith("451 4.4.1 Cannot reach Infobip at ")
    assert len(latencies) >= 5 and max(latencies) < NOOP_WITHIN, latencies
