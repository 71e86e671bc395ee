"""A history an older relay wrote (layout 1: plain columns, searched by value) is converted in place when the
relay opens it, on SQLite and on PostgreSQL: every message, status, event and waiting bounce is still there and
found by every kind of lookup, a bounce the old relay had claimed is offered again, meta is kept, and with a
spool key nothing of it is left in the clear. A history of an unknown layout is refused and left as it is."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

import relay.outcomes.migrate
from relay.outcomes.postgres import SENDING_STALE, PostgresHistory
from relay.outcomes.sqlite import SqliteHistory
from relay.outcomes.store import HistoryLayoutError
from tests.cluster_services import PostgresServer, postgres_server
from tests.test_outcomes_history import T0
from tests.test_outcomes_sealed import K1, Open, Raw, engine, postgres_raw

__all__ = ["engine", "postgres_server"]

MARK = "mz4old"
SENDER = f"{MARK}.billing@erp.example"
MESSAGE_ID = f"<inv-{MARK}@erp.example>"
DELIVERED, BOUNCED, SENT = (f"{MARK}.{n}@example.org" for n in ("delivered", "bounced", "sent"))

# relay/outcomes/sqlite.py and postgres.py at c9e3c57, the last relay that wrote layout 1
V1_SQLITE = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY, message_id TEXT NOT NULL, sender TEXT NOT NULL, client_ip TEXT NOT NULL,
    received_at REAL NOT NULL, size INTEGER NOT NULL, bulk_id TEXT, headers BLOB, warned INTEGER DEFAULT 0);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_received_at ON messages(received_at);
CREATE TABLE IF NOT EXISTS recipients (
    queue_id TEXT NOT NULL, address TEXT NOT NULL COLLATE NOCASE, status TEXT NOT NULL, infobip_id TEXT,
    detail TEXT NOT NULL DEFAULT '', at REAL NOT NULL, accepted_at REAL,
    PRIMARY KEY (queue_id, address));
CREATE INDEX IF NOT EXISTS recipients_address ON recipients(address);
CREATE INDEX IF NOT EXISTS recipients_waiting ON recipients(accepted_at) WHERE status = 'sent';
CREATE INDEX IF NOT EXISTS recipients_queued ON recipients(queue_id) WHERE status = 'queued';
CREATE TABLE IF NOT EXISTS infobip_ids (infobip_id TEXT PRIMARY KEY, queue_id TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    queue_id TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL, address TEXT, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id);
CREATE TABLE IF NOT EXISTS bounces (
    id INTEGER PRIMARY KEY, queue_id TEXT NOT NULL, action TEXT NOT NULL, recipients TEXT NOT NULL,
    created_at REAL NOT NULL, due REAL NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    state TEXT NOT NULL DEFAULT 'pending', last_error TEXT NOT NULL DEFAULT '', done_at REAL);
CREATE INDEX IF NOT EXISTS bounces_due ON bounces(state, due);
"""


