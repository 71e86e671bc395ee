"""On SIGTERM an open session takes no new transaction: its next MAIL gets 421 4.3.2 and the connection closes,
while a message already in DATA is still finished (issue 11, "Smaller promises"). `Relay.stop` is what the
SIGTERM handler of `relay serve` runs; real sockets throughout."""

from __future__ import annotations

import asyncio
import time

from relay.app import Relay
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, message, relay_settings
from tests.inbound_helpers import closed_after

SENDER = "billing@erp.example.com"


async def until_not_listening(port: int) -> None:
    deadline = time.monotonic() + 5
    while True:
        try:
            dialog = await Dialog.open(port)
        except OSError:
            return
        await dialog.close()
        assert time.monotonic() < deadline, "still listening"
        await asyncio.sleep(0.01)


async def test_after_sigterm_the_next_mail_gets_421_and_data_under_way_finishes(standin: InfobipStandIn) -> None:
    relay = Relay(relay_settings(standin))
    await relay.start()
    idle = await Dialog.open(relay.port)
    await idle.hello()
    uploading = await Dialog.open(relay.port)
    await uploading.hello()
    assert (await uploading.send(f"MAIL FROM:<{SENDER}>")).startswith("250 ")
    assert (await uploading.send("RCPT TO:<a@example.org>")).startswith("250 ")
    assert (await uploading.send("DATA")).startswith("354 ")  # the drain waits for this one
    stopping = asyncio.create_task(relay.stop(grace=10))
    try:
        await until_not_listening(relay.port)
        assert await idle.send(f"MAIL FROM:<{SENDER}>") == "421 4.3.2 The relay is shutting down; try again shortly"
        assert await closed_after(idle.reader) == b""
        reply = await uploading.send(message() + b".\r\n")
        assert reply.startswith("250 2.6.0 "), reply
        await asyncio.wait_for(stopping, 10)
    finally:
        if not stopping.done():
            await stopping
    await idle.close()
    await uploading.close()
    assert [m.rcpt_tos for m in standin.messages] == [["a@example.org"]]
    refused = relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": "shutting_down"})
    assert refused == 1
