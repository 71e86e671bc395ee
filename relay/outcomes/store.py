"""The message history as SQL, written once for SQLite (relay/outcomes/sqlite.py) and PostgreSQL
(relay/outcomes/postgres.py): the tables and every method of HistoryStore live here; each engine supplies
only what differs (`Dialect`: column types, row locks; `Db`: placeholders, executemany; its connection and
transactions).

Statements are written with `?` placeholders (PostgreSQL's adapter turns them into `%s`). Sensitive values
(addresses, Message-IDs, client addresses, header blocks, reply and report texts) go through `Columns`
(relay/outcomes/columns.py), and rows are found by the search key stored beside them, never by the value.
Where several replicas share one database, a row about to be changed is locked as it is read
(`Dialect.lock`), so a report or a bounce is taken by one replica only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from relay.outcomes.columns import ADDRESS, MESSAGE_ID, Columns
from relay.outcomes.decide import (
    BOUNCED,
    FAILED,
    FINAL,
    QUEUED,
    SENT,
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
    Tracked,
)
from relay.outcomes.migrate import migrate_layout_1
from relay.store.sealing import MissingKeyError, SealError

SCHEMA_VERSION = "2"  # meta 'schema': the layout below (1: plaintext columns, searched by value)
T = TypeVar("T")
INSERT_ROWS = 256  # rows in one INSERT statement (Db.insert): 256 x 9 values, well within both engines' limits
SENDING_STALE = 600.0  # seconds a bounce may stay claimed ('sending') before it is offered again (a dead replica)
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE messages (
    queue_id TEXT PRIMARY KEY, message_key TEXT NOT NULL, message_id {blob} NOT NULL, sender {blob} NOT NULL,
    client_ip {blob} NOT NULL, received_at {real} NOT NULL, size BIGINT NOT NULL, bulk_id TEXT, headers {blob},
    warned INTEGER NOT NULL DEFAULT 0);
CREATE INDEX messages_message_key ON messages(message_key);
CREATE INDEX messages_received_at ON messages(received_at);
CREATE TABLE recipients (
    {seq}, queue_id TEXT NOT NULL, address_key TEXT NOT NULL, address {blob} NOT NULL, status TEXT NOT NULL,
    infobip_id TEXT, detail {blob}, at {real} NOT NULL, accepted_at {real});
CREATE UNIQUE INDEX recipients_key ON recipients(queue_id, address_key);
CREATE INDEX recipients_address ON recipients(address_key);
CREATE INDEX recipients_waiting ON recipients(accepted_at) WHERE status = 'sent';
CREATE INDEX recipients_queued ON recipients(queue_id) WHERE status = 'queued';
CREATE TABLE infobip_ids (infobip_id TEXT PRIMARY KEY, queue_id TEXT NOT NULL){without_rowid};
CREATE INDEX infobip_ids_queue_id ON infobip_ids(queue_id);
CREATE TABLE events (
    {seq}, queue_id TEXT NOT NULL, at {real} NOT NULL, kind TEXT NOT NULL, address {blob}, detail {blob},
    event_id TEXT);
CREATE INDEX events_queue_id ON events(queue_id);
CREATE UNIQUE INDEX events_event_id ON events(event_id) WHERE event_id IS NOT NULL;
CREATE TABLE bounces (
    {id}, queue_id TEXT NOT NULL, action TEXT NOT NULL, recipients {blob} NOT NULL, created_at {real} NOT NULL,
    due {real} NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, state TEXT NOT NULL DEFAULT 'pending',
    last_error {blob}, done_at {real}, claimed_at {real});
CREATE INDEX bounces_due ON bounces(state, due);
CREATE INDEX bounces_queue_id ON bounces(queue_id);
CREATE TABLE report_lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires {real} NOT NULL)
"""


# The columns relay/outcomes/columns.py seals, by table (with the column that names a row), and the search
# key written beside the first of them.
SENSITIVE = {
    "messages": ("queue_id", ("message_id", "sender", "client_ip", "headers")),
    "recipients": ("seq", ("address", "detail")),
    "events": ("seq", ("address", "detail")),
    "bounces": ("id", ("recipients", "last_error")),
}
SEARCHED = {"messages": ("message_key", MESSAGE_ID), "recipients": ("address_key", ADDRESS)}


class HistoryLayoutError(RuntimeError):
    """The database holds a history of another layout (an older relay's): it is not read or changed."""


UNREADABLE = (SealError, MissingKeyError, HistoryLayoutError)  # a history this config cannot read


