"""Outages: the breaker pauses delivery, probes on its own short schedule, and releases the backlog the
moment Infobip is back; the app is answered at once meanwhile, and the operator can see all of it."""

from __future__ import annotations

import json
import time
from pathlib import Path

from relay.app import Relay
from relay.cli import main as relay_main
from relay.testing.clock import FakeClock
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, message, relay_settings
from tests.helpers import SENDER, get, queue_files, sample, send_one, spooled, until


def connections(standin: InfobipStandIn) -> int:
    return len(standin.connections)


def next_probe(relay: Relay) -> float:
    return relay.metrics.registry.get_sample_value("relay_breaker_next_probe_timestamp_seconds") or 0.0


def states(spool: Path) -> list[dict[str, object]]:
    return [json.loads((spool / "queue" / f).read_text()) for f in queue_files(spool) if f.endswith(".state")]


async def test_while_paused_the_app_is_answered_at_once_not_after_sync_wait(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.down = True
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=5.0, breaker_threshold=1))
    await send_one(relay.port, SENDER, ["first@example.org"], message())  # its failure pauses delivery
    assert relay.delivery is not None and relay.delivery.breaker.is_open
    started = time.monotonic()
    reply = await send_one(relay.port, SENDER, ["second@example.org"], message())
    assert time.monotonic() - started < 1.0
    assert reply.startswith("250 2.0.0 Queued as ") and reply.endswith(
        "delivery to Infobip continues in the background"
    )


async def test_probes_cost_one_connection_each_and_the_first_success_releases_everything(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    clock = FakeClock(randomness=0.5)  # probe intervals without jitter: 1 s, then 2 s, 4 s, 5 s ...
    standin.behaviour.down = True
    relay = await start_relay(
        clock=clock,
        spool=spooled(tmp_path, sync_wait=0.5, breaker_threshold=1, retry_initial=60, retry_max=600),
        upstream={"pool_size": 1},  # one worker: the order of arrival is the order they go in
    )
    for n in range(3):
        assert (await send_one(relay.port, SENDER, [f"r{n}@example.org"], message())).startswith("250 2.0.0 ")
    await until(lambda: len(states(tmp_path)) + len(queue_files(tmp_path)) >= 4)
    # An outage is not the messages' fault: no attempt is counted against them, no backoff grows.
    assert all(state["attempts"] == 0 and state["held"] for state in states(tmp_path))
    paused_at = connections(standin)
    clock.advance(1.0)  # the first probe: one connection, no message
    await until(lambda: connections(standin) == paused_at + 1)
    # ... and its failure taken in, so the next probe is 2 s from now: the stand-in counts the connection
    # before the relay has read its 421, and a failure taken in after the jump below dates from after it.
    await until(lambda: next_probe(relay) > clock.now)
    clock.advance(1.9)  # the next one is 2 s after the first
    assert connections(standin) == paused_at + 1
    standin.behaviour.down = False
    clock.advance(0.1)
    await standin.wait_for_messages(3)  # released at once, oldest first
    assert [m.rcpt_tos for m in standin.messages] == [["r0@example.org"], ["r1@example.org"], ["r2@example.org"]]
    await until(lambda: queue_files(tmp_path) == [])


async def test_queue_flush_while_paused_probes_instead_of_firing_every_message(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    clock = FakeClock(randomness=0.5)
    standin.behaviour.down = True
    relay = await start_relay(clock=clock, spool=spooled(tmp_path, sync_wait=0.3, breaker_threshold=1))
    for n in range(5):
        await send_one(relay.port, SENDER, [f"r{n}@example.org"], message())
    assert relay.delivery is not None
    before = connections(standin)
    relay.delivery.flush()  # what `relay queue flush` asks for
    await until(lambda: connections(standin) == before + 1)  # one probe, not five attempts
    assert all(state["attempts"] == 0 for state in states(tmp_path))


async def test_readiness_stays_ready_while_infobip_refuses_our_credentials_and_upstream_says_so(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.3), upstream={"password": "wrong"})
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("250 2.0.0 Queued as ")  # stored: the relay still does its job
    status, body = await get(relay.http.port, "/readyz")
    assert status == 200, body
    status, body = await get(relay.http.port, "/upstream")
    upstream = json.loads(body)
    assert status == 200 and upstream["status"] == "credentials_refused" and "credentials" in upstream["last_error"]
    _, metrics = await get(relay.http.port, "/metrics")
    assert sample(metrics, "relay_upstream_credentials_refused") == 1.0
    assert sample(metrics, "relay_upstream_up") == 0.0


async def test_the_pause_is_logged_counted_and_shown_by_queue_list(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: object
) -> None:
    import pytest

    assert isinstance(capsys, pytest.CaptureFixture)
    standin.behaviour.down = True
    relay = await start_relay(clock=FakeClock(), spool=spooled(tmp_path, sync_wait=0.3, breaker_threshold=1))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await until(lambda: (tmp_path / "status.json").exists())
    _, metrics = await get(relay.http.port, "/metrics")
    assert sample(metrics, "relay_breaker_open") == 1.0
    assert sample(metrics, "relay_breaker_next_probe_timestamp_seconds") > 0
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{tmp_path}"\n')
    capsys.readouterr()
    assert relay_main(["queue", "--config", str(config), "list"]) == 0
    out = capsys.readouterr().out
    assert "delivery is PAUSED: Infobip is not answering; next probe at " in out
    assert " paused " in out  # the NEXT TRY column, instead of "now"


async def test_a_restart_tries_what_an_outage_held_at_once_and_keeps_infobips_4xx_schedule(
    standin: InfobipStandIn, tmp_path: Path
) -> None:
    settings = relay_settings(standin, spool=spooled(tmp_path, sync_wait=0.3, retry_initial=60, retry_max=600))
    first = Relay(settings)
    await first.start()
    standin.behaviour.data_replies.append("451 4.3.0 Try later")  # Infobip's own deferral: backs off ~45 s
    deferred = await send_one(first.port, SENDER, ["deferred@example.org"], message())
    assert "Infobip deferred it" in deferred
    standin.behaviour.down = True
    await send_one(first.port, SENDER, ["held@example.org"], message())  # held by the outage
    await first.stop()
    standin.behaviour.down = False
    second = Relay(settings)
    await second.start()
    try:
        await standin.wait_for_messages(1)
        assert [m.rcpt_tos for m in standin.messages] == [["held@example.org"]]
        [state] = states(tmp_path)
        assert state["recipients"] == ["deferred@example.org"] and state["next_attempt"] > time.time() + 30
    finally:
        await second.stop()
