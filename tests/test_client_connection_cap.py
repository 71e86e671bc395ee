"""One client address cannot hold every connection slot (issue 12, item 7): `listen.max_connections_per_client`,
by default a quarter of max_connections, 0 = no cap. Behind a trusted proxy, clients count by their own address
and the proxy's is not capped. Real sockets from several loopback addresses."""

from __future__ import annotations

from relay.app import Relay
from relay.config import Settings
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, message
from tests.helpers import until
from tests.inbound_helpers import closed_after

SENDER = "billing@erp.example.com"


async def opened(port: int, local_addr: str = "127.0.0.1", header: bytes = b"") -> Dialog:
    dialog = await Dialog.open(port, local_addr=local_addr)
    dialog.writer.write(header)
    assert (await dialog.hello()).startswith("250-")
    return dialog


async def refused(port: int, local_addr: str = "127.0.0.1", header: bytes = b"") -> str:
    dialog = await Dialog.open(port, local_addr=local_addr)
    dialog.writer.write(header)
    reply = await dialog.reply()
    assert await closed_after(dialog.reader) == b""
    await dialog.close()
    return reply


def capped(relay: Relay) -> float:
    value = relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": "too_many_connections"})
    return value or 0.0


def test_the_default_cap_is_a_quarter_of_max_connections() -> None:
    assert Settings().listen.connections_per_client == 50  # of 200
    assert Settings(listen={"max_connections": 8}).listen.connections_per_client == 2
    assert Settings(listen={"max_connections": 2}).listen.connections_per_client == 1
    assert Settings(listen={"max_connections_per_client": 0}).listen.connections_per_client == 0


async def test_one_client_address_cannot_hold_every_connection(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(listen={"max_connections": 8})  # two each
    first, second = await opened(relay.port), await opened(relay.port)
    assert await refused(relay.port) == (
        "421 4.7.0 Too many connections from 127.0.0.1 (at most 2 at once); try again later"
    )
    other = await opened(relay.port, "127.0.0.2")  # another app is still served
    assert (await other.mail(SENDER, ["a@example.org"], message())).startswith("250 ")
    await first.close()
    await until(lambda: len(relay.sessions.live) == 2)
    again = await opened(relay.port)  # a freed slot is that client's again
    assert (await again.mail(SENDER, ["b@example.org"], message())).startswith("250 ")
    for dialog in (second, other, again):
        await dialog.close()
    assert capped(relay) == 1


async def test_max_connections_per_client_sets_the_cap_and_zero_lifts_it(start_relay: StartRelay) -> None:
    relay = await start_relay(listen={"max_connections": 8, "max_connections_per_client": 3})
    dialogs = [await opened(relay.port) for _ in range(3)]
    assert (await refused(relay.port)).startswith("421 4.7.0 Too many connections from 127.0.0.1 (at most 3 ")
    lifted = await start_relay(listen={"max_connections": 8, "max_connections_per_client": 0})
    dialogs += [await opened(lifted.port) for _ in range(6)]
    for dialog in dialogs:
        await dialog.close()


async def test_behind_a_trusted_proxy_clients_count_by_their_own_address(start_relay: StartRelay) -> None:
    relay = await start_relay(
        listen={
            "max_connections": 8,  # two each
            "proxy_protocol": True,
            "trusted_proxies": ["127.0.0.1/32"],
            "allowed_networks": ["127.0.0.0/8"],
        }
    )
    header = b"PROXY TCP4 127.0.0.7 127.0.0.1 5555 25\r\n"
    dialogs = [await opened(relay.port, header=header) for _ in range(2)]
    assert (await refused(relay.port, header=header)).startswith("421 4.7.0 Too many connections from 127.0.0.7 ")
    # The balancer itself holds five connections now and is not capped: 127.0.0.8 and 127.0.0.9 get theirs.
    for client in ("127.0.0.8", "127.0.0.9"):
        dialogs += [await opened(relay.port, header=f"PROXY TCP4 {client} 127.0.0.1 5555 25\r\n".encode())]
    for dialog in dialogs:
        await dialog.close()
