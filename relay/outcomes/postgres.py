"""The message history on PostgreSQL (`[reports] history_url`), one database for every replica.

The same tables and answers as relay/outcomes/sqlite.py, so `relay trace` and GET /messages on any replica
see every replica's messages. Each method is one transaction (psycopg 3, blocking, on the history's
own thread). What SQLite got from being one writer is taken here with row locks: a report or a bounce
claimed by one replica is not claimed again by another, and a lease row says which replica polls reports.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg

from relay.outcomes.decide import (
    BOUNCED,
    FINAL,
    QUEUED,
    Report,
    attempt_words,
    diagnostic,
    reply_dsn_status,
    report_detail,
    report_dsn_status,
    report_status,
)
from relay.outcomes.history import (
    Applied,
    Attempted,
    BounceJob,
    BounceRecipient,
    Change,
    Event,
    MessageReceived,
    MessageTrace,
    Outcome,
    RecipientTrace,
)

SCHEMA_LOCK = 0x72656C6179  # pg_advisory_xact_lock key ("relay"): replicas starting at once create it in turn
PRUNE_LOCK = SCHEMA_LOCK + 1
SENDING_STALE = 600.0  # seconds a bounce may stay claimed ('sending') before another replica offers it again
# Addresses compare without case (SQLite's COLLATE NOCASE): the unique index and every match use lower().
SCHEMA = """
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

Conn = psycopg.Connection[tuple[Any, ...]]


