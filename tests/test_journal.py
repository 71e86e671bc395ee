"""The spool's journal: record format, group commit, what recovery finds, segment retirement. Real files."""

from __future__ import annotations

import asyncio
import errno
import io
import json
import os
import time
from pathlib import Path

import pytest

import relay.store.journal
from relay.core.message import Envelope, Prepared
from relay.store.journal import BAD, DONE, MESSAGE, Journal, live_records, read_records, record_header, segment_paths
from relay.store.spool import Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, message
from tests.helpers import SENDER, queue_files, send_one, spooled, until


def prepared(n: int, body: bytes = b"") -> tuple[Prepared, Envelope]:
    queue_id = f"{n:021d}"
    data = message(Message_ID=f"<j{n}@erp.example.com>", body=body or f"message {n}\r\n".encode())
    rcpts = (f"r{n}@example.org",)
    return (
        Prepared(queue_id, SENDER, rcpts, f"<j{n}@erp.example.com>", b"X-IB-Test: yes\r\n", data),
        Envelope(queue_id, SENDER, rcpts, f"<j{n}@erp.example.com>", "127.0.0.1", 1.0, len(data) + 16),
    )


def record(kind: int, payload: bytes) -> bytes:
    return record_header(kind, [payload]) + payload


def test_reading_stops_at_the_first_torn_or_corrupt_record() -> None:
    good = record(MESSAGE, b'{"a":1}\nbody') + record(DONE, b"id1")
    assert [(k, p) for k, _, p in read_records(io.BytesIO(good))] == [(MESSAGE, b'{"a":1}\nbody'), (DONE, b"id1")]
    torn = good + record(DONE, b"id2")[:-1]
    assert len(list(read_records(io.BytesIO(torn)))) == 2
    flipped = bytearray(good + record(DONE, b"id2") + record(DONE, b"id3"))
    flipped[len(good) + 17] ^= 1  # one bit of id2's payload: a valid record follows, so damage, not a torn end
    assert [(k, p) for k, _, p in read_records(io.BytesIO(bytes(flipped)))][2:] == [(BAD, b"ie2"), (DONE, b"id3")]
    assert len(list(read_records(io.BytesIO(bytes(flipped[: -len(record(DONE, b"id3"))]))))) == 2  # last: torn
    assert list(read_records(io.BytesIO(b"\0" * 64))) == []  # zeros where a crash left no data


