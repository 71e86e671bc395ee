"""A history of layout 1 (written by the relay before its columns were sealed) becomes layout 2, in place.

Layout 1 kept addresses, Message-IDs, client addresses and diagnostics as plain text and searched by value;
layout 2 stores each as a tagged (and, with a spool key, sealed) value beside a search key
(relay/outcomes/columns.py). Refusing the old file would drop the history and, worse, bounces still waiting
in its outbox, so the relay that opens it for writing converts it: in the caller's transaction (all or
nothing, and on PostgreSQL under the schema lock, so one replica does it), table by table, a batch of rows
at a time. The old tables are renamed aside, read in their row order, written through the same codec as
new rows, then dropped. Layout 1's report poller lease (`poller`) is dropped too: a replica of the old
relay still running on the converted database then fails to take the lease, rather than fetching reports it
could no longer store (Infobip hands each out once); its other history writes fail until it is upgraded.
A bounce claimed ('sending') keeps its claim where layout 1 recorded its time (PostgreSQL), so it is offered
again only once stale; SQLite's layout 1 did not, and its single relay gives claims back at start-up anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from relay.outcomes.columns import ADDRESS, MESSAGE_ID, Columns

if TYPE_CHECKING:
    from relay.outcomes.store import Db

BATCH = 1000
TABLES = ("messages", "recipients", "infobip_ids", "events", "bounces")
# Layout 1's own indexes (dropped with their tables' new names in mind: layout 2 reuses some names).
INDEXES = (
    "messages_message_id",
    "messages_received_at",
    "recipients_key",
    "recipients_address",
    "recipients_waiting",
    "recipients_queued",
    "infobip_ids_queue_id",
    "events_queue_id",
    "bounces_due",
    "bounces_queue_id",
)
Row = Sequence[Any]


def migrate_layout_1(db: Db, create: Callable[[], None]) -> None:
    """Layout 1's rows into layout 2's tables; `create` makes layout 2's tables (meta is kept as it is, and
    the caller records the new layout in it)."""
    present = [t for t in TABLES if db.has_table(t)]
    for name in INDEXES:
        db.run(f"DROP INDEX IF EXISTS {name}")
    for table in present:
        db.run(f"ALTER TABLE {table} RENAME TO v1_{table}")
        if db.dialect.rename_index:  # PostgreSQL keeps a renamed table's primary key index under its old name
            db.run(db.dialect.rename_index.format(old=f"{table}_pkey", new=f"v1_{table}_pkey"))
    db.run("DROP TABLE IF EXISTS poller")
    create()
    cols = db.cols
    for table in present:
        insert, convert = _COPIES[table]
        columns = _COLUMNS[table]
        if table == "bounces" and "claimed_at" not in _columns_of(db, "v1_bounces"):  # SQLite's layout 1
            columns = (*columns[:-1], "NULL")
        for rows in _batches(db, table, columns):
            db.many(insert, [convert(cols, row) for row in rows])
        db.run(f"DROP TABLE v1_{table}")


def _columns_of(db: Db, table: str) -> set[str]:
    cursor: Any = db.run(f"SELECT * FROM {table} LIMIT 0")
    return {column[0] for column in cursor.description}


def _batches(db: Db, table: str, columns: Sequence[str]) -> Iterator[list[Row]]:
    """The old table's rows in the order they were written, BATCH at a time, each batch found by an index
    from where the last one ended (not OFFSET, which reads every row before it again: quadratic)."""
    order = {"messages": "queue_id", "infobip_ids": "infobip_id", "bounces": "id"}.get(table, db.dialect.row_order)
    if order == "seq":  # PostgreSQL's layout 1 had no index on its row numbers
        db.run(f"CREATE INDEX v1_{table}_seq ON v1_{table} (seq)")
    select = f"SELECT {order}, {', '.join(columns)} FROM v1_{table}"
    rows = db.all(f"{select} ORDER BY {order} LIMIT ?", (BATCH,))
    while rows:
        yield [row[1:] for row in rows]
        rows = db.all(f"{select} WHERE {order} > ? ORDER BY {order} LIMIT ?", (rows[-1][0], BATCH))


def _text(cols: Columns, column: str, queue_id: str, value: str | None) -> bytes | None:
    return None if not value else cols.seal_text(column, queue_id, value)


def _message(cols: Columns, row: Row) -> Row:
    queue_id, message_id, sender, client_ip, received_at, size, bulk_id, headers, warned = row
    return (
        queue_id,
        cols.search(MESSAGE_ID, message_id),
        cols.seal_text("messages.message_id", queue_id, message_id),
        cols.seal_text("messages.sender", queue_id, sender),
        cols.seal_text("messages.client_ip", queue_id, client_ip),
        received_at,
        size,
        bulk_id,
        None if headers is None else cols.seal("messages.headers", queue_id, bytes(headers)),
        warned or 0,
    )


def _recipient(cols: Columns, row: Row) -> Row:
    queue_id, address, status, infobip_id, detail, at, accepted_at = row
    return (
        queue_id,
        cols.search(ADDRESS, address),
        cols.seal_text("recipients.address", queue_id, address),
        status,
        infobip_id,
        _text(cols, "recipients.detail", queue_id, detail),
        at,
        accepted_at,
    )


def _event(cols: Columns, row: Row) -> Row:
    queue_id, at, kind, address, detail = row
    address = None if address is None else cols.seal_text("events.address", queue_id, address)
    return (queue_id, at, kind, address, cols.seal_text("events.detail", queue_id, detail or ""))


def _bounce(cols: Columns, row: Row) -> Row:
    queue_id, action, recipients, created_at, due, attempts, state, last_error, done_at, claimed_at = row
    if state == "sending" and claimed_at is None:  # claimed by the relay that stopped, and no time: offer it again
        state = "pending"
    return (
        queue_id,
        action,
        cols.seal_text("bounces.recipients", queue_id, recipients),
        created_at,
        due,
        attempts,
        state,  # a claim with its time stands (PostgreSQL): offered again once stale (SENDING_STALE)
        _text(cols, "bounces.last_error", queue_id, last_error),
        done_at,
        claimed_at,
    )


_COLUMNS = {
    "messages": (
        "queue_id",
        "message_id",
        "sender",
        "client_ip",
        "received_at",
        "size",
        "bulk_id",
        "headers",
        "warned",
    ),
    "recipients": ("queue_id", "address", "status", "infobip_id", "detail", "at", "accepted_at"),
    "infobip_ids": ("infobip_id", "queue_id"),
    "events": ("queue_id", "at", "kind", "address", "detail"),
    "bounces": (
        "queue_id",
        "action",
        "recipients",
        "created_at",
        "due",
        "attempts",
        "state",
        "last_error",
        "done_at",
        "claimed_at",  # PostgreSQL's layout 1 only: NULL on SQLite's
    ),
}
_COPIES: dict[str, tuple[str, Callable[[Columns, Row], Row]]] = {
    "messages": (
        "INSERT INTO messages (queue_id, message_key, message_id, sender, client_ip, received_at, size, bulk_id, "
        "headers, warned) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        _message,
    ),
    "recipients": (
        "INSERT INTO recipients (queue_id, address_key, address, status, infobip_id, detail, at, accepted_at) "
        "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        _recipient,
    ),
    "infobip_ids": ("INSERT INTO infobip_ids VALUES (?, ?) ON CONFLICT DO NOTHING", lambda _, row: tuple(row)),
    "events": ("INSERT INTO events (queue_id, at, kind, address, detail) VALUES (?, ?, ?, ?, ?)", _event),
    "bounces": (
        "INSERT INTO bounces (queue_id, action, recipients, created_at, due, attempts, state, last_error, done_at, "
        "claimed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        _bounce,
    ),
}
