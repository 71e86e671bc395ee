"""The HTTP endpoints ignore listen.allowed_networks, so by default they listen on loopback only (issue 12, item 8).

A socket bound to 127.0.0.1 does not answer on 127.0.0.2 while one bound to 0.0.0.0 does: that tells the
bind address from outside, over real sockets. The image and the Kubernetes example open it on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from relay.app import Relay
from relay.config import HttpSettings
from relay.testing.standin import InfobipStandIn
from tests.conftest import relay_settings
from tests.test_container import dockerfile

ROOT = Path(__file__).resolve().parent.parent


async def _answers(host: str, port: int) -> bool:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return status.startswith(b"HTTP/1.") and b" 200 " in status


async def test_http_endpoints_listen_on_loopback_unless_configured(standin: InfobipStandIn) -> None:
    defaults = relay_settings(standin)
    settings = defaults.model_copy(update={"http": HttpSettings(port=0)})  # every [http] key at its default
    relay = Relay(settings)
    await relay.start()
    try:
        assert await _answers("127.0.0.1", relay.http.port)
        assert not await _answers("127.0.0.2", relay.http.port)  # not bound to 0.0.0.0
    finally:
        await relay.stop()


def test_the_image_and_the_kubernetes_example_open_the_http_port_explicitly() -> None:
    assert "RELAY_HTTP__HOST=0.0.0.0" in dockerfile()["ENV"].split()
    manifest = (ROOT / "deploy" / "kubernetes.yaml").read_text()
    http_section = manifest.split("[http]", 1)[1].split("[", 1)[0]
    assert 'host = "0.0.0.0"' in http_section
