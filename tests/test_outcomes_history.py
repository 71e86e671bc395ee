"""The SQLite history through its interface (HistoryStore): statuses, reports counted once, the bounce
outbox, lookups, pruning, and the file's mode."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import structlog.testing

from relay.outcomes.decide import Report
from relay.outcomes.history import Attempted, Change, HistoryStore, MessageReceived, Tracked
from relay.outcomes.sqlite import SqliteHistory
from relay.outcomes.store import SENDING_STALE
from relay.outcomes.trace import in_words
from relay.outcomes.writer import History
from tests.helpers import until

T0 = 1_800_000_000.0


def received(queue_id: str = "q1", *recipients: str, bulk: str | None = "relay-x-1") -> MessageReceived:
    rcpts = recipients or ("a@example.org", "b@example.org")
    return MessageReceived(
        queue_id, f"<{queue_id}@app>", "app@example.com", "10.0.0.5", T0, 100, rcpts, bulk, b"H: 1\r\n"
    )


def infobip(to: str, group: str, message_id: str = "ib1", error: str = "NO_ERROR") -> Report:
    permanent = group in ("UNDELIVERABLE", "REJECTED")
    return Report(message_id, to, group, f"{group}_X", "", error, "", permanent, "", "relay-x-1")


@pytest.fixture
def store(tmp_path: Path) -> SqliteHistory:
    return SqliteHistory(tmp_path / "history.sqlite3")


def test_the_history_file_and_its_wal_are_private(store: SqliteHistory, tmp_path: Path) -> None:
    store.write([received()], bounces_on=False)
    for name in ("history.sqlite3", "history.sqlite3-wal", "history.sqlite3-shm"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600, name


def test_an_attempt_then_reports_set_each_recipients_status_once(store: HistoryStore) -> None:
    store.write([received(), Attempted("q1", T0 + 1, 1, ("a@example.org", "b@example.org"), ("ib1",))], True)
    assert store.pending_bulk_ids(T0) == ["relay-x-1"]
    applied = store.apply_reports(
        [infobip("a@example.org", "DELIVERED"), infobip("B@EXAMPLE.ORG", "UNDELIVERABLE")], "pulled", T0 + 30, True
    )
    assert [(o.address, o.status, o.seconds, o.bounce) for o in applied.outcomes] == [
        ("a@example.org", "delivered", 29.0, False),
        ("B@EXAMPLE.ORG", "bounced", 29.0, True),
    ]
    again = store.apply_reports([infobip("b@example.org", "UNDELIVERABLE")], "pushed", T0 + 31, True)
    assert (again.outcomes, again.duplicates) == ([], 1)
    assert store.pending_bulk_ids(T0) == []
    [bounce] = store.due_bounces(T0 + 31, 10)
    assert [r.address for r in bounce.recipients] == ["B@EXAMPLE.ORG"] and bounce.headers == b"H: 1\r\n"
    assert store.due_bounces(T0 + 31, 10) == []  # handed out once


def test_an_attempt_in_the_batch_of_its_message_or_a_later_one_or_a_message_noted_twice_reads_the_same(
    store: HistoryStore,
) -> None:
    taken = ("b@example.org", "a@example.org")
    deferred = {"a@example.org": "451 4.3.0 later", "b@example.org": "451 4.3.0 later"}
    store.write([received("q1"), Attempted("q1", T0 + 1, 1, deferred=deferred)], True)
    store.write([received("q1"), Attempted("q1", T0 + 2, 2, taken, ("ib1",))], True)  # noted again, say
    store.write([received("q2"), Attempted("q2", T0 + 2, 1, taken, ("ib2",))], True)
    store.write([received("q3")], True)
    store.write([Attempted("q3", T0 + 2, 1, taken, ("ib3",))], True)
    for queue_id, ib in (("q1", "ib1"), ("q2", "ib2"), ("q3", "ib3")):
        [trace] = store.lookup(queue_id, 5)
        assert [(r.address, r.status, r.infobip_id, r.detail, r.at) for r in trace.recipients] == [
            (rcpt, "sent", ib, f"Infobip took it as {ib}", T0 + 2) for rcpt in ("a@example.org", "b@example.org")
        ]
    assert store.pending_bulk_ids(T0 + 2) == ["relay-x-1"]


def test_a_batch_of_any_size_with_an_address_twice_is_written_whole(store: HistoryStore) -> None:
    """A batch goes in as a few multi-row INSERTs (2**k rows each): 300 messages, each taken at once, and one
    message to the same address in two cases (one row: PostgreSQL refuses an upsert that meets a row twice)."""
    batch: list[Change] = []
    for i in range(300):
        batch += [
            received(f"q{i:03}", "a@example.org"),
            Attempted(f"q{i:03}", T0 + 1, 1, ("a@example.org",), (f"ib{i}",)),
        ]
    batch.append(received("q-twice", "Ann@example.org", "ann@example.org"))
    batch.append(Attempted("q-twice", T0 + 2, 1, ("ann@example.org",), ("ib-twice",)))
    store.write(batch, False)
    assert [(r.status, r.infobip_id) for r in store.lookup("q299", 5)[0].recipients] == [("sent", "ib299")]
    assert len(store.lookup("a@example.org", 500)) == 300
    [twice] = store.lookup("q-twice", 5)  # as one upsert a row would: the first spelling, the status Infobip gave
    assert [(r.address, r.status, r.infobip_id) for r in twice.recipients] == [("Ann@example.org", "sent", "ib-twice")]


def test_a_first_attempt_taken_whole_is_told_by_trace_without_a_row_of_its_own(
    store: SqliteHistory, tmp_path: Path
) -> None:
    taken = ("b@example.org", "a@example.org")
    store.write([received("q1"), Attempted("q1", T0 + 1, 1, taken, ("ib1",))], True)  # the usual case
    store.write([received("q2"), Attempted("q2", T0 + 1, 1, taken[:1], ("ib2",), {"a@example.org": "451 later"})], True)
    store.write([Attempted("q2", T0 + 9, 2, taken[1:], ("ib3",))], True)
    stored = sqlite3.connect(tmp_path / "history.sqlite3").execute(
        "SELECT queue_id, count(*) FROM events WHERE kind = 'attempt' GROUP BY queue_id"
    )
    assert dict(stored.fetchall()) == {"q2": 2}
    attempts = {
        q: [(e.at, e.detail) for e in store.lookup(q, 1)[0].events if e.kind == "attempt"] for q in ("q1", "q2")
    }
    assert attempts == {
        "q1": [(T0 + 1, "attempt 1: Infobip took 2 recipient(s) as ib1")],
        "q2": [
            (T0 + 1, "attempt 1: Infobip took 1 recipient(s) as ib2; 1 deferred (451 later)"),
            (T0 + 9, "attempt 2: Infobip took 1 recipient(s) as ib3"),
        ],
    }


def test_pending_and_unknown_reports_change_nothing(store: HistoryStore) -> None:
    store.write([received(), Attempted("q1", T0 + 1, 1, ("a@example.org",), ("ib1",))], True)
    applied = store.apply_reports(
        [
            infobip("a@example.org", "PENDING"),
            infobip("a@example.org", "DELIVERED", "someone-elses"),
            infobip("stranger@example.org", "DELIVERED"),  # our id, not our recipient
            infobip("stranger@example.org", "PENDING"),
        ],
        "pulled",
        T0,
        True,
    )
    assert (applied.pending, applied.unknown, applied.outcomes) == (1, 3, [])
    [trace] = store.lookup("q1", 5)
    assert trace.recipients[0].status == "sent"


def test_recipients_of_one_message_share_one_bounce_until_it_is_handed_out(store: HistoryStore) -> None:
    store.write([received(), Attempted("q1", T0, 1, ("a@example.org", "b@example.org"), ("ib1",))], True)
    store.apply_reports([infobip("a@example.org", "UNDELIVERABLE")], "pulled", T0 + 1, True)
    store.apply_reports([infobip("b@example.org", "REJECTED")], "pulled", T0 + 2, True)
    [bounce] = store.due_bounces(T0 + 2, 10)
    assert [r.address for r in bounce.recipients] == ["a@example.org", "b@example.org"]


def test_dead_after_250_queues_a_bounce_and_handed_back_does_not(store: HistoryStore) -> None:
    dead = {"a@example.org": ("failed", "550 5.1.1 No such user")}
    store.write([received("q1"), Attempted("q1", T0, 1, dead=dead, bounce=True)], True)
    store.write([received("q2"), Attempted("q2", T0, 1, dead=dead, bounce=False)], True)
    [bounce] = store.due_bounces(T0, 10)
    assert bounce.queue_id == "q1" and bounce.recipients[0].dsn_status == "5.1.1"
    assert [t.recipients[0].status for t in store.lookup("a@example.org", 5)] == ["failed", "failed"]


def test_a_failed_bounce_comes_back_when_due_and_a_sent_one_never(store: HistoryStore) -> None:
    store.write([received(), Attempted("q1", T0, 1, dead={"a@example.org": ("failed", "550 x")}, bounce=True)], True)
    [bounce] = store.due_bounces(T0, 10)
    store.bounce_retry(bounce.bounce_id, T0 + 30, "connection refused")
    assert store.due_bounces(T0 + 29, 10) == []
    [again] = store.due_bounces(T0 + 30, 10)
    assert again.attempts == 1
    store.bounce_done(again.bounce_id, T0 + 31, "sent", "250 ok")
    assert store.due_bounces(T0 + 10_000, 10) == []


def test_an_outcome_recorded_under_a_stale_claim_changes_nothing(store: HistoryStore) -> None:
    """A sender whose claim went stale (it could not record for SENDING_STALE) must not undo what the sender
    that took the bounce over recorded: each outcome counts only under the claim it was handed out with."""
    store.write([received(), Attempted("q1", T0, 1, dead={"a@example.org": ("failed", "550 x")}, bounce=True)], True)
    [first] = store.due_bounces(T0, 10)
    [second] = store.due_bounces(T0 + SENDING_STALE + 1, 10)  # stale: offered again, and taken
    assert first.bounce_id == second.bounce_id and first.claimed_at != second.claimed_at
    assert store.bounce_done(second.bounce_id, T0 + 700, "sent", "250 ok", second.claimed_at)
    assert not store.bounce_retry(first.bounce_id, T0 + 800, "451 later", first.claimed_at)  # the first, recovered
    assert not store.bounce_done(first.bounce_id, T0 + 800, "dropped", "gave up", first.claimed_at)
    assert store.due_bounces(T0 + 10_000, 10) == []  # still sent: not offered again
    [trace] = store.lookup("q1", 5)
    assert [line.split("bounce")[-1].strip() for line in in_words(trace).splitlines() if " bounce   " in line] == [
        "a@example.org: failed report sent: 250 ok"
    ]


def test_a_text_utf8_cannot_carry_is_stored_with_question_marks(store: HistoryStore) -> None:
    """A server's reply in another charset comes decoded with surrogateescape: stored, not refused for ever."""
    store.write([received(), Attempted("q1", T0, 1, dead={"a@example.org": ("failed", "550 x")}, bounce=True)], True)
    [bounce] = store.due_bounces(T0, 10)
    store.bounce_retry(bounce.bounce_id, T0 + 30, "451 Gr\udcfc\udcdfe", bounce.claimed_at)
    [again] = store.due_bounces(T0 + 30, 10)
    assert again.attempts == 1


