"""Start-up over a big queue: the relay listens once queue/ is listed, and reads the entries afterwards,
oldest first, a batch at a time (relay/delivery/recovery.py). Nothing is lost on the way: every message is
delivered once, in arrival order batch by batch, and counted as waiting until it is.

A FIFO standing in for one queue/ file holds the loader where it is (its open blocks until the test writes
the file's bytes into it): what the relay does while the rest of the queue is still unread is then
observable without timing anything.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import structlog

from relay.core.keys import key_id, parse_key
from relay.core.message import Envelope, Prepared
from relay.delivery.recovery import LOAD_BATCH, read_entries
from relay.store.journal import Journal
from relay.store.rekey import check_keys
from relay.store.sealing import MissingKeyError, Sealer, new_key
from relay.store.spool import EntryState, Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, message
from tests.helpers import SENDER, get, journal_quiet, sample, spooled, until

QUEUED = 2_000  # a modest stand-in for 50,000: enough for four loader batches


def stored(n: int) -> tuple[Prepared, Envelope]:
    """Message n as a relay would have spooled it (ids sort by arrival, as the relay makes them)."""
    queue_id = f"{n:011x}{'ab' * 5}"
    rcpts = (f"q{n}@example.org",)
    data = message(to=rcpts[0], Message_ID=f"<q{n}@erp.example.com>")
    return (
        Prepared(queue_id, SENDER, rcpts, f"<q{n}@erp.example.com>", b"", data),
        Envelope(queue_id, SENDER, rcpts, f"<q{n}@erp.example.com>", "127.0.0.1", time.time(), len(data)),
    )


def queue_up(path: Path, count: int, sealer: Sealer | None = None) -> list[str]:
    spool = Spool(path, sealer)
    spool.create()
    for n in range(count):
        spool.commit(*stored(n))
    return [stored(n)[1].queue_id for n in range(count)]


class Hold:
    """queue/<id>.msg replaced by a FIFO: the loader's open of it blocks until `release` writes its bytes."""

    def __init__(self, spool: Path, queue_id: str) -> None:
        self.path = spool / "queue" / f"{queue_id}.msg"
        self.content = self.path.read_bytes()
        self.fifo = spool / f"{queue_id}.fifo"  # a second name: queue/<id>.msg becomes a plain file again first
        os.mkfifo(self.fifo, 0o600)
        self.path.unlink()
        os.link(self.fifo, self.path)
        self.released = False

    async def release(self) -> None:
        """The plain file back under its name (for delivery), then its bytes to the loader waiting."""
        if self.released:
            return
        self.released = True
        plain = self.path.with_name("plain.tmp.msg")
        plain.write_bytes(self.content)
        os.replace(plain, self.path)
        await asyncio.to_thread(self._write)

    def _write(self) -> None:
        with open(self.fifo, "wb") as pipe:  # the loader has it open for reading: this does not block
            pipe.write(self.content)
        self.fifo.unlink()


