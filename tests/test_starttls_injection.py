"""Plaintext sent behind STARTTLS must never be read as if it came inside TLS (issue 12, item 5;
CVE-2011-0411's pattern): on either side, bytes already buffered when TLS starts end the connection.

Upstream: a hostile server over a real socket answers STARTTLS with `220 go ahead` and, in the same clear
write, an EHLO reply of its own choosing; then it does a real TLS handshake, so a relay that kept those bytes
would take them as the post-TLS EHLO. Inbound: a client pipelines commands behind its STARTTLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trustme

from relay.app import Relay
from relay.config import UpstreamSettings
from relay.core.replies import CLEARTEXT_AFTER_STARTTLS
from relay.testing.standin import InfobipStandIn
from relay.upstream.connection import UpstreamConnection
from relay.upstream.errors import UpstreamTLSError
from relay.upstream.tls import make_tls_context
from tests.conftest import Dialog, StartRelay, message
from tests.inbound_helpers import inbound_tls

INJECTED = b"250-injected\r\n250 AUTH LOGIN\r\n"


@dataclass
class HostileUpstream:
    """Plain SMTP up to STARTTLS, then `extra` in clear right behind the 220, then real TLS."""

    extra: bytes
    server_context: ssl.SSLContext
    ca_file: Path
    port: int = 0
    after_tls: list[bytes] = field(default_factory=list)  # every line received inside TLS

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ssl.SSLError, asyncio.IncompleteReadError):
            writer.write(b"220 hostile.test ESMTP\r\n")
            await reader.readline()  # EHLO
            writer.write(b"250-hostile.test\r\n250-PIPELINING\r\n250 STARTTLS\r\n")
            await reader.readline()  # STARTTLS
            writer.write(b"220 2.0.0 go ahead\r\n" + self.extra)
            await writer.start_tls(self.server_context)
            while line := await reader.readline():
                self.after_tls.append(line)
                verb = line.split(b" ")[0].strip().upper()
                writer.write(
                    b"250-hostile.test\r\n250 AUTH PLAIN LOGIN\r\n" if verb == b"EHLO" else b"235 2.7.0 ok\r\n"
                )
        writer.close()


@pytest.fixture
async def hostile(tmp_path: Path) -> AsyncIterator[HostileUpstream]:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    ca_file = tmp_path / "hostile-ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    upstream = HostileUpstream(b"", server_context, ca_file)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    upstream.port = int(server.sockets[0].getsockname()[1])
    yield upstream
    server.close()
    await server.wait_closed()


def settings_for(upstream: HostileUpstream) -> UpstreamSettings:
    return UpstreamSettings(
        host="localhost",
        port=upstream.port,
        username="relay-user",
        password="relay-secret-password",
        ca_file=upstream.ca_file,
        connect_timeout=5,
        command_timeout=5,
    )


async def test_upstream_bytes_in_clear_behind_the_220_to_starttls_abort_before_any_credentials(
    hostile: HostileUpstream,
) -> None:
    hostile.extra = INJECTED
    settings = settings_for(hostile)
    with pytest.raises(UpstreamTLSError, match="sent more after its 220 to STARTTLS, in clear"):
        await UpstreamConnection.open(settings, make_tls_context(settings), "relay.test", 1)
    assert hostile.after_tls == []  # not even an EHLO went inside TLS, let alone AUTH


async def test_upstream_the_same_server_without_the_injection_is_used(hostile: HostileUpstream) -> None:
    settings = settings_for(hostile)
    connection = await UpstreamConnection.open(settings, make_tls_context(settings), "relay.test", 1)
    connection.abort()
    assert [line.split(b" ")[0] for line in hostile.after_tls] == [b"EHLO", b"AUTH"]


async def test_inbound_commands_pipelined_behind_starttls_end_the_connection(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    listen, context = inbound_tls(tmp_path)
    relay = await start_relay(listen=listen)
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    dialog.writer.write(b"STARTTLS\r\nMAIL FROM:<evil@attacker.example>\r\nRCPT TO:<victim@example.net>\r\n")
    assert (await dialog.reply()).startswith("220 ")
    await dialog.writer.start_tls(context, server_hostname="localhost")
    assert await dialog.reply() == str(CLEARTEXT_AFTER_STARTTLS)  # inside TLS, then closed
    assert await asyncio.wait_for(dialog.reader.read(), 5) == b""
    await dialog.close()
    assert rejected(relay, "starttls_injection") == 1

    well_behaved = await Dialog.open(relay.port)  # a STARTTLS on its own still works
    await well_behaved.hello()
    assert (await well_behaved.send("STARTTLS")).startswith("220 ")
    await well_behaved.writer.start_tls(context, server_hostname="localhost")
    assert (await well_behaved.send("EHLO app.test")).startswith("250-")
    assert (await well_behaved.mail("billing@erp.example.com", ["a@example.org"], message())).startswith("250 ")
    await well_behaved.close()
    assert [m.rcpt_tos for m in standin.messages] == [["a@example.org"]]


def rejected(relay: Relay, reason: str) -> float:
    value = relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": reason})
    return value or 0.0
