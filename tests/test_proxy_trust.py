"""PROXY protocol: only `listen.trusted_proxies` may say who the client is, and a v2 LOCAL header says no one
(issue 12, item 6). Real sockets; the client address the relay settled on shows in an `X-Client` header."""

from __future__ import annotations

import ipaddress
import re
import struct
from pathlib import Path

import pytest

from relay.config import ConfigError, load_settings
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, message
from tests.inbound_helpers import closed_after

SENDER = "billing@erp.example.com"
RCPT = "customer@example.org"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
BEHIND_A_BALANCER = {"proxy_protocol": True, "trusted_proxies": ["127.0.0.1/32"], "allowed_networks": ["127.0.0.0/8"]}
SHOW_CLIENT = {"rules": [{"headers": {"X-Client": "{client_ip}"}}]}


def v2_header(command: int, source: str | None = None, destination: str = "127.0.0.1") -> bytes:
    """A PROXY v2 header: command 0 LOCAL, 1 PROXY; TCP over IPv4 from `source`, or no addresses (UNSPEC)."""
    if source is None:
        return V2_SIGNATURE + bytes([0x20 | command, 0x00]) + struct.pack("!H", 0)
    addresses = ipaddress.IPv4Address(source).packed + ipaddress.IPv4Address(destination).packed
    tail = addresses + struct.pack("!HH", 5555, 25)
    return V2_SIGNATURE + bytes([0x20 | command, 0x11]) + struct.pack("!H", len(tail)) + tail


async def served_as(standin: InfobipStandIn, port: int, header: bytes, local_addr: str = "127.0.0.1") -> str:
    """Send `header`, then one message; the client address the relay used for it."""
    dialog = await Dialog.open(port, local_addr=local_addr)
    dialog.writer.write(header)
    await dialog.hello()
    reply = await dialog.mail(SENDER, [RCPT], message())
    await dialog.close()
    assert reply.startswith("250 "), reply
    [shown] = re.findall(rb"^X-Client: (.*)\r$", standin.messages[-1].data, re.MULTILINE)
    return str(shown.decode())


async def test_only_a_trusted_proxy_may_send_a_proxy_header(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay(listen=BEHIND_A_BALANCER, policy=SHOW_CLIENT)
    impostor = await Dialog.open(relay.port, local_addr="127.0.0.2")  # an allowed client, but not the balancer
    impostor.writer.write(b"PROXY TCP4 127.0.0.7 127.0.0.1 5555 25\r\n")
    assert await impostor.reply() == (
        "554 5.7.1 127.0.0.2 is not a trusted proxy: this port takes connections from the load balancer"
    )
    assert await closed_after(impostor.reader) == b""
    await impostor.close()
    assert standin.messages == []
    header = b"PROXY TCP4 127.0.0.7 127.0.0.1 5555 25\r\n"
    assert await served_as(standin, relay.port, header) == "127.0.0.7"
    rejected = relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": "untrusted_proxy"})
    assert rejected == 1


@pytest.mark.parametrize("claimed", ["127.0.0.7", "10.9.9.9", None], ids=["allowed", "outside", "unspec"])
async def test_a_v2_local_header_names_no_client_so_the_balancer_is_the_client(
    standin: InfobipStandIn, start_relay: StartRelay, claimed: str | None
) -> None:
    relay = await start_relay(listen=BEHIND_A_BALANCER, policy=SHOW_CLIENT)
    assert await served_as(standin, relay.port, v2_header(0, claimed)) == "127.0.0.1"
    assert await served_as(standin, relay.port, v2_header(1, "127.0.0.7")) == "127.0.0.7"  # PROXY: its source


async def test_a_v2_local_header_from_a_balancer_outside_allowed_networks_is_refused(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(listen={**BEHIND_A_BALANCER, "allowed_networks": ["10.0.0.0/8"]}, policy=SHOW_CLIENT)
    dialog = await Dialog.open(relay.port)
    dialog.writer.write(v2_header(0, "10.9.9.9"))  # the claimed address is allowed; the balancer is not
    assert (await dialog.reply()).startswith("554 5.7.1 Client address 127.0.0.1 is not allowed")
    assert await closed_after(dialog.reader) == b""
    await dialog.close()
    assert standin.messages == []


def test_proxy_protocol_without_trusted_proxies_is_a_config_error(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text("[listen]\nproxy_protocol = true\n")
    with pytest.raises(ConfigError, match=r"^listen: proxy_protocol needs trusted_proxies: the load balancers'"):
        load_settings(config)
    config.write_text('[listen]\nproxy_protocol = true\ntrusted_proxies = ["10.0.0.5/32"]\n')
    assert [str(n) for n in load_settings(config).listen.trusted_proxies] == ["10.0.0.5/32"]