class PostgresHistory:
    """HistoryStore on PostgreSQL. One connection, used from one thread (relay/outcomes/writer.py)."""

    def __init__(self, url: str) -> None:
        self._url = url  # a secret (it may carry the password): never logged
        self.conn = self._connect()

    def _connect(self) -> Conn:
        """Connect and create the schema; the advisory lock makes replicas starting together take turns."""
        conn = psycopg.connect(self._url, autocommit=True, connect_timeout=10, application_name="relay-history")
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            # Only when it is missing: CREATE INDEX IF NOT EXISTS still locks its table, which deadlocked with a
            # replica already writing (the last table created says the whole schema is there).
            if _one(conn, "SELECT to_regclass('poller')", ())[0] is None:
                conn.execute(SCHEMA)
        return conn

    @contextlib.contextmanager
    def _tx(self, *, durable: bool = False) -> Iterator[Conn]:
        """One transaction. Not `durable`: the commit does not wait for the WAL flush (as SQLite's NORMAL,
        safe from our crash, not the server's); durable ones flush it, with everything before them."""
        if self.conn.closed:  # the server restarted or the connection broke: the call that found out failed
            # (history_write_failed, say); this one starts on a fresh connection
            self.conn = self._connect()
        with self.conn.transaction():
            if not durable:
                self.conn.execute("SET LOCAL synchronous_commit = off")
            yield self.conn

    def close(self) -> None:
        self.conn.close()

    def meta(self, key: str, default: str) -> str:
        with self._tx() as db:
            db.execute("INSERT INTO meta VALUES (%s, %s) ON CONFLICT DO NOTHING", (key, default))
            return str(_one(db, "SELECT value FROM meta WHERE key = %s", (key,))[0])

    def poll_lease(self, holder: str, seconds: float) -> bool:
        """Take or renew the report poller's lease: True while `holder` is the one replica that polls.
        The database's clock decides expiry, so replicas' clocks need not agree."""
        with self._tx() as db:
            row = db.execute(
                "INSERT INTO poller VALUES ('reports', %(h)s, extract(epoch FROM clock_timestamp()) + %(s)s) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
                "WHERE poller.holder = excluded.holder OR poller.expires < extract(epoch FROM clock_timestamp()) "
                "RETURNING holder",
                {"h": holder, "s": seconds},
            ).fetchone()
            return row is not None

    def write(self, changes: Sequence[Change], bounces_on: bool) -> None:
        received = [c for c in changes if isinstance(c, MessageReceived)]
        attempts = [c for c in changes if isinstance(c, Attempted)]
        with self._tx(durable=bounces_on and any(a.dead and a.bounce for a in attempts)) as db:
            _received(db, received)
            _accepted(db, attempts)
            for attempt in attempts:
                if attempt.deferred or attempt.dead:
                    _failed(db, attempt, bounces_on)

    def apply_reports(self, reports: Sequence[Report], source: str, at: float, bounces_on: bool) -> Applied:
        applied = Applied()
        with self._tx(durable=True) as db:  # a report is handed out once: it must not be lost now
            for report in reports:
                _apply_report(db, report, source, at, bounces_on, applied)
        return applied

    def pending_bulk_ids(self, since: float) -> list[str]:
        with self._tx() as db:
            rows = db.execute(
                "SELECT DISTINCT m.bulk_id FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
                "WHERE r.status = 'sent' AND r.accepted_at >= %s AND m.bulk_id IS NOT NULL ORDER BY 1",
                (since,),
            ).fetchall()
        return [row[0] for row in rows]

    def due_bounces(self, now: float, limit: int) -> list[BounceJob]:
        """Claimed ('sending') as handed out, rows locked and skipped by other replicas, so each goes once.
        One claimed by a replica that died is offered again once SENDING_STALE has passed."""
        with self._tx() as db:
            rows = db.execute(
                "UPDATE bounces SET state = 'sending', claimed_at = %(now)s WHERE id IN (SELECT id FROM bounces "
                "WHERE (state = 'pending' AND due <= %(now)s) OR (state = 'sending' AND claimed_at < %(stale)s) "
                "ORDER BY due LIMIT %(limit)s FOR UPDATE SKIP LOCKED) "
                "RETURNING id, queue_id, action, recipients, attempts, created_at",
                {"now": now, "stale": now - SENDING_STALE, "limit": limit},
            ).fetchall()
            return [_bounce_job(db, *row) for row in sorted(rows)]

    def bounce_done(self, bounce_id: int, at: float, outcome: str, detail: str) -> None:
        with self._tx(durable=True) as db:  # never sent twice
            row = db.execute(
                "UPDATE bounces SET state = %s, done_at = %s, last_error = %s WHERE id = %s "
                "RETURNING queue_id, action, recipients",
                (outcome, at, detail if outcome != "sent" else "", bounce_id),
            ).fetchone()
            if row is not None:
                for item in json.loads(row[2]):
                    _event(db, row[0], at, "bounce", item["address"], f"{row[1]} report {outcome}: {detail}")

    def bounce_retry(self, bounce_id: int, due: float, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE bounces SET state = 'pending', due = %s, attempts = attempts + 1, last_error = %s "
                "WHERE id = %s",
                (due, error, bounce_id),
            )

    def delayed(self, received_before: float, at: float) -> int:
        """A message is marked warned before its warning is queued: a replica doing the same at once skips it."""
        with self._tx() as db:
            rows = db.execute(
                "SELECT m.queue_id, r.address, r.detail FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
                "WHERE r.status = 'queued' AND m.warned = 0 AND m.received_at < %s ORDER BY m.queue_id, r.seq",
                (received_before,),
            ).fetchall()
            waiting: dict[str, list[dict[str, str | None]]] = {}
            for queue_id, address, detail in rows:
                item = {"address": address, "status": QUEUED, "dsn": "4.4.7", "diagnostic": detail, "infobip_id": None}
                waiting.setdefault(queue_id, []).append(item)
            count = 0
            for queue_id, items in waiting.items():
                marked = db.execute("UPDATE messages SET warned = 1 WHERE queue_id = %s AND warned = 0", (queue_id,))
                if marked.rowcount:
                    _queue_bounce(db, queue_id, items, at, action="delayed")
                    count += 1
            return count

    def lookup(self, query: str, limit: int) -> list[MessageTrace]:
        query = query.strip()
        with self._tx() as db:
            ids = _find(db, query, limit)
            if not ids and "@" in query and not query.startswith("<"):
                ids = _find(db, f"<{query}>", limit)  # a Message-ID typed without its brackets
            return [trace for queue_id in ids if (trace := _trace(db, queue_id)) is not None]

    def prune(self, before: float) -> int:
        """Messages whose bounce is still to go are kept until it has gone. Every replica prunes hourly: one
        at a time does (the others find the lock taken and skip), so their deletes never deadlock."""
        with self._tx() as db:
            if not _one(db, "SELECT pg_try_advisory_xact_lock(%s)", (PRUNE_LOCK,))[0]:
                return 0
            db.execute(
                "CREATE TEMP TABLE gone ON COMMIT DROP AS SELECT queue_id FROM messages WHERE received_at < %s "
                "AND queue_id NOT IN (SELECT queue_id FROM bounces WHERE state IN ('pending', 'sending'))",
                (before,),
            )
            for table in ("recipients", "events", "infobip_ids", "bounces", "messages"):
                db.execute(f"DELETE FROM {table} WHERE queue_id IN (SELECT queue_id FROM gone)")
            return int(_one(db, "SELECT count(*) FROM gone", ())[0])


