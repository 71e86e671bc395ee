"""`relay queue handoff --to HOST:PORT`: a replica with mail queued during an outage hands it to another
relay over SMTP; when Infobip is back each message arrives exactly once (never both ways)."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

from relay.app import Relay
from relay.cli import main as relay_main
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, message
from tests.helpers import SENDER, queue_files, send_one, spooled, until

pytestmark = pytest.mark.slow  # several relays, one handing its queue to another: seconds each; .ci/run runs them


def queue_config(path: Path, spool: Path) -> Path:
    """Enough config for `relay queue`: where the spool is."""
    path.write_text(f'[listen]\nhostname = "relay.test"\n\n[spool]\npath = "{spool}"\n')
    return path


def messages_in(spool: Path) -> int:
    return sum(name.endswith(".msg") for name in queue_files(spool))


async def queue_during_outage(relay: Relay, spool: Path, count: int) -> None:
    slots = asyncio.Semaphore(50)  # the apps: many at once, fewer than listen.max_connections

    async def one(n: int) -> str:
        async with slots:
            return await send_one(relay.port, SENDER, [f"r{n}@example.org"], message(to=f"r{n}@example.org"))

    sent = await asyncio.gather(*(one(n) for n in range(count)))
    assert all(reply.startswith("250 ") for reply in sent)
    await until(lambda: messages_in(spool) == count)  # each in its own file in queue/, held by the outage


@pytest.mark.parametrize("count", [60, pytest.param(1000, marks=pytest.mark.slow)])
async def test_a_running_relay_hands_its_queue_to_another_and_each_message_arrives_once(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, count: int
) -> None:
    standin.behaviour.down = True
    leaving, staying = tmp_path / "leaving", tmp_path / "staying"
    a = await start_relay(spool=spooled(leaving, sync_wait=0.2, breaker_threshold=1))
    b = await start_relay(spool=spooled(staying, sync_wait=0.2, breaker_threshold=1))
    await queue_during_outage(a, leaving, count)

    config = queue_config(tmp_path / "a.toml", leaving)
    argv = ["queue", "--config", str(config), "handoff", "--to", f"127.0.0.1:{b.port}", "--timeout", "120"]
    assert await asyncio.to_thread(relay_main, argv) == 0
    assert messages_in(leaving) == 0
    await until(lambda: messages_in(staying) == count)

    standin.behaviour.down = False
    await standin.wait_for_messages(count, timeout=60)
    await until(lambda: messages_in(staying) == 0 and messages_in(leaving) == 0)
    for relay in (a, b):
        assert relay.delivery is not None and relay.delivery.depth == 0  # nothing left to send: no more can come
    arrived = Counter(m.rcpt_tos[0] for m in standin.messages)
    assert arrived == Counter({f"r{n}@example.org": 1 for n in range(count)})


async def test_a_stopped_relays_spool_is_handed_off_by_the_command_itself(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.down = True
    leaving, staying = tmp_path / "leaving", tmp_path / "staying"
    a = await start_relay(spool=spooled(leaving, sync_wait=0.2, breaker_threshold=1))
    b = await start_relay(spool=spooled(staying, sync_wait=0.2, breaker_threshold=1))
    await queue_during_outage(a, leaving, 20)
    await a.stop()

    config = queue_config(tmp_path / "a.toml", leaving)
    argv = ["queue", "--config", str(config), "handoff", "--to", f"127.0.0.1:{b.port}"]
    assert await asyncio.to_thread(relay_main, argv) == 0
    assert messages_in(leaving) == 0
    standin.behaviour.down = False
    await standin.wait_for_messages(20, timeout=20)
    await until(lambda: messages_in(staying) == 0)
    assert Counter(m.rcpt_tos[0] for m in standin.messages) == Counter({f"r{n}@example.org": 1 for n in range(20)})


async def test_what_the_other_relay_refuses_stays_here(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.down = True
    leaving = tmp_path / "leaving"
    a = await start_relay(spool=spooled(leaving, sync_wait=0.2, breaker_threshold=1))
    b = await start_relay(policy={"allowed_sender_domains": ["elsewhere.example"]})  # refuses our sender
    await queue_during_outage(a, leaving, 3)
    config = queue_config(tmp_path / "a.toml", leaving)
    argv = ["queue", "--config", str(config), "handoff", "--to", f"127.0.0.1:{b.port}", "--timeout", "3"]
    assert await asyncio.to_thread(relay_main, argv) == 1
    assert messages_in(leaving) == 3
