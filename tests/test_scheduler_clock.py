"""The scheduler driven by a fake clock: retries go out at their time and not before, with no sleeping."""

from __future__ import annotations

import json
from pathlib import Path

from relay.testing.clock import FakeClock
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, message
from tests.helpers import SENDER, queue_files, send_one, spooled, until


def data_commands(standin: InfobipStandIn) -> int:
    return sum(c.commands.count("DATA") for c in standin.connections)


async def test_a_deferred_message_goes_out_again_at_its_retry_time_and_not_before(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    clock = FakeClock(randomness=0.5)  # backoff after attempt 1: 60 s * (0.5 + 0.5 / 2) = 45 s
    standin.behaviour.data_replies.append("451 4.3.0 Try later")
    relay = await start_relay(clock=clock, spool=spooled(tmp_path, sync_wait=2.0, retry_initial=60, retry_max=600))
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply.endswith("Infobip deferred it (451 4.3.0 Try later); the relay will retry")
    queue_id = reply.split("Queued as ")[1].split(";")[0]
    state = json.loads((tmp_path / "queue" / f"{queue_id}.state").read_text())
    assert state["next_attempt"] == clock.now + 45.0
    clock.advance(44.9)  # no timer falls due: nothing at all is scheduled on the loop
    assert data_commands(standin) == 1 and standin.messages == []
    clock.advance(0.2)
    await standin.wait_for_messages(1)
    assert data_commands(standin) == 2
    await until(lambda: queue_files(tmp_path) == [])


async def test_a_reload_changes_the_breaker(standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path) -> None:
    """Before the redesign the breaker was built once: a reloaded `breaker_threshold` changed nothing."""
    clock = FakeClock()
    standin.behaviour.down = True
    relay = await start_relay(clock=clock, spool=spooled(tmp_path, sync_wait=2.0, breaker_threshold=50))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert relay.delivery is not None and not relay.delivery.breaker.is_open  # one failure of 50
    new = relay.settings.model_copy(update={"spool": relay.settings.spool.model_copy(update={"breaker_threshold": 1})})
    await relay.reload(new)
    assert relay.delivery.breaker.is_open  # the failure already counted is now enough