async def test_committed_and_not_done_is_what_recovery_finds_byte_for_byte(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    journal.start(asyncio.get_running_loop())
    messages = [prepared(n) for n in range(20)]
    await asyncio.gather(*(journal.append(m, e) for m, e in messages))
    await asyncio.gather(*(journal.done_durably(e.queue_id) for _, e in messages[::2]))  # the even ones are done
    # No close(): a crash. Recovery must give back exactly the odd ones, with their exact bytes.
    found = list(live_records(tmp_path / "journal"))
    assert [e for e, _ in found] == [e for _, e in messages[1::2]]
    assert [d for _, d in found] == [m.as_bytes() for m, _ in messages[1::2]]
    await journal.close()


async def test_a_batch_shares_one_sync_and_segments_go_once_nothing_in_them_is_live(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory, segment_bytes=4096)  # a new segment every few messages
    journal.start(asyncio.get_running_loop())
    messages = [prepared(n, body=b"x" * 1500 + b"\r\n") for n in range(12)]
    for m, e in messages:
        await journal.append(m, e)
    assert len(segment_paths(directory)) >= 4
    for _, e in messages[:-1]:
        await journal.done_durably(e.queue_id)
    await journal.append(*prepared(99))  # one more batch: the writer retires what it can
    await until(lambda: len(segment_paths(directory)) <= 2)
    assert [e.queue_id for e, _ in live_records(directory)] == [messages[-1][1].queue_id, f"{99:021d}"]
    await journal.close()
    assert len(segment_paths(directory)) == 2  # two messages still live: kept for the next start


async def test_a_done_mark_nobody_waits_for_goes_with_the_next_records_sync_or_alone_soon_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "journal"
    syncs: list[int] = []
    real = os.fdatasync

    def counted(fd: int) -> None:
        syncs.append(fd)
        real(fd)

    monkeypatch.setattr(relay.store.journal.os, "fdatasync", counted)
    monkeypatch.setattr(relay.store.journal, "DONE_DELAY", 1.0)
    journal = Journal(directory)
    journal.start(asyncio.get_running_loop())
    (m1, e1), (m2, e2) = prepared(1), prepared(2)
    await journal.append(m1, e1)
    before = len(syncs)
    journal.done(e1.queue_id)  # delivered: nobody waits for the mark...
    # A tenth of DONE_DELAY for the writer to sync the mark on its own, which it must not: no event says
    # "nothing happened", so this one wait is real time (the writer took 3 ms for it before).
    await asyncio.sleep(0.1)
    assert len(syncs) == before and [e.queue_id for e, _ in live_records(directory)] == [e1.queue_id]
    await journal.append(m2, e2)  # ...so it shares this record's sync instead of costing one of its own
    assert len(syncs) == before + 1
    assert [e.queue_id for e, _ in live_records(directory)] == [e2.queue_id]  # the mark is on disk
    journal.done(e2.queue_id)  # nothing follows: written alone, DONE_DELAY later
    await until(lambda: not list(live_records(directory)), timeout=5)
    assert len(syncs) == before + 2
    await journal.close()


async def test_close_with_nothing_live_removes_the_segments(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "journal")
    journal.start(asyncio.get_running_loop())
    m, e = prepared(1)
    await journal.append(m, e)
    journal.done(e.queue_id)
    await journal.close()
    assert segment_paths(tmp_path / "journal") == []


async def test_a_failed_write_is_cut_off_and_the_next_record_is_clean(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.store.journal

    journal = Journal(tmp_path / "journal")
    journal.start(asyncio.get_running_loop())
    real = relay.store.journal.write_all_at
    calls = {"n": 0}

    def half_then_full(fd: int, views: list[memoryview], offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:  # the second record: half of it reaches the file, then the disk is full
            os.pwrite(fd, bytes(views[0])[:8], offset)
            raise OSError(28, "No space left on device")
        return real(fd, views, offset)

    monkeypatch.setattr(relay.store.journal, "write_all_at", half_then_full)
    first, second, third = prepared(1), prepared(2), prepared(3)
    await journal.append(*first)
    with pytest.raises(OSError, match="No space"):
        await journal.append(*second)
    await journal.append(*third)
    assert [e.queue_id for e, _ in live_records(tmp_path / "journal")] == [first[1].queue_id, third[1].queue_id]
    await journal.close()


async def test_start_up_delivers_what_the_journal_held_and_not_what_was_done(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """What a relay killed after its commits leaves: two committed messages (one of them done), and a
    torn record at the end of the segment (never acknowledged)."""
    Spool(tmp_path).create()
    journal = Journal(tmp_path / "journal")
    journal.start(asyncio.get_running_loop())
    live, done = prepared(1), prepared(2)
    await journal.append(*live)
    await journal.append(*done)
    await journal.done_durably(done[1].queue_id)
    torn = record(MESSAGE, b'{"queue_id": "torn"}\nFrom: x\r\n\r\nnever acknowledged\r\n')
    with open(segment_paths(tmp_path / "journal")[-1], "ab") as handle:
        handle.write(torn[: len(torn) // 2])  # the writer thread is idle: nothing else appends now

    await start_relay(spool=spooled(tmp_path, sync_wait=0.0))
    [got] = await standin.wait_for_messages(1)
    assert got.data == live[0].as_bytes() and got.rcpt_tos == list(live[1].recipients)
    await until(lambda: queue_files(tmp_path) == [])
    assert os.listdir(tmp_path / "tmp") == []
    # Delivered from where it was; its old segment goes once its done mark is written: a fresh one is open.
    await until(lambda: len(segment_paths(tmp_path / "journal")) == 1)
    assert len(standin.messages) == 1
    await journal.close()


async def test_the_worker_goes_on_while_the_journal_write_lands_and_marks_it_done_after(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When Infobip already has every recipient, the only worker does not wait for a slow disk before
    taking the next message; the journal still gets the done marks once the writes land, so a restart
    sends nothing again."""
    import relay.store.journal

    synced = asyncio.Event()
    loop = asyncio.get_running_loop()
    real = os.fdatasync

    def slow_fdatasync(fd: int) -> None:
        time.sleep(1.0)
        real(fd)
        loop.call_soon_threadsafe(synced.set)

    monkeypatch.setattr(relay.store.journal.os, "fdatasync", slow_fdatasync)
    relay_ = await start_relay(spool=spooled(tmp_path), upstream={"pool_size": 1})
    first = await send_one(relay_.port, SENDER, ["a@example.org"], message())
    second = await send_one(relay_.port, SENDER, ["b@example.org"], message())
    assert first.startswith("250 2.6.0 ") and second.startswith("250 2.6.0 ")  # Infobip's answers
    assert not synced.is_set(), "the worker waited for the disk"
    assert [m.rcpt_tos for m in standin.messages] == [["a@example.org"], ["b@example.org"]]
    await until(lambda: synced.is_set() and list(live_records(tmp_path / "journal")) == [])


def test_the_envelope_line_carries_every_field_and_reads_back() -> None:
    from dataclasses import fields

    from relay.core.message import Envelope

    _, envelope = prepared(7)
    assert list(json.loads(envelope.line())) == [f.name for f in fields(Envelope)]
    assert Envelope.from_line(envelope.line()) == envelope


async def test_infobip_took_it_after_sync_wait_and_then_the_journal_failed_is_still_a_250(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 452 here would make the app send again what Infobip already has."""
    import relay.store.journal

    def slow_failing_fdatasync(fd: int) -> None:
        time.sleep(1.0)  # a disk in trouble: slow, then the write-back fails
        raise OSError(errno.EIO, "Input/output error")

    standin.behaviour.data_delay = 0.5  # Infobip answers after sync_wait, before the disk
    relay_ = await start_relay(spool=spooled(tmp_path, sync_wait=0.3), upstream={"pool_size": 1})
    monkeypatch.setattr(relay.store.journal.os, "fdatasync", slow_failing_fdatasync)
    reply = await send_one(relay_.port, SENDER, ["a@example.org"], message())
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"


async def test_after_a_failed_sync_nothing_is_taken_until_a_new_segment_is_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Linux reports a failed write-back once: a later fdatasync of the same file succeeds although
    bytes before it may be lost, and recovery would stop reading there. So after a failed sync the
    writer takes nothing more into that segment; it fails appends until a new segment is open."""
    import relay.store.journal

    directory = tmp_path / "journal"
    journal = Journal(directory)
    journal.start(asyncio.get_running_loop())
    real_fdatasync, real_fsync_dir = os.fdatasync, relay.store.journal.fsync_dir
    failures = {"sync": 0, "dir": 0}

    def fdatasync(fd: int) -> None:
        if failures["sync"]:
            failures["sync"] -= 1
            size = os.fstat(fd).st_size
            os.pwrite(fd, b"\0" * 16, size - 16)  # the lost write-back: what the disk holds after a crash
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    def fsync_dir(path: Path) -> None:
        if failures["dir"]:
            failures["dir"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(relay.store.journal.os, "fdatasync", fdatasync)
    monkeypatch.setattr(relay.store.journal, "fsync_dir", fsync_dir)
    a, b, c, d = prepared(1), prepared(2), prepared(3), prepared(4)
    await journal.append(*a)
    failures["sync"], failures["dir"] = 1, 2  # the sync fails, and so do the next two new segments
    with pytest.raises(OSError):
        await journal.append(*b)  # its client hears 452
    with pytest.raises(OSError):
        await journal.append(*c)  # the sick segment takes nothing more, and no new one could be made
    await journal.append(*d)  # a new segment: acknowledged
    assert [e.queue_id for e, _ in live_records(directory)] == [a[1].queue_id, d[1].queue_id]
    assert len(segment_paths(directory)) == 2  # no half-made segment left behind
    await journal.close()


async def test_a_clean_stop_leaves_nothing_live_in_the_journal(
    start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A message never attempted, whose journal write lands only during the stop, goes to queue/ and
    is marked done: the next start must not find it twice."""
    import relay.store.journal

    real = os.fdatasync

    def slow(fd: int) -> None:
        time.sleep(0.5)
        real(fd)

    relay_ = await start_relay(spool=spooled(tmp_path))
    assert relay_.delivery is not None
    monkeypatch.setattr(relay.store.journal.os, "fdatasync", slow)
    relay_.delivery.queue.stop()  # no worker takes it: it is still waiting when the stop comes
    m, e = prepared(1)
    relay_.delivery.submit(m, e)
    await relay_.delivery.stop(0.0)
    assert queue_files(tmp_path) == [f"{e.queue_id}.msg"]
    assert list(live_records(tmp_path / "journal")) == []


async def test_readiness_says_so_while_the_journal_takes_nothing(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import relay.store.journal

    relay_ = await start_relay(spool=spooled(tmp_path))
    real_fdatasync, real_fsync_dir = os.fdatasync, relay.store.journal.fsync_dir
    sick = {"on": True}

    def fdatasync(fd: int) -> None:
        if sick["on"]:
            raise OSError(errno.EIO, "Input/output error")
        real_fdatasync(fd)

    def fsync_dir(path: Path) -> None:
        if sick["on"]:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(relay.store.journal.os, "fdatasync", fdatasync)
    monkeypatch.setattr(relay.store.journal, "fsync_dir", fsync_dir)
    standin.behaviour.down = True  # so the reply depends on the disk alone
    reply = await send_one(relay_.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("452 4.3.1 ")
    readiness = relay_.readiness()
    assert not readiness.ready and "no new segment after a failed sync" in readiness.checks["spool"]
    sick["on"] = False  # the disk is back: the next message opens a new segment
    standin.behaviour.down = False
    reply = await send_one(relay_.port, SENDER, ["b@example.org"], message())
    assert reply.startswith("250 2.6.0 ")
    await until(lambda: relay_.readiness().checks["spool"] == "ok")  # once its journal write is done


def _failing_done_writes(monkeypatch: pytest.MonkeyPatch, count: int) -> dict[str, int]:
    """The next `count` writes of done marks fail with ENOSPC (a message record still goes through)."""
    import relay.store.journal

    real = relay.store.journal.write_all_at
    left = {"n": count}

    def write_all_at(fd: int, views: list[memoryview], offset: int) -> int:
        if left["n"] and bytes(views[0][2:3]) == bytes([DONE]):
            left["n"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, views, offset)

    monkeypatch.setattr(relay.store.journal, "write_all_at", write_all_at)
    return left


async def test_a_record_whose_sync_failed_is_never_recovered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its client hears 452, yet its bytes may still be in the old segment: a done mark in the new
    segment, durable before that answer, keeps a start after kill -9 from sending it."""
    import relay.store.journal

    directory = tmp_path / "journal"
    journal = Journal(directory)
    journal.start(asyncio.get_running_loop())
    real = os.fdatasync
    fail = {"n": 0}

    def fdatasync(fd: int) -> None:
        if fail["n"]:
            fail["n"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(relay.store.journal.os, "fdatasync", fdatasync)
    a, b = prepared(1), prepared(2)
    await journal.append(*a)  # live: its first attempt is under way
    fail["n"] = 1
    with pytest.raises(OSError):
        await journal.append(*b)
    assert [e.queue_id for e, _ in live_records(directory)] == [a[1].queue_id]  # no close(): a kill -9
    await journal.close()


async def test_done_marks_a_failed_write_left_behind_are_written_at_close(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "journal"
    journal = Journal(directory)
    journal.start(asyncio.get_running_loop())
    delivered, waiting = prepared(1), prepared(2)
    await journal.append(*delivered)
    await journal.append(*waiting)  # stays live: kept for the next start
    failing = _failing_done_writes(monkeypatch, 1)
    with pytest.raises(OSError):
        await journal.done_durably(delivered[1].queue_id)
    assert failing["n"] == 0  # the disk is fine again
    await journal.close()
    assert [e.queue_id for e, _ in live_records(directory)] == [waiting[1].queue_id]


async def test_a_refusal_handed_back_is_not_sent_later_when_its_done_mark_fails(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay_ = await start_relay(spool=spooled(tmp_path, retry_initial=0.05), upstream={"pool_size": 1})
    failing = _failing_done_writes(monkeypatch, 1)
    standin.behaviour.data_replies.append("550 5.7.1 Policy says no")
    reply = await send_one(relay_.port, SENDER, ["a@example.org"], message())
    assert reply.startswith("550 5.7.1 ") and failing["n"] == 0
    second = await send_one(relay_.port, SENDER, ["b@example.org"], message())  # a batch retries the mark
    assert second.startswith("250 2.6.0 ")
    await until(lambda: list(live_records(tmp_path / "journal")) == [] and queue_files(tmp_path) == [])
    assert [m.rcpt_tos for m in standin.messages] == [["b@example.org"]]


@pytest.mark.parametrize("infobip", ["slower than the disk", "refuses for good"])
async def test_nothing_stays_live_in_the_journal_after_ordinary_messages(
    infobip: str, standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """A record left live would pin its segment and every later one, and be sent again at the next start."""
    relay_ = await start_relay(spool=spooled(tmp_path))
    if infobip == "slower than the disk":
        standin.behaviour.data_delay = 0.1  # the journal write lands first
        expected = "250 2.6.0 "
    else:
        standin.behaviour.data_replies.extend(["550 5.7.1 Policy says no"] * 3)
        expected = "550 5.7.1 "
    for n in range(3):
        reply = await send_one(relay_.port, SENDER, [f"r{n}@example.org"], message())
        assert reply.startswith(expected), reply
    await until(lambda: list(live_records(tmp_path / "journal")) == [])  # the done marks are on disk


async def test_a_client_hanging_up_during_an_outage_leaves_its_message_in_queue_not_in_memory(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """With the breaker open nothing attempts it for a long time: held in memory and live in the journal,
    it would pin every later segment for the whole outage."""
    standin.behaviour.down = True
    relay_ = await start_relay(spool=spooled(tmp_path, sync_wait=0.3), upstream={"pool_size": 1})
    for n in range(6):  # enough failures to open the breaker
        await send_one(relay_.port, SENDER, [f"p{n}@example.org"], message())
    quitter = await Dialog.open(relay_.port)
    await quitter.hello()
    for line in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<gone@example.org>", "DATA"):
        await quitter.send(line)
    quitter.writer.write(message(Message_ID="<gone@x>") + b".\r\n")
    await quitter.writer.drain()
    assert relay_.delivery is not None
    delivery = relay_.delivery
    await until(lambda: delivery.queue.depth == 7)
    await quitter.close()  # before its sync_wait is over
    await until(
        lambda: (
            len([f for f in queue_files(tmp_path) if f.endswith(".msg")]) == 7
            and list(live_records(tmp_path / "journal")) == []
        )
    )
