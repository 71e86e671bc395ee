"""The message history's sensitive columns sealed with the spool's keys (issue 15, item 1): no marker written
through the history is in any byte of the database's files (SQLite's file and WAL; PostgreSQL's data
directory), every kind of lookup still finds it, a wrong key is named, a moved or flipped value is refused,
and after a rotation the old key still reads (and `rekey` leaves nothing under it)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from relay.config import Settings
from relay.core.keys import key_id
from relay.outcomes.decide import Report
from relay.outcomes.history import Attempted, HistoryStore, MessageReceived, Tracked
from relay.outcomes.postgres import PostgresHistory
from relay.outcomes.sqlite import SqliteHistory
from relay.outcomes.store import SqlHistory
from relay.outcomes.trace import trace_command
from relay.store.sealing import MissingKeyError, SealError
from tests.cluster_services import PostgresServer, postgres_server
from tests.test_outcomes_history import T0

__all__ = ["postgres_server"]

MARK = "zq7phi"  # in every sensitive value below; nowhere else
SENDER = f"{MARK}.sender@clinic.example"
RCPT = f"{MARK}.patient@example.org"
OTHER = f"{MARK}.other@example.org"
MESSAGE_ID = f"<appt-{MARK}-dob-1970-01-01@clinic.example>"
CLIENT = "10.77.66.55"
K1, K2 = b"1" * 32, b"2" * 32

Open = Callable[..., SqlHistory]
Raw = Callable[[str, tuple[Any, ...]], list[Any]]  # SQL on a connection of its own, as an attacker would


def sqlite_raw(path: Path) -> Raw:
    def raw(sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with contextlib.closing(sqlite3.connect(path)) as db, db:
            return db.execute(sql, args).fetchall()

    return raw


def postgres_raw(url: str) -> Raw:
    def raw(sql: str, args: tuple[Any, ...] = ()) -> list[Any]:
        with psycopg.connect(url) as db:
            cursor = db.execute(sql.replace("?", "%s"), args)
            return cursor.fetchall() if cursor.description else []

    return raw


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.slow)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Open, list[Path], Raw]:
    """How to open the history with given keys, the files its bytes live in, and raw SQL on it."""
    if request.param == "sqlite":
        path = tmp_path / "history.sqlite3"
        return (lambda *keys: SqliteHistory(path, keys)), [path, path.with_name(path.name + "-wal")], sqlite_raw(path)
    server: PostgresServer = request.getfixturevalue("postgres_server")
    url = server.database()
    return (lambda *keys: PostgresHistory(url, keys)), [server.directory / "data"], postgres_raw(url)


def written(store: HistoryStore) -> None:
    """A message through every path that stores text: received, deferred, taken, reported, bounced, tracked."""
    headers = f"From: <{SENDER}>\r\nSubject: results for {MARK}\r\n".encode()
    received = MessageReceived("q1", MESSAGE_ID, SENDER, CLIENT, T0, 100, (RCPT, OTHER), "relay-x-1", headers)
    dead = {OTHER: ("failed", f"550 5.1.1 <{OTHER}>: no such user")}
    store.write([received, Attempted("q1", T0 + 1, 1, deferred={RCPT: f"451 4.2.0 <{RCPT}> later"})], True)
    store.write([Attempted("q1", T0 + 2, 2, (RCPT,), ("ib1",), dead=dead, bounce=True)], True)
    report = Report(
        "ib1", RCPT, "UNDELIVERABLE", "UNDELIVERABLE_NOT_DELIVERED", "", "EC_MAILBOX_FULL", f"mailbox of {RCPT} full",
        True, "", "relay-x-1",
    )  # fmt: skip
    store.apply_reports([report], "pulled", T0 + 3, True)
    store.record_tracking([Tracked("e1", "ib1", RCPT, "CLICKED", T0 + 4, f"https://clinic.example/{MARK}")])
    [bounce] = store.due_bounces(T0 + 5, 10)
    store.bounce_retry(bounce.bounce_id, T0 + 6, f"451 4.3.0 <{SENDER}> mailbox busy")


def every_byte(files: list[Path]) -> bytes:
    found = [p for f in files for p in ([f] if f.is_file() else sorted(f.rglob("*"))) if p.is_file()]
    return b"".join(p.read_bytes() for p in found)


def test_no_marker_is_in_any_byte_of_the_history_and_every_lookup_still_finds_it(
    engine: tuple[Open, list[Path], Raw],
) -> None:
    opened, files, raw = engine
    store = opened(K1)
    written(store)
    if isinstance(store, PostgresHistory):
        raw("CHECKPOINT", ())  # the tables' pages on disk, not only in the WAL
    data = every_byte(files)
    assert len(data) > 4096
    for secret in (MARK, MARK.upper(), CLIENT, "EC_MAILBOX_FULL", "no such user", "clinic.example"):
        assert secret.encode() not in data, secret
    for query in ("q1", "ib1", MESSAGE_ID, MESSAGE_ID[1:-1], RCPT.upper(), OTHER):
        [trace] = store.lookup(query, 5)
        assert (trace.queue_id, trace.message_id, trace.sender, trace.client_ip) == ("q1", MESSAGE_ID, SENDER, CLIENT)
    words = json.dumps([e.detail for e in trace.events] + [r.detail for r in trace.recipients])
    for shown in ("no such user", f"mailbox of {RCPT} full", f"https://clinic.example/{MARK}", "4.2.0"):
        assert shown in words, shown
    [again] = store.due_bounces(T0 + 6, 10)
    assert again.headers.startswith(f"From: <{SENDER}>".encode()) and again.sender == SENDER
    assert {(r.address, r.diagnostic) for r in again.recipients} >= {(OTHER, f"550 5.1.1 <{OTHER}>: no such user")}
    store.close()


def test_a_wrong_or_missing_key_is_named_and_a_moved_or_flipped_value_is_refused(
    engine: tuple[Open, list[Path], Raw],
) -> None:
    opened, _, raw = engine
    store = opened(K1)
    written(store)
    store.close()
    for keys in ((K2,), ()):
        with pytest.raises(MissingKeyError, match=f"key id {key_id(K1)}"):
            opened(*keys)
    store = opened(K1)
    raw("UPDATE recipients SET detail = (SELECT sender FROM messages WHERE queue_id = 'q1')", ())  # moved
    with pytest.raises(SealError, match=r"recipients\.detail of q1: authentication failed"):
        store.lookup("q1", 5)
    [[sender]] = raw("SELECT sender FROM messages", ())
    flipped = bytes(sender[:-1]) + bytes([sender[-1] ^ 1])
    raw("UPDATE messages SET sender = ?", (flipped,))
    with pytest.raises(SealError, match="authentication failed"):
        store.due_bounces(T0 + 100, 10)
    store.close()


def test_after_a_rotation_the_old_key_reads_and_rekey_leaves_nothing_under_it(
    engine: tuple[Open, list[Path], Raw],
) -> None:
    opened, _, _ = engine
    plain = opened()  # written before encryption was turned on
    plain.write([MessageReceived("q0", "<q0@app>", SENDER, CLIENT, T0 - 1, 10, (OTHER,), None, None)], False)
    plain.close()
    old = opened(K1)
    written(old)
    old.close()
    rotated = opened(K2, K1)
    rotated.write([MessageReceived("q2", "<q2@app>", SENDER, CLIENT, T0 + 10, 10, (RCPT,), None, None)], False)
    rotated.write([Attempted("q1", T0 + 11, 3, (RCPT,), ("ib1",))], False)  # found by its old search key
    assert [t.queue_id for t in rotated.lookup(RCPT, 5)] == ["q2", "q1"]
    assert [t.queue_id for t in rotated.lookup(OTHER, 5)] == ["q1", "q0"]
    assert rotated.lookup(MESSAGE_ID, 5)[0].queue_id == "q1"
    assert rotated.rekey() > 0 and rotated.rekey() == 0
    rotated.close()
    new = opened(K2)  # the old key has left old_key_files
    assert [t.queue_id for t in new.lookup(RCPT.upper(), 5)] == ["q2", "q1"]
    assert [t.queue_id for t in new.lookup("<q0@app>", 5)] == ["q0"]
    assert new.lookup(MESSAGE_ID, 5)[0].sender == SENDER
    new.close()


def test_a_message_noted_again_after_a_rotation_keeps_its_rows(engine: tuple[Open, list[Path], Raw]) -> None:
    """A relay restarted with a new key notes a recovered message again (Outcomes.resumed): its recipients,
    stored under the old key's search keys, are neither doubled nor left behind by the attempt."""
    opened, _, raw = engine
    old = opened(K1)
    old.write([MessageReceived("q1", MESSAGE_ID, SENDER, CLIENT, T0, 10, (RCPT, OTHER), None, None)], False)
    old.close()
    rotated = opened(K2, K1)
    again = MessageReceived("q1", MESSAGE_ID, SENDER, CLIENT, T0, 10, (RCPT, OTHER), None, None, resumed=True)
    rotated.write([again, Attempted("q1", T0 + 5, 1, (RCPT, OTHER), ("ib1",))], False)
    [trace] = rotated.lookup("q1", 5)
    assert [(r.address, r.status) for r in trace.recipients] == [(RCPT, "sent"), (OTHER, "sent")]
    assert raw("SELECT count(*) FROM recipients WHERE queue_id = 'q1'", ())[0][0] == 2
    rotated.close()


def test_relay_trace_names_the_missing_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = SqliteHistory(tmp_path / "history.sqlite3", [K1])
    written(store)
    store.close()
    settings = Settings.model_validate({"spool": {"path": str(tmp_path)}})
    assert trace_command(settings, "q1", as_lines=True) == 1
    assert f"key id {key_id(K1)}" in capsys.readouterr().err


def test_a_value_of_another_kind_is_reported_as_damaged(tmp_path: Path) -> None:
    store = SqliteHistory(tmp_path / "history.sqlite3", [K1])
    written(store)
    sqlite_raw(tmp_path / "history.sqlite3")("UPDATE messages SET client_ip = x'00'", ())
    with pytest.raises(SealError, match="neither plain nor sealed"):
        store.lookup("q1", 5)
    store.close()
    with sqlite3.connect(tmp_path / "history.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM messages").fetchone() == (1,)