def test_a_bounce_being_sent_at_a_crash_is_offered_again(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    first = SqliteHistory(path)
    first.write([received(), Attempted("q1", T0, 1, dead={"a@example.org": ("failed", "550 x")}, bounce=True)], True)
    assert len(first.due_bounces(T0, 10)) == 1  # now 'sending'; the process dies here
    first.db.close()
    assert len(SqliteHistory(path).due_bounces(T0, 10)) == 1


def test_delay_warnings_once_per_message(store: HistoryStore) -> None:
    store.write([received("q1"), Attempted("q1", T0 + 5, 1, deferred={"a@example.org": "451 4.3.0 later"})], True)
    assert store.delayed(T0 + 1, T0 + 3600) == 1
    assert store.delayed(T0 + 1, T0 + 7200) == 0
    [warning] = store.due_bounces(T0 + 3600, 10)
    assert warning.action == "delayed" and {r.address for r in warning.recipients} == {"a@example.org", "b@example.org"}


def test_prune_forgets_old_messages_but_keeps_those_with_a_bounce_to_send(store: HistoryStore) -> None:
    dead = {"a@example.org": ("failed", "550 x")}
    store.write([received("q1"), received("q2"), Attempted("q2", T0, 1, dead=dead, bounce=True)], True)
    assert store.prune(T0 + 1) == 1
    assert [t.queue_id for t in store.lookup("a@example.org", 5)] == ["q2"]


def test_tracking_events_are_recorded_once_per_event_id_and_only_for_our_recipients(store: HistoryStore) -> None:
    store.write([received(), Attempted("q1", T0 + 1, 1, ("a@example.org", "b@example.org"), ("ib1",))], True)
    events = [
        Tracked("e1", "ib1", "A@example.org", "OPENED", T0 + 60, ""),
        Tracked("e2", "ib1", "b@example.org", "CLICKED", T0 + 61, "https://example.com/inv"),
        Tracked("e1", "ib1", "a@example.org", "OPENED", T0 + 62, ""),  # the same event pushed again
        Tracked("e3", "someone-elses", "a@example.org", "OPENED", T0 + 63, ""),
        Tracked("e4", "ib1", "c@example.org", "OPENED", T0 + 64, ""),  # not a recipient of ib1
        Tracked("e5", "ib1", "b@example.org", "LATE_BOUNCE", T0 + 65, ""),
    ]
    assert store.record_tracking(events) == 3
    assert store.record_tracking(events[:2]) == 0  # a replayed push
    [trace] = store.lookup("ib1", 5)
    assert [(e.address, e.detail) for e in trace.events if e.kind == "tracking"] == [
        ("A@example.org", "OPENED"),
        ("b@example.org", "CLICKED https://example.com/inv"),
        ("b@example.org", "LATE_BOUNCE"),
    ]
    assert [r.status for r in trace.recipients] == ["sent", "sent"]  # an event is not a status
    assert store.due_bounces(T0 + 100, 10) == []  # a late bounce is recorded, never turned into a bounce
    assert "tracking b@example.org: CLICKED https://example.com/inv" in in_words(trace)
    assert store.lookup("c@example.org", 5) == []  # nothing stored for what did not match


def test_meta_keeps_the_first_value(store: HistoryStore) -> None:
    assert store.meta("instance", "abc") == "abc"
    assert store.meta("instance", "def") == "abc"


def test_sqlite_failures_that_may_pass_are_told_from_those_that_never_will(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "h.sqlite3")
    other = sqlite3.connect(tmp_path / "h.sqlite3", isolation_level=None, timeout=0)
    store.db.execute("BEGIN EXCLUSIVE")  # the file is locked
    with pytest.raises(sqlite3.Error) as busy:
        other.execute("BEGIN IMMEDIATE")
    store.db.execute("ROLLBACK")
    store.db.execute("PRAGMA query_only = 1")  # a read-only file: an operator's fix, not a wait, makes it pass
    with pytest.raises(sqlite3.Error) as readonly:
        store.write([received("q1")], False)
    with pytest.raises(sqlite3.Error) as refused:
        other.execute("SELECT nonsense FROM messages")
    with pytest.raises(sqlite3.Error) as module:  # raised by Python's sqlite3 itself: no result code
        other.execute("SELECT ?", (1, 2))
    assert [store.passing(e.value) for e in (busy, readonly, refused, module)] == [True, False, False, False]
    assert not store.passing(ValueError("a value the store cannot take"))
    other.close()
    store.close()


def test_a_message_noted_again_gets_the_recipients_the_history_has_no_row_for(store: HistoryStore) -> None:
    """A dead letter noted again at start names b@, whose first note was lost, while another note of the
    message (c@'s, resumed by the lane) reached the history first: b@ used to be dropped with the known
    message, so its failure changed nothing and no bounce was queued."""
    store.write([received("q1", "c@example.org")], True)
    again = dataclasses.replace(received("q1", "b@example.org", "c@example.org"), resumed=True)
    dead = Attempted("q1", T0 + 5, 2, dead={"b@example.org": ("failed", "550 5.1.1 unknown")}, bounce=True)
    store.write([again, dead], True)
    [trace] = store.lookup("q1", 5)
    assert {r.address: r.status for r in trace.recipients} == {"c@example.org": "queued", "b@example.org": "failed"}
    assert [[r.address for r in b.recipients] for b in store.due_bounces(T0 + 60, 10)] == [["b@example.org"]]
    store.write([again], True)  # noted once more: nothing changes
    assert len(store.lookup("q1", 5)[0].recipients) == 2


FULL_DISK = """
import os, resource, signal, sys
from pathlib import Path
from relay.outcomes.history import MessageReceived
from relay.outcomes.sqlite import SqliteHistory

def batch(n, start):
    return [MessageReceived(f"q{start + i}", f"<m{start + i}@x>", "a@example.com", "10.0.0.5", 1.0, 10,
                            ("b@example.org",), None, os.urandom(3000)) for i in range(n)]

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as on a full disk
directory = Path(sys.argv[1])
store = SqliteHistory(directory / "h.sqlite3")
store.write(batch(10, 0), True)
size = sum(f.stat().st_size for f in directory.iterdir())
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 200_000, resource.RLIM_INFINITY))
try:
    store.write(batch(2000, 100), True)  # more than the page cache: SQLite rolls the transaction back itself
except Exception as exc:
    print(type(exc).__name__, exc, store.passing(exc))
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
store.write(batch(1, 9999), True)
print(len(store.lookup("q9999", 5)))
"""


def test_a_full_disk_mid_transaction_is_a_failure_that_may_pass(tmp_path: Path) -> None:
    """SQLite rolled back already: the ROLLBACK that follows fails, and used to hide the real error (so a full
    disk dropped the batch, bounces and all, instead of trying it again). The next write goes through."""
    run = subprocess.run([sys.executable, "-c", FULL_DISK, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == ["OperationalError disk I/O error True", "1"]


async def test_a_note_the_store_cannot_take_is_dropped_and_the_writer_lives_on(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "h.sqlite3")
    history = History(store, bounces_on=True, on_error=lambda: None)
    history.start()
    bad = MessageReceived(
        "q-bad", "<m@app>", "app@example.com", "10.0.0.5", T0, object(), ("a@example.org",), None, None
    )  # type: ignore[arg-type]
    async with asyncio.timeout(5):  # a writer that died would never answer
        assert await history.note(bad) is False  # sqlite3's own ProgrammingError: no result code to read
    assert await history.note(received("q1"))
    assert [t.queue_id for t in await history.call(store.lookup, "q1", 5)] == ["q1"]
    await history.close()


async def test_a_stop_tries_a_failing_write_again_at_once(tmp_path: Path) -> None:
    """A write waiting out its backoff when the relay stops is tried again at once (the history may be back),
    not after the backoff, which may be longer than the stop waits."""
    store = SqliteHistory(tmp_path / "h.sqlite3", timeout=0.05)
    failures: list[int] = []
    history = History(store, bounces_on=True, on_error=lambda: failures.append(1))
    history.start()
    lock = sqlite3.connect(tmp_path / "h.sqlite3", isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    history.note(received("q1"))
    await until(lambda: len(failures) >= 4)  # waits of 0.25, 0.5 and 1 s behind it: the next is 2 s
    lock.execute("ROLLBACK")
    lock.close()
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        await history.close()
        assert time.monotonic() - started < 1.5
    assert not any(e["event"] == "history_notes_lost" for e in logs)
    reopened = SqliteHistory(tmp_path / "h.sqlite3")
    assert [t.queue_id for t in reopened.lookup("q1", 5)] == ["q1"]
    reopened.close()


async def test_writes_are_batched_in_order_and_a_failed_write_is_reported(tmp_path: Path) -> None:
    errors: list[int] = []
    store = SqliteHistory(tmp_path / "h.sqlite3")
    history = History(store, bounces_on=True, on_error=lambda: errors.append(1))
    history.start()
    notes = [history.note(received(f"q{i}")) for i in range(50)]
    notes.append(history.note(Attempted("q49", T0, 1, ("a@example.org",), ("ib49",))))
    assert await notes[-1] and all(n.done() for n in notes)
    [trace] = await history.call(store.lookup, "ib49", 5)
    assert trace.queue_id == "q49"
    store.db.execute("PRAGMA query_only = 1")  # every write fails from now on
    assert await history.note(received("q-late")) is False and errors == [1]
    await history.close()
    assert asyncio.get_running_loop().is_running()
