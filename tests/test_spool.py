"""Store-and-forward: 250 only once on disk, retries, dead letters, splitting, the breaker. Real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from pathlib import Path

import structlog.testing

from relay.app import Relay
from relay.store.spool import Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, message
from tests.helpers import SENDER, queue_files, send_one, small_tmpfs, spooled, until


async def test_accepted_by_infobip_within_sync_wait_gets_its_id_and_leaves_no_file(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = await start_relay(spool=spooled(tmp_path))
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    [got] = standin.messages
    assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
    await until(lambda: queue_files(tmp_path) == [])
    assert os.listdir(tmp_path / "tmp") == [] and os.listdir(tmp_path / "dead") == []


async def test_upstream_down_then_back_delivers_everything_in_order(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.down = True
    # The first failure pauses delivery; the probe that finds Infobip back releases the backlog in order.
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.2, breaker_threshold=1), upstream={"pool_size": 1})
    replies = [
        await send_one(relay.port, SENDER, [f"r{i}@example.org"], message(Message_ID=f"<m{i}@erp.example.com>"))
        for i in range(6)
    ]
    assert all(r.startswith("250 2.0.0 Queued as ") for r in replies), replies
    assert len([f for f in queue_files(tmp_path) if f.endswith(".msg")]) == 6
    standin.behaviour.down = False
    await standin.wait_for_messages(6)
    arrived = [m.rcpt_tos[0] for m in standin.messages]
    assert arrived == [f"r{i}@example.org" for i in range(6)]
    await until(lambda: queue_files(tmp_path) == [])


async def test_451_is_retried_with_backoff_until_accepted(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.data_replies.extend(["451 4.3.0 Try later", "451 4.3.0 Try later"])
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.0))
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message(Message_ID="<retry@erp.example.com>"))
    assert reply.startswith("250 2.0.0 Queued as ")
    await standin.wait_for_messages(1)
    assert b"Message-ID: <retry@erp.example.com>" in standin.messages[0].data
    assert sum(c.commands.count("DATA") for c in standin.connections) == 3
    await until(lambda: queue_files(tmp_path) == [])


async def test_state_file_says_why_a_message_waits(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.data_replies.append("451 4.3.0 Try later")
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.5, retry_initial=30, retry_max=60))
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    queue_id = reply.split("Queued as ")[1].split(";")[0]
    assert reply == f"250 2.0.0 Queued as {queue_id}; Infobip deferred it (451 4.3.0 Try later); the relay will retry"
    state = json.loads((tmp_path / "queue" / f"{queue_id}.state").read_text())
    assert state["attempts"] == 1 and state["last_reply"] == "451 4.3.0 Try later"
    assert 15 <= state["next_attempt"] - time.time() <= 30
    envelope_line = (tmp_path / "queue" / f"{queue_id}.msg").read_bytes().split(b"\n", 1)[0]
    assert json.loads(envelope_line)["recipients"] == ["a@example.org"]


async def test_connection_dropped_mid_data_is_retried(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.drop_at_end_of_data = 1
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.0))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await standin.wait_for_messages(1)
    await until(lambda: queue_files(tmp_path) == [])


async def test_permanent_refusal_within_sync_wait_goes_back_to_the_client(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.data_replies.append("554 5.6.0 Message content rejected")
    relay = await start_relay(spool=spooled(tmp_path))
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    assert reply == "554 5.6.0 Infobip refused the message: Message content rejected"
    assert queue_files(tmp_path) == [] and os.listdir(tmp_path / "dead") == []


async def test_permanent_refusal_after_sync_wait_is_dead_lettered(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.data_replies.append("554 5.6.0 Message content rejected")
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.0))
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    queue_id = reply.split("Queued as ")[1].split(";")[0]
    await until(lambda: (tmp_path / "dead" / f"{queue_id}.state").exists() and queue_files(tmp_path) == [])
    state = json.loads((tmp_path / "dead" / f"{queue_id}.state").read_text())
    assert state["dead"] == {"a@example.org": "554 5.6.0 Message content rejected"}


async def test_one_refused_recipient_of_three_only_it_is_dead_lettered(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.refuse_recipients["blocked@example.org"] = "550 5.7.1 Recipient <blocked@example.org> not allowed"
    relay = await start_relay(spool=spooled(tmp_path))
    reply = await send_one(relay.port, SENDER, ["a@example.org", "blocked@example.org", "c@example.org"], message())
    [got] = standin.messages
    assert got.rcpt_tos == ["a@example.org", "c@example.org"]
    queue_id = reply.split("Queued as ")[1].split(";")[0]
    assert reply == (
        f"250 2.0.0 Queued as {queue_id}; Infobip took 2 of 3 recipients; "
        "1 refused for good (550 5.7.1 Recipient <blocked@example.org> not allowed)"
    )
    [dead_state] = [f for f in os.listdir(tmp_path / "dead") if f.endswith(".state")]
    state = json.loads((tmp_path / "dead" / dead_state).read_text())
    assert state["dead"] == {"blocked@example.org": "550 5.7.1 Recipient <blocked@example.org> not allowed"}
    await until(lambda: queue_files(tmp_path) == [])


async def test_one_deferred_recipient_of_three_only_it_is_retried(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.refuse_recipients["later@example.org"] = "450 4.2.0 Mailbox busy"
    relay = await start_relay(spool=spooled(tmp_path))
    reply = await send_one(relay.port, SENDER, ["a@example.org", "later@example.org", "c@example.org"], message())
    # Not "2.6.0 Message queued": Infobip does not have every recipient yet (issue: a partial outcome).
    assert reply.startswith("250 2.0.0 Queued as ") and reply.endswith(
        "; Infobip took 2 of 3 recipients; 1 deferred, the relay will retry (450 4.2.0 Mailbox busy)"
    )
    assert standin.messages[0].rcpt_tos == ["a@example.org", "c@example.org"]
    del standin.behaviour.refuse_recipients["later@example.org"]
    await standin.wait_for_messages(2)
    assert standin.messages[1].rcpt_tos == ["later@example.org"]
    assert standin.messages[1].data == standin.messages[0].data  # same bytes, same Message-ID
    await until(lambda: queue_files(tmp_path) == [])


async def test_transient_failures_past_max_age_are_dead_lettered(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.data_replies.extend(["451 4.3.0 Try later"] * 50)
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.0, max_age=0.3))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await until(lambda: any(f.endswith(".state") for f in os.listdir(tmp_path / "dead")) and not queue_files(tmp_path))
    [dead_state] = [f for f in os.listdir(tmp_path / "dead") if f.endswith(".state")]
    reason = json.loads((tmp_path / "dead" / dead_state).read_text())["dead"]["a@example.org"]
    assert reason.startswith("expired after ") and reason.endswith("last reply: 451 4.3.0 Try later")


async def test_more_than_1000_recipients_are_split_into_transactions(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    from tests.conftest import Dialog

    relay = await start_relay(spool=spooled(tmp_path), listen={"max_recipients": 2500})
    recipients = [f"r{i}@example.org" for i in range(2500)]
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    dialog.writer.write(
        f"MAIL FROM:<{SENDER}>\r\n".encode() + b"".join(f"RCPT TO:<{r}>\r\n".encode() for r in recipients)
    )
    for _ in range(2501):
        assert (await dialog.reply()).startswith("250 ")
    assert (await dialog.send("DATA")).startswith("354")
    reply = await dialog.send(message() + b".\r\n")
    await dialog.close()
    assert [len(m.rcpt_tos) for m in standin.messages] == [1000, 1000, 500]
    assert [r for m in standin.messages for r in m.rcpt_tos] == recipients
    ids = ",".join(m.infobip_id for m in standin.messages)
    assert reply == f"250 2.6.0 Message queued as {ids}"


async def test_breaker_stops_hammering_a_failing_upstream_and_resumes(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.down = True
    relay = await start_relay(
        spool=spooled(tmp_path, sync_wait=0.0, retry_initial=0.2, retry_max=0.4, breaker_threshold=3),
        upstream={"pool_size": 2},
    )
    for i in range(20):
        await send_one(relay.port, SENDER, [f"r{i}@example.org"], message())
    assert relay.delivery is not None
    await until(lambda: relay.delivery is not None and relay.delivery.breaker.is_open)
    before = len(standin.connections)
    await asyncio.sleep(0.5)  # time passing is the point here: count connection attempts over it
    attempts = len(standin.connections) - before
    # Without the breaker each of the 20 messages is retried every 0.1-0.4 s: some 40 connections here.
    assert attempts <= 6, attempts
    standin.behaviour.down = False
    await standin.wait_for_messages(20, timeout=15)
    await until(lambda: queue_files(tmp_path) == [])


async def test_startup_recovers_what_was_committed_and_drops_what_was_not(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    from datetime import UTC, datetime

    from relay.config import PolicySettings
    from relay.core.message import Envelope, Received
    from relay.core.prepare import prepare

    spool = Spool(tmp_path)
    spool.create()
    data = message(Message_ID="<kept@erp.example.com>")
    received = Received("0000000000committed", "127.0.0.1", SENDER, ("a@example.org",), data, datetime.now(UTC), "h")
    prepared = prepare(received, PolicySettings())
    envelope = Envelope(prepared.queue_id, SENDER, ("a@example.org",), "<kept@erp.example.com>", "127.0.0.1", 0.0, 1)
    spool.commit(prepared, envelope)  # what a relay killed right after its commit leaves
    (spool.tmp / "00000000000half.msg").write_bytes(b'{"queue_id": "half"')  # killed mid-write: never acked
    (spool.queue / "0000000000orphan.state").write_text("{}")  # its message was removed before the kill

    await start_relay(spool=spooled(tmp_path, sync_wait=0.0))
    [got] = await standin.wait_for_messages(1)
    assert got.data == prepared.as_bytes() and got.data.endswith(data)
    await until(lambda: queue_files(tmp_path) == [])
    assert os.listdir(tmp_path / "tmp") == []


async def test_disk_full_gets_452_and_leaves_nothing_half_written(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "small") as spool_path:
        standin.behaviour.data_replies.append("451 4.3.0 Try later")  # Infobip does not take it either
        relay = await start_relay(spool=spooled(spool_path))
        big = message(body=(b"y" * 998 + b"\r\n") * 200)  # 200 KB: more than the 64 KB file system holds
        reply = await send_one(relay.port, SENDER, ["a@example.org"], big)
        assert reply == "452 4.3.1 The relay cannot store the message right now (disk full?); try again later"
        assert os.listdir(spool_path / "tmp") == [] and os.listdir(spool_path / "queue") == []
        assert standin.messages == []
        small = await send_one(relay.port, SENDER, ["a@example.org"], message())  # and it still works
        assert small.startswith("250 2.6.0 ")


async def test_unwritable_spool_gets_452_unless_infobip_took_the_message(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "small") as spool_path:
        relay = await start_relay(spool=spooled(spool_path))
        filler = spool_path / "filler"
        with contextlib.suppress(OSError), open(filler, "wb") as handle:  # fill it to the last byte
            while True:
                handle.write(b"x" * 1024)
                handle.flush()
        standin.behaviour.down = True
        reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
        assert reply.startswith("452 4.3.1 ")
        assert queue_files(spool_path) == [] and standin.messages == []
        # Not on disk, but accepted by Infobip within sync_wait: that is a 250 too (nothing to lose).
        standin.behaviour.down = False
        reply = await send_one(relay.port, SENDER, ["b@example.org"], message())
        [got] = standin.messages
        assert reply == f"250 2.6.0 Message queued as {got.infobip_id}"
        assert queue_files(spool_path) == []
        filler.unlink()


async def test_a_message_that_cannot_leave_the_journal_is_kept_and_delivered(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """queue/ unusable (tmp/ is not a directory): the journal still holds the message, and the relay
    keeps it in memory and delivers it when Infobip is back."""
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.2))
    spool = Spool(tmp_path)
    spool.tmp.rmdir()
    spool.tmp.write_text("not a directory")  # as root, permissions would not stop us; this does
    standin.behaviour.down = True
    with structlog.testing.capture_logs() as logs:
        reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
        assert reply.startswith("250 2.0.0 Queued as ")
        await until(lambda: any(e["event"] == "spool_promote_failed" for e in logs))
    assert queue_files(tmp_path) == []
    standin.behaviour.down = False
    [got] = await standin.wait_for_messages(1)
    assert got.rcpt_tos == ["a@example.org"]
    await until(lambda: relay.delivery is not None and relay.delivery.queue.depth == 0)


async def test_stop_leaves_undelivered_mail_in_the_spool(standin: InfobipStandIn, tmp_path: Path) -> None:
    from tests.conftest import relay_settings

    standin.behaviour.down = True
    relay = Relay(relay_settings(standin, spool=spooled(tmp_path, sync_wait=0.0, retry_initial=60)))
    await relay.start()
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await relay.stop(grace=1)
    assert len([f for f in queue_files(tmp_path) if f.endswith(".msg")]) == 1


async def test_an_unreadable_spool_entry_is_reported_and_left_alone(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    import structlog.testing

    spool = Spool(tmp_path)
    spool.create()
    (spool.queue / "0000000000broken.msg").write_bytes(b"not json\nFrom: x\r\n\r\nbody\r\n")
    with structlog.testing.capture_logs() as logs:
        relay = await start_relay(spool=spooled(tmp_path))
        await until(lambda: any(e["event"] == "spool_loaded" for e in logs))  # queue/ is read after listening
    [event] = [e for e in logs if e["event"] == "spool_entry_unreadable"]
    assert event["queue_id"] == "0000000000broken"
    assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
    assert (spool.queue / "0000000000broken.msg").exists()  # for an engineer to look at, not deleted


async def test_delivery_attempt_logs_infobips_250_text(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    import structlog.testing

    relay = await start_relay(spool=spooled(tmp_path))
    with structlog.testing.capture_logs() as logs:
        await send_one(relay.port, SENDER, ["a@example.org"], message())
        await until(lambda: any(line["event"] == "delivery_attempt" for line in logs))
    [attempt] = [line for line in logs if line["event"] == "delivery_attempt"]
    [got] = standin.messages
    assert attempt["reply"].startswith("250 2.6.0 ") and got.infobip_id in attempt["reply"]


def test_a_dead_letters_unnoted_marker_goes_with_requeue_delete_and_delete_all_dead(tmp_path: Path) -> None:
    """The marker says a bounce's note may be missing, so a start notes it again: a requeued message is
    attempted afresh (new notes), and a deleted one gets no bounce, so neither may leave it behind."""
    from relay.core.message import Envelope, Prepared
    from relay.ops import queue_verbs
    from relay.store.spool import unnoted_ids

    spool = Spool(tmp_path / "spool")
    spool.create()

    def dead_letter(queue_id: str) -> None:
        data = message(Message_ID=f"<{queue_id}@example.com>")
        prepared = Prepared(queue_id, SENDER, ("a@example.org",), f"<{queue_id}@example.com>", b"", data)
        spool.commit(prepared, Envelope(queue_id, SENDER, ("a@example.org",), "<m>", "10.0.0.5", 1.0, len(data)))
        spool.dead_letter(queue_id, {"a@example.org": "550 5.1.1 no such user"}, "550 5.1.1", unnoted=True)
        spool.remove(queue_id)

    for queue_id in ("1a0000000000000000001", "1a0000000000000000002", "1a0000000000000000003"):
        dead_letter(queue_id)
    assert unnoted_ids(spool.dead) == ["1a0000000000000000001", "1a0000000000000000002", "1a0000000000000000003"]
    spool.requeue("1a0000000000000000001")
    assert spool.delete("1a0000000000000000002")
    assert unnoted_ids(spool.dead) == ["1a0000000000000000003"]
    assert queue_verbs.delete(spool, [], all_dead=True) == 0
    assert unnoted_ids(spool.dead) == []


async def test_the_marker_goes_only_once_every_note_of_its_dead_letter_is_on_disk(tmp_path: Path) -> None:
    """One message may die a recipient at a time, their notes in flight together: the first one on disk used
    to take the marker away while the second was still pending, and a failed second note lost its bounce."""
    from relay.delivery.unnoted import UnnotedMarks
    from relay.store.spool import UNNOTED

    loop = asyncio.get_running_loop()
    dead = tmp_path / "dead"
    dead.mkdir()
    marks = UnnotedMarks(dead)

    async def outcome(results: list[bool]) -> bool:
        (dead / f"q1{UNNOTED}").touch()
        notes = [loop.create_future() for _ in results]
        for note in notes:
            marks.expect("q1")
            marks.watch("q1", note)
        for note, result in zip(notes, results, strict=True):
            note.set_result(result)
            await asyncio.sleep(0)  # the done-callbacks run
        return (dead / f"q1{UNNOTED}").exists()

    assert await outcome([True, True]) is False  # both on disk: the marker goes
    assert await outcome([True, False]) is True  # the second was not written: kept for the next start
    assert await outcome([True]) is True  # q1 failed once: kept whatever comes later, until a start notes it