def _one(db: Conn, sql: str, args: Sequence[Any]) -> tuple[Any, ...]:
    row = db.execute(sql, args).fetchone()
    assert row is not None
    return row


def _event(db: Conn, queue_id: str, at: float, kind: str, address: str | None, detail: str) -> None:
    db.execute(
        "INSERT INTO events (queue_id, at, kind, address, detail) VALUES (%s, %s, %s, %s, %s)",
        (queue_id, at, kind, address, detail),
    )


def _received(db: Conn, received: list[MessageReceived]) -> None:
    """New messages, their recipients `queued`."""
    if not received:
        return
    with db.cursor() as cur:
        cur.executemany(
            "INSERT INTO messages (queue_id, message_id, sender, client_ip, received_at, size, bulk_id, headers) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
            [
                (m.queue_id, m.message_id, m.sender, m.client_ip, m.received_at, m.size, m.bulk_id, m.headers)
                for m in received
            ],
        )
        cur.executemany(
            "INSERT INTO recipients (queue_id, address, status, at) VALUES (%s, %s, 'queued', %s) "
            "ON CONFLICT DO NOTHING",
            [(m.queue_id, rcpt, m.received_at) for m in received for rcpt in m.recipients],
        )


def _accepted(db: Conn, attempts: list[Attempted]) -> None:
    """Every recipient Infobip took in these attempts: `sent`, with its id."""
    if not attempts:
        return
    rows = []
    for a in attempts:
        ids = ",".join(a.infobip_ids)
        rows += [(ids, f"Infobip took it as {ids}", a.at, a.at, a.queue_id, rcpt) for rcpt in a.accepted]
    with db.cursor() as cur:
        if rows:
            cur.executemany(
                "UPDATE recipients SET status = 'sent', infobip_id = %s, detail = %s, at = %s, accepted_at = %s "
                "WHERE queue_id = %s AND lower(address) = lower(%s) AND status = 'queued'",
                rows,
            )
        if ids_rows := [(i, a.queue_id) for a in attempts for i in a.infobip_ids]:
            cur.executemany("INSERT INTO infobip_ids VALUES (%s, %s) ON CONFLICT DO NOTHING", ids_rows)
        cur.executemany(
            "INSERT INTO events (queue_id, at, kind, address, detail) VALUES (%s, %s, 'attempt', NULL, %s)",
            [(a.queue_id, a.at, attempt_words(a)) for a in attempts],
        )


def _failed(db: Conn, a: Attempted, bounces_on: bool) -> None:
    """Deferred recipients keep `queued` with the reply; dead ones end failed or expired, and after a 250
    are queued for a bounce in this same transaction."""
    for rcpt, reply in a.deferred.items():
        db.execute(
            "UPDATE recipients SET detail = %s, at = %s WHERE queue_id = %s AND lower(address) = lower(%s) "
            "AND status = 'queued'",
            (reply, a.at, a.queue_id, rcpt),
        )
    bouncing = []
    for rcpt, (status, reason) in a.dead.items():
        changed = db.execute(
            "UPDATE recipients SET status = %s, detail = %s, at = %s WHERE queue_id = %s "
            "AND lower(address) = lower(%s) AND status IN ('queued', 'sent')",
            (status, reason, a.at, a.queue_id, rcpt),
        ).rowcount
        if changed and a.bounce and bounces_on:
            dsn = reply_dsn_status(reason, status)
            bouncing.append({"address": rcpt, "status": status, "dsn": dsn, "diagnostic": reason, "infobip_id": None})
    if bouncing:
        _queue_bounce(db, a.queue_id, bouncing, a.at)


def _queue_bounce(
    db: Conn, queue_id: str, items: list[dict[str, str | None]], at: float, action: str = "failed"
) -> None:
    """One bounce per message: recipients join a bounce of the message not yet handed to the sender."""
    row = db.execute(
        "SELECT id, recipients FROM bounces WHERE queue_id = %s AND action = %s AND state = 'pending' FOR UPDATE",
        (queue_id, action),
    ).fetchone()
    if row is None:
        db.execute(
            "INSERT INTO bounces (queue_id, action, recipients, created_at, due) VALUES (%s, %s, %s, %s, %s)",
            (queue_id, action, json.dumps(items), at, at),
        )
    else:
        merged = json.dumps(json.loads(row[1]) + items)
        db.execute("UPDATE bounces SET recipients = %s WHERE id = %s", (merged, row[0]))


