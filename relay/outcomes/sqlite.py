"""The message history in one embedded SQLite file (WAL; mode 0600, which its -wal and -shm files take).

Each method is one transaction. `synchronous = FULL`: a report taken from Infobip (handed out only
once) and the bounce it calls for are on disk together, or neither is, before anything is sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path

from relay.config import Settings
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

SCHEMA = """
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


def history_path(settings: Settings) -> Path:
    """reports.history_path, by default a file beside the spool's directories."""
    return settings.reports.history_path or settings.spool.path / "history.sqlite3"


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open (and for writing, create with mode 0600) the history file."""
    if readonly:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")  # FULL for the transactions that must survive power loss
    db.execute("PRAGMA busy_timeout = 5000")
    db.executescript(SCHEMA)
    db.execute("UPDATE bounces SET state = 'pending' WHERE state = 'sending'")  # a crash mid-send: again
    return db


class SqliteHistory:
    """HistoryStore on SQLite. Use from one thread at a time (relay/outcomes/writer.py sees to it)."""

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = path
        self.db = connect(path, readonly=readonly)

    @contextlib.contextmanager
    def _tx(self, *, durable: bool = False) -> Iterator[sqlite3.Connection]:
        """One transaction. `durable`: on disk (fsync'd) at COMMIT, with everything written before it;
        otherwise safe from a crash of the process at once, and from power loss at the next durable one."""
        self.db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")  # not inside a transaction
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    def meta(self, key: str, default: str) -> str:
        with self._tx() as db:
            db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (key, default))
            return str(db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()[0])

    # writes from the data path

    def write(self, changes: Sequence[Change], bounces_on: bool) -> None:
        """A batch in as few statements as it takes (each one a hop of the GIL for the event loop)."""
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
        rows = self.db.execute(
            "SELECT DISTINCT m.bulk_id FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
            "WHERE r.status = 'sent' AND r.accepted_at >= ? AND m.bulk_id IS NOT NULL ORDER BY 1",
            (since,),
        )
        return [row[0] for row in rows]

    # the bounce outbox

    def due_bounces(self, now: float, limit: int) -> list[BounceJob]:
        """Marked 'sending' as they are handed out, so a report for the same message arriving meanwhile
        starts a new bounce instead of joining one already on its way."""
        with self._tx() as db:
            rows = db.execute(
                "UPDATE bounces SET state = 'sending' WHERE id IN (SELECT id FROM bounces WHERE state = 'pending' "
                "AND due <= ? ORDER BY due LIMIT ?) RETURNING id, queue_id, action, recipients, attempts, created_at",
                (now, limit),
            ).fetchall()
            return [_bounce_job(db, *row) for row in sorted(rows)]

    def bounce_done(self, bounce_id: int, at: float, outcome: str, detail: str) -> None:
        with self._tx(durable=True) as db:  # never sent twice
            db.execute(
                "UPDATE bounces SET state = ?, done_at = ?, last_error = ? WHERE id = ?",
                (outcome, at, detail if outcome != "sent" else "", bounce_id),
            )
            row = db.execute("SELECT queue_id, action, recipients FROM bounces WHERE id = ?", (bounce_id,)).fetchone()
            if row is not None:
                for item in json.loads(row[2]):
                    _event(db, row[0], at, "bounce", item["address"], f"{row[1]} report {outcome}: {detail}")

    def bounce_retry(self, bounce_id: int, due: float, error: str) -> None:
        with self._tx() as db:
            db.execute(
                "UPDATE bounces SET state = 'pending', due = ?, attempts = attempts + 1, last_error = ? WHERE id = ?",
                (due, error, bounce_id),
            )

    def delayed(self, received_before: float, at: float) -> int:
        with self._tx() as db:
            rows = db.execute(
                "SELECT m.queue_id, r.address, r.detail FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
                "WHERE r.status = 'queued' AND m.warned = 0 AND m.received_at < ? ORDER BY m.queue_id",
                (received_before,),
            ).fetchall()
            waiting: dict[str, list[dict[str, str | None]]] = {}
            for queue_id, address, detail in rows:
                item = {"address": address, "status": QUEUED, "dsn": "4.4.7", "diagnostic": detail, "infobip_id": None}
                waiting.setdefault(queue_id, []).append(item)
            for queue_id, items in waiting.items():
                _queue_bounce(db, queue_id, items, at, action="delayed")
                db.execute("UPDATE messages SET warned = 1 WHERE queue_id = ?", (queue_id,))
            return len(waiting)

    # reading and housekeeping

    def lookup(self, query: str, limit: int) -> list[MessageTrace]:
        query = query.strip()
        ids = _find(self.db, query, limit)
        if not ids and "@" in query and not query.startswith("<"):
            ids = _find(self.db, f"<{query}>", limit)  # a Message-ID typed without its brackets
        return [trace for queue_id in ids if (trace := _trace(self.db, queue_id)) is not None]

    def prune(self, before: float) -> int:
        """Messages whose bounce is still to go are kept until it has gone."""
        with self._tx() as db:
            db.execute("DROP TABLE IF EXISTS temp.gone")
            db.execute(
                "CREATE TEMP TABLE gone AS SELECT queue_id FROM messages WHERE received_at < ? AND queue_id NOT IN "
                "(SELECT queue_id FROM bounces WHERE state IN ('pending', 'sending'))",
                (before,),
            )
            for table in ("recipients", "events", "infobip_ids", "bounces", "messages"):
                db.execute(f"DELETE FROM {table} WHERE queue_id IN (SELECT queue_id FROM temp.gone)")
            count = int(db.execute("SELECT count(*) FROM temp.gone").fetchone()[0])
            db.execute("DROP TABLE temp.gone")
            return count


def _event(db: sqlite3.Connection, queue_id: str, at: float, kind: str, address: str | None, detail: str) -> None:
    db.execute("INSERT INTO events VALUES (?, ?, ?, ?, ?)", (queue_id, at, kind, address, detail))


def _received(db: sqlite3.Connection, received: list[MessageReceived]) -> None:
    """New messages, their recipients `queued` (their "received" line in trace comes from this row)."""
    db.executemany(
        "INSERT OR IGNORE INTO messages (queue_id, message_id, sender, client_ip, received_at, size, bulk_id, headers)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (m.queue_id, m.message_id, m.sender, m.client_ip, m.received_at, m.size, m.bulk_id, m.headers)
            for m in received
        ],
    )
    db.executemany(
        "INSERT OR IGNORE INTO recipients (queue_id, address, status, at) VALUES (?, ?, 'queued', ?)",
        [(m.queue_id, rcpt, m.received_at) for m in received for rcpt in m.recipients],
    )


def _accepted(db: sqlite3.Connection, attempts: list[Attempted]) -> None:
    """Every recipient Infobip took in these attempts: `sent`, with its id. One statement for the batch
    (a recipient deferred and then taken in the same batch ends `sent` all the same)."""
    rows = []
    for a in attempts:
        ids = ",".join(a.infobip_ids)
        rows += [(ids, f"Infobip took it as {ids}", a.at, a.at, a.queue_id, rcpt) for rcpt in a.accepted]
    db.executemany(
        "UPDATE recipients SET status = 'sent', infobip_id = ?, detail = ?, at = ?, accepted_at = ? "
        "WHERE queue_id = ? AND address = ? AND status = 'queued'",
        rows,
    )
    db.executemany(
        "INSERT OR IGNORE INTO infobip_ids VALUES (?, ?)", [(i, a.queue_id) for a in attempts for i in a.infobip_ids]
    )
    db.executemany(
        "INSERT INTO events VALUES (?, ?, 'attempt', NULL, ?)",
        [(a.queue_id, a.at, attempt_words(a)) for a in attempts],
    )


def _failed(db: sqlite3.Connection, a: Attempted, bounces_on: bool) -> None:
    """Deferred recipients keep `queued` with the reply; dead ones end failed or expired, and after a 250
    are queued for a bounce in this same transaction."""
    db.executemany(
        "UPDATE recipients SET detail = ?, at = ? WHERE queue_id = ? AND address = ? AND status = 'queued'",
        [(reply, a.at, a.queue_id, rcpt) for rcpt, reply in a.deferred.items()],
    )
    bouncing = []
    for rcpt, (status, reason) in a.dead.items():
        changed = db.execute(
            "UPDATE recipients SET status = ?, detail = ?, at = ? WHERE queue_id = ? AND address = ? "
            "AND status IN ('queued', 'sent')",
            (status, reason, a.at, a.queue_id, rcpt),
        ).rowcount
        if changed and a.bounce and bounces_on:
            dsn = reply_dsn_status(reason, status)
            bouncing.append({"address": rcpt, "status": status, "dsn": dsn, "diagnostic": reason, "infobip_id": None})
    if bouncing:
        _queue_bounce(db, a.queue_id, bouncing, a.at)


def _queue_bounce(
    db: sqlite3.Connection, queue_id: str, items: list[dict[str, str | None]], at: float, action: str = "failed"
) -> None:
    """One bounce per message: recipients join a bounce of the message not yet handed to the sender."""
    row = db.execute(
        "SELECT id, recipients FROM bounces WHERE queue_id = ? AND action = ? AND state = 'pending'",
        (queue_id, action),
    ).fetchone()
    if row is None:
        db.execute(
            "INSERT INTO bounces (queue_id, action, recipients, created_at, due) VALUES (?, ?, ?, ?, ?)",
            (queue_id, action, json.dumps(items), at, at),
        )
    else:
        db.execute("UPDATE bounces SET recipients = ? WHERE id = ?", (json.dumps(json.loads(row[1]) + items), row[0]))


def _apply_report(
    db: sqlite3.Connection, report: Report, source: str, at: float, bounces_on: bool, applied: Applied
) -> None:
    found = db.execute(
        "SELECT r.queue_id, r.status, r.accepted_at FROM infobip_ids i JOIN recipients r ON r.queue_id = i.queue_id "
        "WHERE i.infobip_id = ? AND r.address = ?",
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
        "UPDATE recipients SET status = ?, infobip_id = ?, detail = ?, at = ? WHERE queue_id = ? AND address = ?",
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
    db: sqlite3.Connection, bounce_id: int, queue_id: str, action: str, items: str, attempts: int, created: float
) -> BounceJob:
    row = db.execute(
        "SELECT message_id, sender, received_at, headers FROM messages WHERE queue_id = ?", (queue_id,)
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


def _find(db: sqlite3.Connection, query: str, limit: int) -> list[str]:
    """Queue ids for a query, newest first: a Message-ID has its angle brackets, an address an @."""
    args: tuple[str, ...] = (query,)
    if query.startswith("<"):
        sql = "SELECT queue_id FROM messages WHERE message_id = ?"
    elif "@" in query:
        sql = "SELECT DISTINCT queue_id FROM recipients WHERE address = ?"
    else:
        sql = "SELECT ? UNION SELECT queue_id FROM infobip_ids WHERE infobip_id = ?"
        args = (query, query)
    rows = db.execute(
        f"SELECT queue_id FROM messages WHERE queue_id IN ({sql}) ORDER BY received_at DESC LIMIT ?",
        (*args, limit),
    )
    return [row[0] for row in rows]


def _trace(db: sqlite3.Connection, queue_id: str) -> MessageTrace | None:
    row = db.execute(
        "SELECT message_id, sender, client_ip, received_at, size, bulk_id FROM messages WHERE queue_id = ?",
        (queue_id,),
    ).fetchone()
    if row is None:
        return None
    recipients = [
        RecipientTrace(address, status, infobip_id or None, detail, at)
        for address, status, infobip_id, detail, at in db.execute(
            "SELECT address, status, infobip_id, detail, at FROM recipients WHERE queue_id = ? ORDER BY rowid",
            (queue_id,),
        )
    ]
    words = f"from {row[2]}: {len(recipients)} recipient(s), {row[4]} bytes"
    events = [Event(row[3], "received", None, words)] + [
        Event(at, kind, address, detail)
        for at, kind, address, detail in db.execute(
            "SELECT at, kind, address, detail FROM events WHERE queue_id = ? ORDER BY at, rowid", (queue_id,)
        )
    ]
    return MessageTrace(queue_id, row[0], row[1], row[2], row[3], row[4], row[5], recipients, events)