V1_POSTGRES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS messages (
    queue_id TEXT PRIMARY KEY, message_id TEXT NOT NULL, sender TEXT NOT NULL, client_ip TEXT NOT NULL,
    received_at DOUBLE PRECISION NOT NULL, size BIGINT NOT NULL, bulk_id TEXT, headers BYTEA,
    warned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX IF NOT EXISTS messages_message_id ON messages(message_id);
CREATE INDEX IF NOT EXISTS messages_received_at ON messages(received_at);
CREATE TABLE IF NOT EXISTS recipients (
    seq BIGINT GENERATED ALWAYS AS IDENTITY, queue_id TEXT NOT NULL, address TEXT NOT NULL, status TEXT NOT NULL,
    infobip_id TEXT, detail TEXT NOT NULL DEFAULT '', at DOUBLE PRECISION NOT NULL, accepted_at DOUBLE PRECISION);
CREATE UNIQUE INDEX IF NOT EXISTS recipients_key ON recipients(queue_id, lower(address));
CREATE INDEX IF NOT EXISTS recipients_address ON recipients(lower(address));
CREATE INDEX IF NOT EXISTS recipients_waiting ON recipients(accepted_at) WHERE status = 'sent';
CREATE INDEX IF NOT EXISTS recipients_queued ON recipients(queue_id) WHERE status = 'queued';
CREATE TABLE IF NOT EXISTS infobip_ids (infobip_id TEXT PRIMARY KEY, queue_id TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS infobip_ids_queue_id ON infobip_ids(queue_id);
CREATE TABLE IF NOT EXISTS events (
    seq BIGINT GENERATED ALWAYS AS IDENTITY, queue_id TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
    kind TEXT NOT NULL, address TEXT, detail TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_queue_id ON events(queue_id);
CREATE TABLE IF NOT EXISTS bounces (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, queue_id TEXT NOT NULL, action TEXT NOT NULL,
    recipients TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, due DOUBLE PRECISION NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'pending', last_error TEXT NOT NULL DEFAULT '',
    done_at DOUBLE PRECISION, claimed_at DOUBLE PRECISION);
CREATE INDEX IF NOT EXISTS bounces_due ON bounces(state, due);
CREATE INDEX IF NOT EXISTS bounces_queue_id ON bounces(queue_id);
CREATE TABLE IF NOT EXISTS poller (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires DOUBLE PRECISION NOT NULL);
"""


def write_layout_1(raw: Raw, postgres: bool) -> None:
    """What the relay at c9e3c57 left: one message, three recipients (delivered, bounced, still sent), its
    events, a bounce it had claimed when it stopped, and its instance id in meta."""
    for statement in (V1_POSTGRES if postgres else V1_SQLITE).split(";"):
        if statement.strip():
            raw(statement, ())
    raw("INSERT INTO meta VALUES ('instance', 'old-instance')", ())
    raw(
        "INSERT INTO messages (queue_id, message_id, sender, client_ip, received_at, size, bulk_id, headers) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        ("q1", MESSAGE_ID, SENDER, "10.0.0.5", T0, 100, "relay-x-1", f"Subject: {MARK}\r\n".encode()),
    )
    for address, status, detail, at in (
        (DELIVERED, "delivered", "Delivered to the mailbox", T0 + 30),
        (BOUNCED, "bounced", f"UNDELIVERABLE: no mailbox {BOUNCED}", T0 + 30),
        (SENT, "sent", "", T0 + 1),
    ):
        raw(
            "INSERT INTO recipients (queue_id, address, status, infobip_id, detail, at, accepted_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            ("q1", address, status, "ib1", detail, at, T0 + 1),
        )
    raw("INSERT INTO infobip_ids VALUES ('ib1', 'q1')", ())
    raw(
        "INSERT INTO events (queue_id, at, kind, address, detail) VALUES ('q1', ?, 'attempt', NULL, ?)",
        (T0 + 1, "attempt 1: taken"),
    )
    raw(
        "INSERT INTO events (queue_id, at, kind, address, detail) VALUES ('q1', ?, 'report', ?, ?)",
        (T0 + 30, BOUNCED, f"bounced {MARK}"),
    )
    item = {
        "address": BOUNCED,
        "status": "bounced",
        "dsn": "5.1.1",
        "diagnostic": f"no mailbox {MARK}",
        "infobip_id": "ib1",
    }
    if postgres:  # claimed by a replica when the old relay stopped (PostgreSQL's layout 1 says when)
        raw(
            "INSERT INTO bounces (queue_id, action, recipients, created_at, due, state, claimed_at) "
            "VALUES ('q1', 'failed', ?, ?, ?, 'sending', ?)",
            (json.dumps([item]), T0 + 30, T0 + 30, T0 + 30),
        )
        raw("INSERT INTO poller VALUES ('reports', 'old-replica', ?)", (T0 + 3600,))
    else:
        raw(
            "INSERT INTO bounces (queue_id, action, recipients, created_at, due, state) "
            "VALUES ('q1', 'failed', ?, ?, ?, 'sending')",
            (json.dumps([item]), T0 + 30, T0 + 30),
        )


@pytest.mark.parametrize("keys", [(), (K1,)], ids=["plain", "sealed"])
def test_an_older_relays_history_is_converted_and_nothing_is_lost(
    engine: tuple[Open, list[Path], Raw],
    keys: tuple[bytes, ...],
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(relay.outcomes.migrate, "BATCH", 1)  # every table read a row at a time, in order
    open_store, files, raw = engine
    postgres = "postgres" in request.node.callspec.id
    write_layout_1(raw, postgres)
    if not postgres:
        assert MARK.encode() in files[0].read_bytes()  # in the clear, as the old relay wrote it
    store = open_store(*keys)
    try:
        for query in ("q1", "ib1", MESSAGE_ID, BOUNCED.upper()):
            [trace] = store.lookup(query, 5)
            assert (trace.queue_id, trace.message_id, trace.sender) == ("q1", MESSAGE_ID, SENDER), query
        assert [(r.address, r.status, r.detail) for r in trace.recipients] == [
            (DELIVERED, "delivered", "Delivered to the mailbox"),
            (BOUNCED, "bounced", f"UNDELIVERABLE: no mailbox {BOUNCED}"),
            (SENT, "sent", "Infobip took it as ib1"),
        ]
        assert [(e.kind, e.address, e.detail) for e in trace.events][-2:] == [
            ("attempt", None, "attempt 1: taken"),
            ("report", BOUNCED, f"bounced {MARK}"),
        ]
        assert store.pending_bulk_ids(T0) == ["relay-x-1"]  # SENT still waits for its report
        # Claimed when the old relay stopped: on PostgreSQL the claim stands until stale (another replica may be
        # sending it), SQLite's one relay gives it back at once.
        if postgres:
            assert store.due_bounces(T0 + 31, 10) == []
        [bounce] = store.due_bounces(T0 + 31 + (SENDING_STALE if postgres else 0), 10)
        assert (bounce.sender, bounce.message_id, bounce.headers) == (
            SENDER,
            MESSAGE_ID,
            f"Subject: {MARK}\r\n".encode(),
        )
        assert [(r.address, r.dsn_status, r.diagnostic) for r in bounce.recipients] == [
            (BOUNCED, "5.1.1", f"no mailbox {MARK}")
        ]
        assert store.meta("instance", "new-instance") == "old-instance"  # the same bulk ids as before
        if postgres:  # the old lease is gone: an old replica still running cannot poll reports it cannot store
            assert raw("SELECT to_regclass('poller')", ()) == [(None,)]
            assert isinstance(store, PostgresHistory) and store.poll_lease("new-replica", 60)
    finally:
        store.close()
    again = open_store(*keys)  # converted once: the second start finds layout 2
    try:
        assert [t.queue_id for t in again.lookup(DELIVERED, 5)] == ["q1"]
    finally:
        again.close()
    if keys and not postgres:  # the old plaintext is not left in free pages of the file, nor in its WAL
        found = b"".join(p.read_bytes() for p in files if p.exists())
        assert MARK.encode() not in found


def test_a_history_of_an_unknown_layout_is_refused_and_left_as_it_is(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    with sqlite3.connect(path) as newer:  # a later relay's
        newer.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        newer.execute("INSERT INTO meta VALUES ('schema', '3')")
    for readonly in (False, True):
        with pytest.raises(HistoryLayoutError, match="layout 3, not 2"):
            SqliteHistory(path, readonly=readonly)
    with sqlite3.connect(path) as newer:
        assert newer.execute("SELECT name FROM sqlite_master").fetchall() == [("meta",), ("sqlite_autoindex_meta_1",)]
        assert newer.execute("SELECT * FROM meta").fetchall() == [("schema", "3")]


def test_relay_trace_on_an_unconverted_history_says_to_start_the_relay(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite3"
    with sqlite3.connect(path) as old:
        old.executescript(V1_SQLITE)
    before = path.read_bytes()
    with pytest.raises(HistoryLayoutError, match=r"layout 1, not 2 .*start the relay, which converts it"):
        SqliteHistory(path, readonly=True)
    assert path.read_bytes() == before


@pytest.mark.slow
def test_relay_trace_on_an_unconverted_postgresql_history_changes_nothing(postgres_server: PostgresServer) -> None:
    url = postgres_server.database()
    raw = postgres_raw(url)
    write_layout_1(raw, postgres=True)
    with pytest.raises(HistoryLayoutError, match=r"layout 1, not 2 .*start the relay, which converts it"):
        PostgresHistory(url, readonly=True)
    assert raw("SELECT address FROM recipients ORDER BY seq", ()) == [(DELIVERED,), (BOUNCED,), (SENT,)]
    assert raw("SELECT count(*) FROM meta WHERE key = 'schema'", ()) == [(0,)]