def _apply_report(db: Conn, report: Report, source: str, at: float, bounces_on: bool, applied: Applied) -> None:
    """The recipient's row is locked while we decide: the same report pushed to one replica and pulled by
    another counts once."""
    found = db.execute(
        "SELECT r.queue_id, r.status, r.accepted_at FROM infobip_ids i JOIN recipients r ON r.queue_id = i.queue_id "
        "WHERE i.infobip_id = %s AND lower(r.address) = lower(%s) FOR UPDATE OF r",
        (report.message_id, report.to),
    ).fetchone()
    if found is None:
        applied.unknown += 1
        return
    queue_id, current, accepted_at = found
    status, detail = report_status(report), report_detail(report)
    if status is None:  # not final (PENDING): noted, nothing changes
        applied.pending += 1
        _event(db, queue_id, at, "report", report.to, f"{source}: {detail}")
        return
    if current in FINAL:  # seen already (pushed and pulled): counted once
        applied.duplicates += 1
        return
    db.execute(
        "UPDATE recipients SET status = %s, infobip_id = %s, detail = %s, at = %s "
        "WHERE queue_id = %s AND lower(address) = lower(%s)",
        (status, report.message_id, detail, at, queue_id, report.to),
    )
    _event(db, queue_id, at, "report", report.to, f"{source}: {detail}")
    bounce = status == BOUNCED and bounces_on
    if bounce:
        item: dict[str, str | None] = {
            "address": report.to,
            "status": BOUNCED,
            "dsn": report_dsn_status(report),
            "diagnostic": diagnostic(report),
            "infobip_id": report.message_id,
        }
        _queue_bounce(db, queue_id, [item], at)
    seconds = at - accepted_at if accepted_at is not None else None
    applied.outcomes.append(Outcome(queue_id, report.to, report.message_id, status, detail, seconds, bounce))


def _bounce_job(
    db: Conn, bounce_id: int, queue_id: str, action: str, items: str, attempts: int, created: float
) -> BounceJob:
    row = db.execute(
        "SELECT message_id, sender, received_at, headers FROM messages WHERE queue_id = %s", (queue_id,)
    ).fetchone() or ("", "", created, None)
    recipients = tuple(
        BounceRecipient(i["address"], i["status"], i["dsn"], i["diagnostic"] or "", i["infobip_id"])
        for i in json.loads(items)
    )
    return BounceJob(
        bounce_id=bounce_id,
        queue_id=queue_id,
        message_id=row[0],
        sender=row[1],
        received_at=row[2],
        headers=bytes(row[3] or b""),
        recipients=recipients,
        attempts=attempts,
        created_at=created,
        action=action,
    )


def _find(db: Conn, query: str, limit: int) -> list[str]:
    """Queue ids for a query, newest first: a Message-ID has its angle brackets, an address an @."""
    if query.startswith("<"):
        sql = "SELECT queue_id FROM messages WHERE message_id = %(q)s"
    elif "@" in query:
        sql = "SELECT queue_id FROM recipients WHERE lower(address) = lower(%(q)s)"
    else:
        sql = "SELECT %(q)s::text UNION SELECT queue_id FROM infobip_ids WHERE infobip_id = %(q)s"
    rows = db.execute(
        f"SELECT queue_id FROM messages WHERE queue_id IN ({sql}) ORDER BY received_at DESC LIMIT %(limit)s",
        {"q": query, "limit": limit},
    ).fetchall()
    return [row[0] for row in rows]


def _trace(db: Conn, queue_id: str) -> MessageTrace | None:
    row = db.execute(
        "SELECT message_id, sender, client_ip, received_at, size, bulk_id FROM messages WHERE queue_id = %s",
        (queue_id,),
    ).fetchone()
    if row is None:
        return None
    recipients = [
        RecipientTrace(address, status, infobip_id or None, detail, at)
        for address, status, infobip_id, detail, at in db.execute(
            "SELECT address, status, infobip_id, detail, at FROM recipients WHERE queue_id = %s ORDER BY seq",
            (queue_id,),
        ).fetchall()
    ]
    words = f"from {row[2]}: {len(recipients)} recipient(s), {row[4]} bytes"
    events = [Event(row[3], "received", None, words)] + [
        Event(at, kind, address, detail)
        for at, kind, address, detail in db.execute(
            "SELECT at, kind, address, detail FROM events WHERE queue_id = %s ORDER BY at, seq", (queue_id,)
        ).fetchall()
    ]
    return MessageTrace(queue_id, row[0], row[1], row[2], row[3], row[4], row[5], recipients, events)
