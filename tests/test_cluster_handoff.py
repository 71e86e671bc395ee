"""`relay queue handoff --to HOST:PORT`: a replica with mail queued during an outage hands it to another
relay over SMTP; when Infobip is back each message arrives exactly once (never both ways)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import pytest

from relay.app import Relay
from relay.cli import main as relay_main
from relay.core.message import Envelope, Prepared
from relay.inbound.server import new_queue_id
from relay.store.journal import Journal, segment_paths
from relay.store.spool import Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, free_port, message
from tests.helpers import SENDER, queue_files, send_one, spooled, until

pytestmark = pytest.mark.slow  # several relays, one handing its queue to another: seconds each; .ci/run runs them


def queue_config(path: Path, spool: Path, port: int | None = None) -> Path:
    """Enough config for `relay queue`: where the spool is (and the relay's own listener, if given)."""
    listen = f'host = "127.0.0.1"\nport = {port}\n' if port is not None else ""
    path.write_text(f'[listen]\nhostname = "relay.test"\n{listen}\n[spool]\npath = "{spool}"\n')
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


async def test_a_relay_refuses_to_hand_off_to_itself_and_nothing_moves(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.behaviour.down = True
    leaving, port = tmp_path / "leaving", free_port()
    a = await start_relay(
        listen={"port": port}, spool=spooled(leaving, sync_wait=0.2, breaker_threshold=1)
    )  # a fixed port: the relay's settings name the listener it uses
    await queue_during_outage(a, leaving, 3)
    own = queue_config(tmp_path / "own.toml", leaving, port)
    bare = queue_config(tmp_path / "bare.toml", leaving)  # the command cannot tell; the running relay can

    def handoff(config: Path, target: str) -> int:
        return relay_main(["queue", "--config", str(config), "handoff", "--to", target, "--timeout", "10"])

    for config, target in [(own, f"127.0.0.1:{port}"), (own, f"localhost:{port}"), (bare, f"127.0.0.1:{port}")]:
        assert await asyncio.to_thread(handoff, config, target) == 2, (config.name, target)
        assert "is this relay's own listener" in capsys.readouterr().err
    assert await asyncio.to_thread(handoff, own, "no-port-here") == 2
    assert "is not HOST:PORT" in capsys.readouterr().err
    assert messages_in(leaving) == 3 and a.delivery is not None and a.delivery.depth == 3  # all still here
    await a.stop()
    assert await asyncio.to_thread(handoff, own, f"127.0.0.1:{port}") == 2  # stopped: the command's own check
    assert messages_in(leaving) == 3 and not standin.messages


def journal_entry(n: int) -> tuple[Prepared, Envelope]:
    """A message as the relay's journal holds it (committed, acknowledged, not yet attempted)."""
    queue_id, rcpt, message_id = new_queue_id(), f"j{n}@example.org", f"<j{n}@erp.example.com>"
    data = message(to=rcpt, Message_ID=message_id)
    envelope = Envelope(queue_id, SENDER, (rcpt,), message_id, "127.0.0.1", time.time(), len(data))
    return Prepared(queue_id, SENDER, (rcpt,), message_id, b"", data), envelope


async def test_a_stopped_relays_journal_goes_too_and_its_dead_letters_stay(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    standin.behaviour.down = True
    leaving, staying = tmp_path / "leaving", tmp_path / "staying"
    a = await start_relay(spool=spooled(leaving, sync_wait=0.2, breaker_threshold=1))
    b = await start_relay(spool=spooled(staying, sync_wait=0.2, breaker_threshold=1))
    await queue_during_outage(a, leaving, 5)
    await a.stop()
    spool = Spool(leaving)
    dead_id, twice_id = spool.queued_ids()[:2]
    [dead_rcpt] = spool.read_envelope(dead_id).recipients
    spool.dead_letter(dead_id, {dead_rcpt: "550 5.1.1 no such user"}, "550 5.1.1 no such user")
    spool.remove(dead_id)  # its one recipient is dead: only in dead/
    # What a crash leaves: three messages only in journal/, and one promoted to queue/ just before the crash.
    journal = Journal(spool.journal_dir)
    journal.start(asyncio.get_running_loop())
    await asyncio.gather(*(journal.append(*journal_entry(n)) for n in range(3)))
    twice = spool.read_envelope(twice_id)
    _, data = spool.read(twice_id)
    await journal.append(Prepared(twice_id, SENDER, twice.recipients, twice.message_id, b"", data), twice)
    await journal.close()  # without marking them done: they stay live, as after kill -9

    config = queue_config(tmp_path / "a.toml", leaving)
    argv = ["queue", "--config", str(config), "handoff", "--to", f"127.0.0.1:{b.port}"]
    assert await asyncio.to_thread(relay_main, argv) == 0
    out = capsys.readouterr().out
    assert "3 message(s) left in journal/ by a crash moved to queue/ first" in out
    assert "handed off 7 message(s)" in out and "1 dead letter(s) in dead/ not handed off" in out
    assert messages_in(leaving) == 0 and segment_paths(spool.journal_dir) == []
    assert spool.dead_ids() == [dead_id]  # an engineer's to look at (or requeue), as on a single relay

    standin.behaviour.down = False
    await standin.wait_for_messages(7, timeout=20)
    await until(lambda: messages_in(staying) == 0)
    expected = Counter({f"r{n}@example.org": 1 for n in range(5)} | {f"j{n}@example.org": 1 for n in range(3)})
    del expected[dead_rcpt]
    assert Counter(m.rcpt_tos[0] for m in standin.messages) == expected
