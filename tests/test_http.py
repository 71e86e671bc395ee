"""/metrics, /healthz and /readyz over real HTTP, with a real HTTP client."""

from __future__ import annotations

import json
import os
from pathlib import Path

from relay.ops.http_server import HttpServer, Readiness
from relay.ops.metrics import Metrics
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, free_port, message
from tests.helpers import get, sample, send_one

SENDER = "billing@erp.example.com"


async def test_metrics_count_what_happened(standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path) -> None:
    standin.behaviour.refuse_recipients["blocked@example.org"] = "550 5.7.1 Recipient <blocked@example.org> not allowed"
    relay = await start_relay(
        spool={"enabled": True, "path": str(tmp_path), "sync_wait": 2.0},
        policy={"allowed_sender_domains": ["erp.example.com"]},
    )
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await send_one(relay.port, SENDER, ["blocked@example.org"], message())
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    assert (await dialog.send("MAIL FROM:<x@other.example>")).startswith("550 5.7.1")
    await dialog.close()

    status, text = await get(relay.http.port, "/metrics")
    assert status == 200
    assert sample(text, "relay_messages_received_total") == 2.0
    assert sample(text, "relay_messages_relayed_total") == 1.0
    assert 'relay_messages_rejected_total{reason="sender"} 1.0' in text
    assert 'relay_upstream_replies_total{code="250"} 1.0' in text
    assert sample(text, "relay_upstream_connections_opened_total") == 1.0
    assert sample(text, "relay_upstream_pool_connections") == 1.0
    assert sample(text, "relay_spool_depth") == 0.0
    assert sample(text, "relay_delivery_seconds_count") == 2.0


async def test_healthz_and_readyz_when_all_is_well(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = await start_relay(spool={"enabled": True, "path": str(tmp_path)})
    assert (await get(relay.http.port, "/healthz"))[0] == 200
    status, body = await get(relay.http.port, "/readyz")  # never tried upstream yet: ready
    assert status == 200, body
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    status, body = await get(relay.http.port, "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {"listening": "ok", "spool": "ok"}
    status, body = await get(relay.http.port, "/upstream")
    assert status == 200 and json.loads(body)["status"] == "ok"


async def test_readyz_says_why_the_spool_is_unwritable_and_upstream_says_why_infobip_fails(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """With the spool on, readiness means "accepts and stores mail": Infobip failing is /upstream's news."""
    standin.behaviour.offer_starttls = False
    relay = await start_relay(spool={"enabled": True, "path": str(tmp_path), "sync_wait": 1.0})
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert (await get(relay.http.port, "/readyz"))[0] == 200
    assert "does not offer STARTTLS" in (await get(relay.http.port, "/upstream"))[1]
    (tmp_path / "tmp").rename(tmp_path / "tmp-gone")
    (tmp_path / "tmp").write_text("not a directory")
    status, body = await get(relay.http.port, "/readyz")
    assert status == 503
    assert "spool not writable" in body and "STARTTLS" not in body
    os.remove(tmp_path / "tmp")
    (tmp_path / "tmp-gone").rename(tmp_path / "tmp")


async def test_the_port_is_the_one_bound_whether_asked_for_or_picked_by_the_os() -> None:
    for asked in (0, free_port()):
        server = HttpServer(Metrics(), lambda: Readiness(True, {}))
        await server.start("127.0.0.1", asked)
        try:
            assert server.port != 0 and asked in (0, server.port)
            assert (await get(server.port, "/healthz"))[0] == 200
        finally:
            await server.stop()