@dataclass(frozen=True, slots=True)
class Dialect:
    """What differs between the engines, as words of SQL."""

    seq: str  # the row-order column `seq`
    id: str  # the bounce id column `id`
    real: str
    blob: str
    locks: bool  # SELECT ... FOR UPDATE [SKIP LOCKED]: rows other connections may change at the same time
    table_exists: str  # a row with a non-NULL first column iff the table named by the one ? exists
    row_order: str  # what orders a table's rows as written (layout 1's, in relay/outcomes/migrate.py)
    without_rowid: str = ""  # SQLite's table that is its primary key's index (one B-tree, not two)
    rename_index: str = ""  # renames index {old} to {new}, where a renamed table's indexes keep their names

    def lock(self, of: str = "", *, skip: bool = False) -> str:
        """Appended to a SELECT whose rows this transaction will change."""
        if not self.locks:
            return ""
        return " FOR UPDATE" + (f" OF {of}" if of else "") + (" SKIP LOCKED" if skip else "")

    def schema(self) -> list[str]:
        words = {
            "seq": self.seq,
            "id": self.id,
            "real": self.real,
            "blob": self.blob,
            "without_rowid": self.without_rowid,
        }
        return [statement.format(**words) for statement in SCHEMA.split(";")]


class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Db:
    """A connection as the store uses it: `?` statements, executemany, the dialect and the column codec."""

    def __init__(self, dialect: Dialect, cols: Columns) -> None:
        self.dialect = dialect
        self.cols = cols

    def run(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        raise NotImplementedError

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        raise NotImplementedError

    def insert(self, into: str, rows: Sequence[Sequence[Any]], then: str = "") -> None:
        """`INSERT INTO {into} VALUES (...), (...), ...{then}`: a batch in a few statements. executemany steps
        once a row, and each step hands the GIL between the history's thread and the event loop. Statements of
        2**k rows (at most INSERT_ROWS), so the prepared-statement cache holds a few shapes, not one a size."""
        for chunk in in_runs(rows):
            self.run(f"INSERT INTO {into} VALUES {placeholders(chunk)}{then}", [v for row in chunk for v in row])

    def one(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.run(sql, args).fetchone()

    def all(self, sql: str, args: Sequence[Any] = ()) -> list[Any]:
        return self.run(sql, args).fetchall()

    def has_table(self, name: str) -> bool:
        found = self.one(self.dialect.table_exists, (name,))
        return found is not None and found[0] is not None


def create_schema(db: Db, *, convert: bool = True) -> None:
    """Create the tables if the database has none (in the caller's transaction), or convert an older relay's
    history (layout 1: a meta table with no 'schema' row) unless not to `convert` (`relay trace`: then, as for
    any other layout, HistoryLayoutError).
    Only when missing: CREATE INDEX IF NOT EXISTS still locks its table, which deadlocked a PostgreSQL
    replica starting beside one already writing."""
    if not db.has_table("meta"):
        _create_tables(db)
    elif convert and db.one("SELECT value FROM meta WHERE key = 'schema'") is None:
        migrate_layout_1(db, functools.partial(_create_tables, db))
    else:
        check_layout(db)
        return
    db.run("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))


def _create_tables(db: Db) -> None:
    """Layout 2's tables and indexes, but for one that exists already (meta, kept by migrate_layout_1)."""
    for statement in db.dialect.schema():
        words = statement.split()
        if words[:2] != ["CREATE", "TABLE"] or not db.has_table(words[2]):
            db.run(statement)


def check_layout(db: Db) -> None:
    row = db.one("SELECT value FROM meta WHERE key = 'schema'")
    if row is None or row[0] != SCHEMA_VERSION:
        raise HistoryLayoutError(
            f"the message history has layout {row[0] if row else 1}, not {SCHEMA_VERSION} (an older relay wrote it)"
            + (": start the relay, which converts it, then try again" if row is None else ": it is not changed here")
        )


def check_keys(db: Db) -> None:
    """MissingKeyError (a config error) if the oldest or the newest message's values were sealed with a key
    that is not configured: a wrong key is named at start, as the spool's are. Two rows, by an index; a
    value under any other missing key is reported when it is read."""
    found = [
        row[0]
        for order in ("ASC", "DESC")
        if (row := db.one(f"SELECT sender FROM messages ORDER BY received_at {order} LIMIT 1")) is not None
    ]
    db.cols.check(found)


def in_runs(rows: Sequence[T]) -> Iterator[Sequence[T]]:
    """`rows` in runs of 2**k (at most INSERT_ROWS), largest first: one statement each (Db.insert)."""
    start = 0
    while start < len(rows):
        count = min(INSERT_ROWS, 1 << (len(rows) - start).bit_length() - 1)
        yield rows[start : start + count]
        start += count


def placeholders(rows: Sequence[Sequence[Any]]) -> str:
    """The `(?, ?), (?, ?)` of a VALUES list for `rows`."""
    return ", ".join([_marks(len(rows[0]))] * len(rows))


def _marks(count: int) -> str:
    return "(" + ", ".join("?" * count) + ")"


class SqlHistory:
    """HistoryStore over `Db`. A subclass opens the connection and says how a transaction runs."""

    def _tx(self, *, durable: bool = False, unlimited: bool = False) -> contextlib.AbstractContextManager[Db]:
        """One write transaction. `durable`: on disk at COMMIT, with everything written before it;
        otherwise safe from a crash of the relay at once, and from a crash of the machine (or the server)
        at the next durable one. `unlimited`: maintenance that may run long (prune, rekey), without the
        engine's statement time limit, if it has one."""
        raise NotImplementedError

    def _read(self) -> contextlib.AbstractContextManager[Db]:
        """One transaction that only reads (a consistent view of the history)."""
        return self._tx()

    def _prune_turn(self, db: Db) -> bool:
        """Whether this store prunes now (replicas on one database take turns)."""
        return True

    def close(self) -> None:
        raise NotImplementedError

    def meta(self, key: str, default: str) -> str:
        with self._tx() as db:
            db.run("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", (key, default))
            return str(db.one("SELECT value FROM meta WHERE key = ?", (key,))[0])

    def write(self, changes: Sequence[Change], bounces_on: bool) -> None:
        """A batch in as few statements as it takes (each one a hop of the GIL for the event loop). A recipient
        Infobip took in an attempt of the same batch as its message (the usual first attempt) is written
        `sent` at once, not inserted and then updated."""
        attempts = [c for c in changes if isinstance(c, Attempted)]
        with self._tx(durable=bounces_on and any(a.dead and a.bounce for a in attempts)) as db:
            dying = {a.queue_id for a in attempts if a.dead}
            received = _without_known_resumed(db, [c for c in changes if isinstance(c, MessageReceived)], dying)
            new = {m.queue_id: frozenset(m.recipients) for m in received}
            taken: dict[tuple[str, str], Attempted] = {}
            for a in attempts:
                if a.accepted and (rcpts := new.get(a.queue_id)) is not None:
                    for rcpt in a.accepted:
                        if rcpt in rcpts:
                            taken.setdefault((a.queue_id, rcpt), a)  # the first attempt that took it, as in SQL
            firsts = (taken.get((m.queue_id, m.recipients[0])) for m in received)
            implied = {id(a) for a, m in zip(firsts, received, strict=True) if a is not None and _whole(a, m, taken)}
            _received(db, received, taken)
            _accepted(db, attempts, taken, implied)
            for attempt in attempts:
                if attempt.deferred or attempt.dead:
                    _failed(db, attempt, bounces_on)

    def apply_reports(self, reports: Sequence[Report], source: str, at: float, bounces_on: bool) -> Applied:
        """A page of reports in a few statements, whatever its length: one read of the recipients they name,
        then one UPDATE for those that turn final and one INSERT for the timeline."""
        applied = Applied()
        changed: list[tuple[str, str, bytes, float, str, str]] = []
        events: list[tuple[str, float, str, str | None, str]] = []
        with self._tx(durable=True) as db:  # a report is handed out once: it must not be lost now
            owners = _owners(db, sorted({report.message_id for report in reports}))
            found = [(report, owners.get(report.message_id)) for report in reports]
            keys = [() if queue_id is None else db.cols.searches(ADDRESS, report.to) for report, queue_id in found]
            pairs = {(q, k) for (_, q), ks in zip(found, keys, strict=True) if q is not None for k in ks}
            rows = _recipient_rows(db, sorted(pairs))
            for (report, queue_id), searched in zip(found, keys, strict=True):
                _apply_report(db, report, queue_id, searched, rows, source, at, bounces_on, applied, changed, events)
            for chunk in in_runs(changed):  # one statement, not one step a report (Db.insert says why)
                db.run(
                    "WITH final (status, infobip_id, detail, at, queue_id, address_key) AS "
                    f"(VALUES {placeholders(chunk)}) UPDATE recipients SET status = final.status, "
                    "infobip_id = final.infobip_id, detail = final.detail, at = final.at FROM final "
                    "WHERE recipients.queue_id = final.queue_id AND recipients.address_key = final.address_key",
                    [v for row in chunk for v in row],
                )
            _events(db, events)
        return applied

    def record_tracking(self, events: Sequence[Tracked]) -> int:
        """Not durable: an event lost to a power cut costs a line of trace, and nothing is sent because of it."""
        with self._tx() as db:
            return sum(_track(db, event) for event in events)

    def pending_bulk_ids(self, since: float) -> list[str]:
        with self._read() as db:
            rows = db.all(
                "SELECT DISTINCT m.bulk_id FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
                "WHERE r.status = 'sent' AND r.accepted_at >= ? AND m.bulk_id IS NOT NULL ORDER BY 1",
                (since,),
            )
        return [row[0] for row in rows]

    # the bounce outbox

    def due_bounces(self, now: float, limit: int) -> list[BounceJob]:
        """Claimed ('sending') as handed out, so a report for the same message arriving meanwhile starts a new
        bounce instead of joining one on its way, and another replica skips it (the rows are locked). One
        claimed by a replica that died is offered again once SENDING_STALE has passed."""
        with self._tx() as db:
            rows = db.all(
                "UPDATE bounces SET state = 'sending', claimed_at = ? WHERE id IN (SELECT id FROM bounces "
                "WHERE (state = 'pending' AND due <= ?) OR (state = 'sending' AND claimed_at < ?) "
                f"ORDER BY due LIMIT ?{db.dialect.lock(skip=True)}) "
                "RETURNING id, queue_id, action, recipients, attempts, created_at",
                (now, now, now - SENDING_STALE, limit),
            )
            return [_bounce_job(db, *row, claimed_at=now) for row in sorted(rows)]

    def bounce_done(
        self, bounce_id: int, at: float, outcome: str, detail: str, claimed_at: float | None = None
    ) -> bool:
        with self._tx(durable=True) as db:  # never sent twice
            row = db.one("SELECT queue_id FROM bounces WHERE id = ?", (bounce_id,))
            error = db.cols.seal_text("bounces.last_error", row[0], detail) if row and outcome != "sent" else None
            held, claim = _claim(claimed_at)
            row = db.one(
                f"UPDATE bounces SET state = ?, done_at = ?, last_error = ? WHERE id = ?{held} "
                "RETURNING queue_id, action, recipients",
                (outcome, at, error, bounce_id, *claim),
            )
            if row is None:
                return False
            queue_id, action, items = row
            for item in _bounce_items(db, queue_id, items):
                _event(db, queue_id, at, "bounce", item["address"], f"{action} report {outcome}: {detail}")
            return True

    def bounce_retry(self, bounce_id: int, due: float, error: str, claimed_at: float | None = None) -> bool:
        with self._tx() as db:
            row = db.one("SELECT queue_id FROM bounces WHERE id = ?", (bounce_id,))
            if row is None:
                return False
            held, claim = _claim(claimed_at)
            cursor = db.run(
                "UPDATE bounces SET state = 'pending', due = ?, attempts = attempts + 1, last_error = ? "
                f"WHERE id = ?{held}",
                (due, db.cols.seal_text("bounces.last_error", row[0], error), bounce_id, *claim),
            )
            return cursor.rowcount > 0

    def deleted(self, queue_ids: Sequence[str], at: float, detail: str) -> int:
        with self._tx() as db:
            count = 0
            for queue_id in queue_ids:
                rows = db.all(
                    "UPDATE recipients SET status = ?, detail = ?, at = ? WHERE queue_id = ? AND status = ? "
                    "RETURNING address",
                    (FAILED, db.cols.seal_text("recipients.detail", queue_id, detail), at, queue_id, QUEUED),
                )
                for (address,) in rows:
                    rcpt = db.cols.open_text("recipients.address", queue_id, address)
                    _event(db, queue_id, at, "deleted", rcpt, detail)
                count += len(rows)
            return count

    def delayed(self, received_before: float, at: float) -> int:
        """A message is marked warned before its warning is queued: a replica doing the same at once skips it."""
        with self._tx() as db:
            rows = db.all(
                "SELECT m.queue_id, r.address, r.detail FROM recipients r JOIN messages m ON m.queue_id = r.queue_id "
                "WHERE r.status = 'queued' AND m.warned = 0 AND m.received_at < ? ORDER BY m.queue_id, r.seq",
                (received_before,),
            )
            waiting: dict[str, list[dict[str, str | None]]] = {}
            for queue_id, address, detail in rows:
                item = {
                    "address": db.cols.open_text("recipients.address", queue_id, address),
                    "status": QUEUED,
                    "dsn": "4.4.7",
                    "diagnostic": db.cols.open_text("recipients.detail", queue_id, detail),
                    "infobip_id": None,
                }
                waiting.setdefault(queue_id, []).append(item)
            count = 0
            for queue_id, items in waiting.items():
                if db.run("UPDATE messages SET warned = 1 WHERE queue_id = ? AND warned = 0", (queue_id,)).rowcount:
                    _queue_bounce(db, queue_id, items, at, action="delayed")
                    count += 1
            return count

    # reading and housekeeping

    def lookup(self, query: str, limit: int) -> list[MessageTrace]:
        query = query.strip()
        with self._read() as db:
            ids = _find(db, query, limit)
            if not ids and "@" in query and not query.startswith("<"):
                ids = _find(db, f"<{query}>", limit)  # a Message-ID typed without its brackets
            return [trace for queue_id in ids if (trace := _trace(db, queue_id)) is not None]

    def rekey(self) -> int:
        """Every value not under the current spool key (an old key's, or one in the clear) sealed again under
        it, with its search key; returns how many rows were rewritten. One transaction: a damaged value
        (SealError) leaves everything as it was. Then the old key can leave spool.old_key_files."""
        with self._tx(durable=True, unlimited=True) as db:
            return sum(_rekey(db, table, row_id, names) for table, (row_id, names) in SENSITIVE.items())

    def prune(self, before: float) -> int:
        """Messages whose bounce is still to go are kept until it has gone."""
        with self._tx(unlimited=True) as db:
            if not self._prune_turn(db):
                return 0
            db.run(
                "CREATE TEMP TABLE gone AS SELECT queue_id FROM messages WHERE received_at < ? AND queue_id NOT IN "
                "(SELECT queue_id FROM bounces WHERE state IN ('pending', 'sending'))",
                (before,),
            )
            for table in ("recipients", "events", "infobip_ids", "bounces", "messages"):
                db.run(f"DELETE FROM {table} WHERE queue_id IN (SELECT queue_id FROM gone)")
            count = int(db.one("SELECT count(*) FROM gone")[0])
            db.run("DROP TABLE gone")
            return count


def _rekey(db: Db, table: str, row_id: str, names: tuple[str, ...]) -> int:
    cols, search = db.cols, SEARCHED.get(table)
    changed = []
    for rid, queue_id, *values in db.all(f"SELECT {row_id}, queue_id, {', '.join(names)} FROM {table}"):
        if all(cols.is_current(value) for value in values):
            continue
        plain = [
            None if v is None else cols.open(f"{table}.{n}", queue_id, v) for n, v in zip(names, values, strict=True)
        ]
        row: list[bytes | str | None] = [
            None if p is None else cols.seal(f"{table}.{n}", queue_id, p) for n, p in zip(names, plain, strict=True)
        ]
        if search is not None:  # the searched value comes first in `names`
            row.append(cols.search(search[1], (plain[0] or b"").decode()))
        changed.append((*row, rid))
    columns = [*names, *([search[0]] if search else [])]
    db.many(f"UPDATE {table} SET {', '.join(f'{c} = ?' for c in columns)} WHERE {row_id} = ?", changed)
    return len(changed)


def _event(db: Db, queue_id: str, at: float, kind: str, address: str | None, detail: str) -> None:
    _events(db, [(queue_id, at, kind, address, detail)])


def _events(db: Db, events: Sequence[tuple[str, float, str, str | None, str]]) -> None:
    """Timeline events (queue id, at, kind, address, detail), in a few statements (Db.insert)."""
    cols = db.cols
    db.insert(
        "events (queue_id, at, kind, address, detail)",
        [
            (
                queue_id,
                at,
                kind,
                None if address is None else cols.seal_text("events.address", queue_id, address),
                cols.seal_text("events.detail", queue_id, detail),
            )
            for queue_id, at, kind, address, detail in events
        ],
    )


def _whole(a: Attempted, m: MessageReceived, taken: dict[tuple[str, str], Attempted]) -> bool:
    """A first attempt that Infobip took whole, as one id: its timeline event is not stored, since _trace
    says it from the recipients' rows; the usual case, so one row a message fewer."""
    return (
        a.attempt == 1
        and len(a.infobip_ids) == 1
        and not (a.deferred or a.dead)
        and all(taken.get((m.queue_id, rcpt)) is a for rcpt in m.recipients)
    )


def _without_known_resumed(db: Db, received: list[MessageReceived], dying: set[str]) -> list[MessageReceived]:
    """`received` less the messages noted again after a restart that the history has already: their rows
    (perhaps under an older key's search keys, which an insert would not meet) stay as they are. But a known
    message with recipients dying in this batch (a dead letter noted again at start) is noted for those it
    has no row for, under any key: its first note may have been lost while another of its notes got in."""
    again = [m.queue_id for m in received if m.resumed]
    if not again:
        return received
    known: set[str] = set()
    for start in range(0, len(again), 500):  # a restart with a big queue notes thousands again at once
        chunk = again[start : start + 500]
        known.update(
            row[0] for row in db.all(f"SELECT queue_id FROM messages WHERE queue_id IN {_marks(len(chunk))}", chunk)
        )
    noted: list[MessageReceived] = []
    for m in received:
        if m.resumed and m.queue_id in known:
            if m.queue_id not in dying:
                continue
            keys = {row[0] for row in db.all("SELECT address_key FROM recipients WHERE queue_id = ?", (m.queue_id,))}
            missing = tuple(r for r in m.recipients if keys.isdisjoint(db.cols.searches(ADDRESS, r)))
            if not missing:
                continue
            m = dataclasses.replace(m, recipients=missing)
        noted.append(m)
    return noted


def _received(db: Db, received: list[MessageReceived], taken: dict[tuple[str, str], Attempted]) -> None:
    """New messages, their recipients `queued`, or `sent` by an attempt in `taken` (the "received" line in
    trace comes from the message's row)."""
    cols = db.cols
    db.insert(
        "messages (queue_id, message_key, message_id, sender, client_ip, received_at, size, bulk_id, headers)",
        [
            (
                m.queue_id,
                cols.search(MESSAGE_ID, m.message_id),
                cols.seal_text("messages.message_id", m.queue_id, m.message_id),
                cols.seal_text("messages.sender", m.queue_id, m.sender),
                cols.seal_text("messages.client_ip", m.queue_id, m.client_ip),
                m.received_at,
                m.size,
                m.bulk_id,
                None if m.headers is None else cols.seal("messages.headers", m.queue_id, m.headers),
            )
            for m in received
        ],
        " ON CONFLICT DO NOTHING",
    )
    rows: dict[tuple[str, str], tuple[Any, ...]] = {}  # one row a recipient: PostgreSQL refuses two in one upsert
    for m in received:
        for rcpt in m.recipients:
            key = cols.search(ADDRESS, rcpt)
            a = taken.get((m.queue_id, rcpt))
            first = rows.get((m.queue_id, key))  # the same address twice (in another case): as the upsert would,
            if first is not None and (a is None or first[3] == SENT):  # the first stays; `sent` after `queued`
                continue  # takes its status, and the address as first written
            address = first[2] if first is not None else cols.seal_text("recipients.address", m.queue_id, rcpt)
            row = (m.queue_id, key, address)
            rows[m.queue_id, key] = (
                (*row, QUEUED, None, m.received_at, None)
                if a is None
                else (*row, SENT, ",".join(a.infobip_ids), a.at, a.at)
            )
    db.insert(  # the message noted twice (the row is there): as _accepted's UPDATE would do, else nothing
        "recipients (queue_id, address_key, address, status, infobip_id, at, accepted_at)",
        list(rows.values()),
        " ON CONFLICT (queue_id, address_key) DO UPDATE SET status = 'sent', infobip_id = excluded.infobip_id, "
        "detail = NULL, at = excluded.at, accepted_at = excluded.accepted_at "
        "WHERE recipients.status = 'queued' AND excluded.status = 'sent'",
    )


def _accepted(db: Db, attempts: list[Attempted], taken: dict[tuple[str, str], Attempted], implied: set[int]) -> None:
    """Every other recipient Infobip took in these attempts: `sent`, with its id (the detail, "Infobip took it
    as <id>", is said by _trace: nothing to store). One statement for the batch (a recipient deferred and then
    taken in the same batch ends `sent` all the same). Each attempt's event, but for those `implied` (_whole)."""
    cols = db.cols
    db.many(
        "UPDATE recipients SET status = 'sent', infobip_id = ?, detail = NULL, at = ?, accepted_at = ? "
        f"WHERE queue_id = ? AND address_key IN {_marks(cols.width)} AND status = 'queued'",
        [
            (",".join(a.infobip_ids), a.at, a.at, a.queue_id, *cols.searches(ADDRESS, rcpt))
            for a in attempts
            for rcpt in a.accepted
            if (a.queue_id, rcpt) not in taken
        ],
    )
    db.insert("infobip_ids", [(i, a.queue_id) for a in attempts for i in a.infobip_ids], " ON CONFLICT DO NOTHING")
    db.insert(
        "events (queue_id, at, kind, detail)",
        [
            (a.queue_id, a.at, "attempt", cols.seal_text("events.detail", a.queue_id, attempt_words(a)))
            for a in attempts
            if id(a) not in implied
        ],
    )


def _failed(db: Db, a: Attempted, bounces_on: bool) -> None:
    """Deferred recipients keep `queued` with the reply; dead ones end failed or expired, and after a 250
    are queued for a bounce in this same transaction."""
    cols, among = db.cols, f"address_key IN {_marks(db.cols.width)}"
    db.many(
        f"UPDATE recipients SET detail = ?, at = ? WHERE queue_id = ? AND {among} AND status = 'queued'",
        [
            (cols.seal_text("recipients.detail", a.queue_id, reply), a.at, a.queue_id, *cols.searches(ADDRESS, rcpt))
            for rcpt, reply in a.deferred.items()
        ],
    )
    bouncing = []
    for rcpt, (status, reason) in a.dead.items():
        changed = db.run(
            f"UPDATE recipients SET status = ?, detail = ?, at = ? WHERE queue_id = ? AND {among} "
            "AND status IN ('queued', 'sent')",
            (
                status,
                cols.seal_text("recipients.detail", a.queue_id, reason),
                a.at,
                a.queue_id,
                *cols.searches(ADDRESS, rcpt),
            ),
        ).rowcount
        if changed and a.bounce and bounces_on:
            dsn = reply_dsn_status(reason, status)
            bouncing.append({"address": rcpt, "status": status, "dsn": dsn, "diagnostic": reason, "infobip_id": None})
    if bouncing:
        _queue_bounce(db, a.queue_id, bouncing, a.at)


def _bounce_items(db: Db, queue_id: str, stored: bytes) -> list[dict[str, str | None]]:
    items: list[dict[str, str | None]] = json.loads(db.cols.open_text("bounces.recipients", queue_id, stored))
    return items


def _queue_bounce(db: Db, queue_id: str, items: list[dict[str, str | None]], at: float, action: str = "failed") -> None:
    """One bounce per message: recipients join a bounce of the message not yet handed to the sender."""
    row = db.one(
        "SELECT id, recipients FROM bounces WHERE queue_id = ? AND action = ? AND state = 'pending'"
        + db.dialect.lock(),
        (queue_id, action),
    )
    if row is not None:
        items = _bounce_items(db, queue_id, row[1]) + items
    stored = db.cols.seal_text("bounces.recipients", queue_id, json.dumps(items))
    if row is None:
        db.run(
            "INSERT INTO bounces (queue_id, action, recipients, created_at, due) VALUES (?, ?, ?, ?, ?)",
            (queue_id, action, stored, at, at),
        )
    else:
        db.run("UPDATE bounces SET recipients = ? WHERE id = ?", (stored, row[0]))


def _owners(db: Db, infobip_ids: Sequence[str]) -> dict[str, str]:
    """The queue id of each of these Infobip ids that is ours, a few hundred to a statement."""
    owners: dict[str, str] = {}
    for start in range(0, len(infobip_ids), 500):
        chunk = infobip_ids[start : start + 500]
        owners.update(
            db.all(f"SELECT infobip_id, queue_id FROM infobip_ids WHERE infobip_id IN {_marks(len(chunk))}", chunk)
        )
    return owners


def _recipient_rows(db: Db, pairs: Sequence[tuple[str, str]]) -> dict[tuple[str, str], list[Any]]:
    """[status, accepted_at] of the recipients named by these (queue id, address key) pairs (those the page
    reports on), by pair. Pairs, not every queue id with every key: a page of 500 made that 250,000 index
    probes. Where replicas share the database the rows are locked, in key order: two replicas taking
    overlapping pages (one pushed, one pulled) wait for each other, and the second sees the first's
    statuses. Only those rows: a replica's history write changing the message's other recipients meanwhile
    is not waited for (nor is it made to wait, which could deadlock)."""
    rows: dict[tuple[str, str], list[Any]] = {}
    for start in range(0, len(pairs), 500):
        chunk = pairs[start : start + 500]
        for queue_id, key, status, accepted_at in db.all(
            f"WITH wanted (queue_id, address_key) AS (VALUES {placeholders(chunk)}) "
            "SELECT r.queue_id, r.address_key, r.status, r.accepted_at FROM wanted JOIN recipients r "
            "ON r.queue_id = wanted.queue_id AND r.address_key = wanted.address_key "
            f"ORDER BY r.queue_id, r.address_key{db.dialect.lock('r')}",
            [value for pair in chunk for value in pair],
        ):
            rows[queue_id, key] = [status, accepted_at]
    return rows


def _apply_report(
    db: Db,
    report: Report,
    queue_id: str | None,
    keys: Sequence[str],
    rows: dict[tuple[str, str], list[Any]],
    source: str,
    at: float,
    bounces_on: bool,
    applied: Applied,
    changed: list[tuple[str, str, bytes, float, str, str]],
    events: list[tuple[str, float, str, str | None, str]],
) -> None:
    """One report (its recipient's search `keys`) against `rows` (_recipient_rows, kept as this page changes
    them): a final report for a recipient without a final status goes to `changed` (the UPDATE's rows); one
    for a recipient already final counts once (the same report pushed and pulled is a duplicate). `events`
    gets the timeline's line."""
    key = next((k for k in keys if (queue_id, k) in rows), None)
    if queue_id is None or key is None:  # not an Infobip id of ours, or our message but not its recipient
        applied.unknown += 1
        return
    row = rows[queue_id, key]
    status, detail = report_status(report), report_detail(report)
    if status is not None and row[0] in FINAL:
        applied.duplicates += 1
        return
    events.append((queue_id, at, "report", report.to, f"{source}: {detail}"))
    if status is None:  # not final (PENDING): noted, nothing changes
        applied.pending += 1
        return
    row[0] = status
    changed.append(
        (status, report.message_id, db.cols.seal_text("recipients.detail", queue_id, detail), at, queue_id, key)
    )
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
    seconds = at - row[1] if row[1] is not None else None
    applied.outcomes.append(Outcome(queue_id, report.to, report.message_id, status, detail, seconds, bounce))


def _track(db: Db, event: Tracked) -> int:
    """1 if `event` is new and about a recipient of ours: a `tracking` event of that recipient."""
    keys = db.cols.searches(ADDRESS, event.address)
    found = db.one(
        "SELECT r.queue_id FROM infobip_ids i JOIN recipients r ON r.queue_id = i.queue_id "
        f"WHERE i.infobip_id = ? AND r.address_key IN {_marks(len(keys))}",
        (event.infobip_id, *keys),
    )
    if found is None:
        return 0
    queue_id, cols = found[0], db.cols
    words = f"{event.kind} {event.detail}".rstrip()
    return db.run(
        "INSERT INTO events (queue_id, at, kind, address, detail, event_id) VALUES (?, ?, 'tracking', ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        (
            queue_id,
            event.at,
            cols.seal_text("events.address", queue_id, event.address),
            cols.seal_text("events.detail", queue_id, words),
            event.event_id or None,
        ),
    ).rowcount


def _claim(claimed_at: float | None) -> tuple[str, tuple[float, ...]]:
    """The condition (and its argument) that a bounce is still under the claim it was handed out with."""
    return ("", ()) if claimed_at is None else (" AND state = 'sending' AND claimed_at = ?", (claimed_at,))


def _bounce_job(
    db: Db,
    bounce_id: int,
    queue_id: str,
    action: str,
    items: bytes,
    attempts: int,
    created: float,
    *,
    claimed_at: float | None = None,
) -> BounceJob:
    cols = db.cols
    row = db.one("SELECT message_id, sender, received_at, headers FROM messages WHERE queue_id = ?", (queue_id,))
    recipients = tuple(
        BounceRecipient(i["address"] or "", i["status"] or "", i["dsn"] or "", i["diagnostic"] or "", i["infobip_id"])
        for i in _bounce_items(db, queue_id, items)
    )
    return BounceJob(
        bounce_id=bounce_id,
        queue_id=queue_id,
        message_id=cols.open_text("messages.message_id", queue_id, row[0]) if row else "",
        sender=cols.open_text("messages.sender", queue_id, row[1]) if row else "",
        received_at=row[2] if row else created,
        headers=cols.open("messages.headers", queue_id, row[3]) if row and row[3] is not None else b"",
        recipients=recipients,
        attempts=attempts,
        created_at=created,
        action=action,
        claimed_at=claimed_at,
    )


def _words(status: str, infobip_id: str | None) -> str:
    """A recipient's detail where none is stored: Infobip took it (and nothing has been said since)."""
    return f"Infobip took it as {infobip_id}" if status == SENT and infobip_id else ""


def _find(db: Db, query: str, limit: int) -> list[str]:
    """Queue ids for a query, newest first: a Message-ID has its angle brackets, an address an @."""
    args: tuple[str, ...]
    if query.startswith("<"):
        args = tuple(db.cols.searches(MESSAGE_ID, query))
        sql = f"SELECT queue_id FROM messages WHERE message_key IN {_marks(len(args))}"
    elif "@" in query:
        args = tuple(db.cols.searches(ADDRESS, query))
        sql = f"SELECT queue_id FROM recipients WHERE address_key IN {_marks(len(args))}"
    else:
        sql = "SELECT CAST(? AS TEXT) UNION SELECT queue_id FROM infobip_ids WHERE infobip_id = ?"
        args = (query, query)
    rows = db.all(
        f"SELECT queue_id FROM messages WHERE queue_id IN ({sql}) ORDER BY received_at DESC LIMIT ?", (*args, limit)
    )
    return [row[0] for row in rows]


def _trace(db: Db, queue_id: str) -> MessageTrace | None:
    cols = db.cols
    row = db.one(
        "SELECT message_id, sender, client_ip, received_at, size, bulk_id FROM messages WHERE queue_id = ?",
        (queue_id,),
    )
    if row is None:
        return None
    message_id, sender, client_ip, received_at, size, bulk = row
    client = cols.open_text("messages.client_ip", queue_id, client_ip)
    rows = db.all(
        "SELECT address, status, infobip_id, detail, at, accepted_at FROM recipients WHERE queue_id = ? ORDER BY seq",
        (queue_id,),
    )
    recipients = [
        RecipientTrace(
            cols.open_text("recipients.address", queue_id, address),
            status,
            infobip_id or None,
            cols.open_text("recipients.detail", queue_id, detail) if detail is not None else _words(status, infobip_id),
            at,
        )
        for address, status, infobip_id, detail, at, _ in rows
    ]
    words = f"from {client}: {len(recipients)} recipient(s), {size} bytes"
    events = [Event(received_at, "received", None, words)] + [
        Event(
            at,
            kind,
            None if address is None else cols.open_text("events.address", queue_id, address),
            cols.open_text("events.detail", queue_id, detail),
        )
        for at, kind, address, detail in db.all(
            "SELECT at, kind, address, detail FROM events WHERE queue_id = ? ORDER BY at, seq", (queue_id,)
        )
    ]
    accepted = [row[5] for row in rows if row[5] is not None]
    if accepted and not any(event.kind == "attempt" for event in events):  # not stored: see _whole
        ids = [row[0] for row in db.all("SELECT infobip_id FROM infobip_ids WHERE queue_id = ?", (queue_id,))]
        taken = Attempted(queue_id, min(accepted), 1, tuple(r.address for r in recipients), tuple(ids))
        implied = Event(taken.at, "attempt", None, attempt_words(taken))
        events = sorted([events[0], implied, *events[1:]], key=lambda event: event.at)  # after "received"
    return MessageTrace(
        queue_id,
        cols.open_text("messages.message_id", queue_id, message_id),
        cols.open_text("messages.sender", queue_id, sender),
        client,
        received_at,
        size,
        bulk,
        recipients,
        events,
    )


@functools.lru_cache(maxsize=256)
def pyformat(sql: str) -> str:
    """A `?` statement in psycopg's `%s` placeholders."""
    return sql.replace("?", "%s")
