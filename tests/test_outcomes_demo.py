"""`relay serve --demo` with the loop closed: reports from the stand-in, a bounce printed by the local
mail server. In process (the demo's own wiring, with a faster poll), over the same real sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.app import Relay
from relay.outcomes.demo import demo_outcomes
from relay.testing.standin import InfobipStandIn
from tests.conftest import message, relay_settings
from tests.helpers import SENDER, send_one


async def test_the_demo_prints_the_bounce_of_a_recipient_at_bounce_example(
    standin: InfobipStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = relay_settings(standin, spool={"enabled": True, "path": str(tmp_path), "sync_wait": 2.0})
    settings, sink = await demo_outcomes(base, standin)
    assert settings.reports.enabled and settings.bounces.enabled and settings.bounces.smtp_port == sink.port
    fast = settings.model_copy(update={"reports": settings.reports.model_copy(update={"poll_interval": 0.05})})
    relay = Relay(fast)
    await relay.start()
    try:
        assert (await send_one(relay.port, SENDER, ["nobody@bounce.example"], message())).startswith("250")
        await sink.wait_for(1)
    finally:
        await relay.stop()
        await sink.stop()
    printed = capsys.readouterr().out
    assert "every recipient at bounce.example bounces" in printed
    assert f"=== [demo company mail server] a bounce for <{SENDER}> (MAIL FROM:<>) ===" in printed
    assert "report-type=delivery-status" in printed and "Final-Recipient: rfc822; nobody@bounce.example" in printed
    assert "Status: 5.1.1" in printed and "Action: failed" in printed