async def test_a_relay_over_a_big_queue_serves_and_delivers_the_oldest_while_the_rest_is_still_read(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    ids = queue_up(tmp_path, QUEUED)
    hold = Hold(tmp_path, ids[LOAD_BATCH])  # the first entry of the second batch
    try:
        with structlog.testing.capture_logs() as logs:
            relay = await start_relay(spool=spooled(tmp_path))
            dialog = await Dialog.open(relay.port)  # the queue is not read yet, and EHLO is answered
            assert (await dialog.hello()).startswith("250")
            await dialog.close()
            assert (await get(relay.http.port, "/readyz"))[0] == 200

            await standin.wait_for_messages(LOAD_BATCH, timeout=60)  # the first batch goes out while the loader waits
            first = {m.rcpt_tos[0] for m in standin.messages}
            assert first == {f"q{n}@example.org" for n in range(LOAD_BATCH)}  # the oldest, and only those

            async def depth() -> float:
                return sample((await get(relay.http.port, "/metrics"))[1], "relay_spool_depth")

            waiting = QUEUED - LOAD_BATCH  # not read yet, and still counted
            await until_async(depth, waiting)
            assert relay.delivery is not None and relay.delivery.depth == waiting
            assert not [e for e in logs if e["event"] == "spool_loaded"]

            await hold.release()
            await standin.wait_for_messages(QUEUED, timeout=60)
            await until(lambda: any(e["event"] == "spool_loaded" for e in logs))
            await until_async(depth, 0)
    finally:
        await hold.release()  # never leave the loader's thread blocked
    delivered = sorted(m.rcpt_tos[0] for m in standin.messages)
    assert delivered == sorted(f"q{n}@example.org" for n in range(QUEUED))  # each once
    [recovered] = [e for e in logs if e["event"] == "spool_recovered"]
    [loaded] = [e for e in logs if e["event"] == "spool_loaded"]
    assert (recovered["messages"], loaded["messages"]) == (QUEUED, QUEUED)


async def until_async(read: Callable[[], Awaitable[float]], wanted: float, timeout: float = 10.0) -> None:
    """Until `read()` returns `wanted` (an HTTP scrape: polled, not timed)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (got := await read()) != wanted:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"got {got}, wanted {wanted}")
        await asyncio.sleep(0.02)


async def test_a_message_held_by_an_outage_before_the_restart_waits_for_one_probe_however_late_it_is_read(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """Held messages in the second batch and the third: the relay still probes once, then sends them all."""
    ids = queue_up(tmp_path, 2 * LOAD_BATCH + 10)
    spool = Spool(tmp_path)
    for queue_id in ids[LOAD_BATCH:]:
        spool.write_state(queue_id, EntryState(attempts=1, next_attempt=9e12, held=True, last_reply="421 down"))
    with structlog.testing.capture_logs() as logs:
        await start_relay(spool=spooled(tmp_path))
        await standin.wait_for_messages(len(ids), timeout=60)
        await until(lambda: not os.listdir(tmp_path / "queue"), timeout=30)
    assert len([e for e in logs if e["event"] == "breaker_opened"]) == 1
    assert sorted(m.rcpt_tos[0] for m in standin.messages) == sorted(f"q{n}@example.org" for n in range(len(ids)))


def test_a_queued_message_no_configured_key_opens_is_reported_and_left_in_place(tmp_path: Path) -> None:
    """The start-up key check reads a sample; an entry it missed is found when it is read, and kept."""
    ours, other = Sealer([parse_key(new_key())]), Sealer([parse_key(other_key := new_key())])
    [kept] = queue_up(tmp_path, 1, other)
    spool = Spool(tmp_path, ours)
    with structlog.testing.capture_logs() as logs:
        assert read_entries(spool, [kept, "gone"], lambda _: False) == []
    [event] = [e for e in logs if e["event"] == "spool_entry_key_missing"]
    assert (event["queue_id"], event["key_id"]) == (kept, key_id(parse_key(other_key)))
    assert (tmp_path / "queue" / f"{kept}.msg").exists()


@pytest.mark.parametrize("where", ["oldest", "newest"])
def test_the_start_up_key_check_always_reads_the_oldest_and_newest_queued_message(tmp_path: Path, where: str) -> None:
    """Keys are rotated forward: the oldest message is under the oldest key still needed."""
    old, current = parse_key(new_key()), parse_key(new_key())
    ids = queue_up(tmp_path, 300, Sealer([current]))
    n = 0 if where == "oldest" else len(ids) - 1
    Spool(tmp_path).remove(ids[n])
    Spool(tmp_path, Sealer([old])).commit(*stored(n))
    with pytest.raises(MissingKeyError, match=key_id(old)):
        check_keys(Spool(tmp_path, Sealer([current])))
    check_keys(Spool(tmp_path, Sealer([current, old])))  # with the old key as well: no error


@pytest.mark.slow  # two relays and an SMTP hand-off of 520 messages
async def test_a_handoff_asked_for_while_the_queue_is_read_waits_for_the_rest_of_it(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """`relay queue handoff` (a replica scaled down just after it started) hands off what is not read yet too."""
    from relay.cli import main as relay_main

    standin.behaviour.down = True  # both relays keep what they have
    leaving, staying = tmp_path / "leaving", tmp_path / "staying"
    ids = queue_up(leaving, LOAD_BATCH + 20)
    hold = Hold(leaving, ids[LOAD_BATCH])
    try:
        await start_relay(spool=spooled(leaving, sync_wait=0.2, breaker_threshold=1))
        b = await start_relay(spool=spooled(staying, sync_wait=0.2, breaker_threshold=1))
        config = tmp_path / "a.toml"
        config.write_text(f'[listen]\nhostname = "relay.test"\n\n[spool]\npath = "{leaving}"\n')
        argv = ["queue", "--config", str(config), "handoff", "--to", f"127.0.0.1:{b.port}", "--timeout", "120"]
        command = asyncio.ensure_future(asyncio.to_thread(relay_main, argv))
        await until(lambda: queued(leaving) == len(ids) - LOAD_BATCH, timeout=60)  # what was read went over
        assert not command.done()  # ... and the rest is waited for
        await hold.release()
        assert await command == 0
    finally:
        await hold.release()
    assert queued(leaving) == 0
    assert b.delivery is not None
    await until(lambda: b.delivery is not None and b.delivery.depth == len(ids), timeout=30)  # each there, once


def queued(spool: Path) -> int:
    return sum(name.endswith(".msg") for name in os.listdir(spool / "queue"))


@pytest.mark.parametrize("queue_copy", ["readable", "damaged"])
async def test_a_message_promoted_just_before_a_crash_goes_once_from_queue_or_else_from_the_journal(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, queue_copy: str
) -> None:
    """In queue/ and still live in the journal: the queue/ copy wins once it is read; one that does not
    read is left for an engineer and the journal's copy is delivered."""
    [queue_id] = queue_up(tmp_path, 1)
    journal = Journal(tmp_path / "journal")
    journal.start(asyncio.get_running_loop())
    await journal.append(*stored(0))
    await journal.close()
    if queue_copy == "damaged":
        (tmp_path / "queue" / f"{queue_id}.msg").write_bytes(b"not json\r\n")
    with structlog.testing.capture_logs() as logs:
        await start_relay(spool=spooled(tmp_path))
        await standin.wait_for_messages(1)
        await until(lambda: journal_quiet(tmp_path / "journal"))
        await until(lambda: any(e["event"] == "spool_loaded" for e in logs))
    assert [m.rcpt_tos for m in standin.messages] == [["q0@example.org"]]
    unreadable = [e["queue_id"] for e in logs if e["event"] == "spool_entry_unreadable"]
    assert unreadable == ([queue_id] if queue_copy == "damaged" else [])
    if queue_copy == "damaged":
        assert queued(tmp_path) == 1  # kept where it is
