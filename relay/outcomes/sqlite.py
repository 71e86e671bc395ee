"""The message history in one embedded SQLite file (WAL; mode 0600, which its -wal and -shm files take).

What it stores and how it answers is relay/outcomes/store.py; here, the connection and its transactions.
Each method is one transaction. `synchronous = FULL` for the durable ones: a report taken from Infobip
(handed out only once) and the bounce it calls for are on disk together, or neither is, before anything
is sent.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from relay.config import Settings
from relay.outcomes.columns import Columns, columns_for
from relay.outcomes.store import Cursor, Db, Dialect, SqlHistory, check_keys, check_layout, create_schema

SQLITE = Dialect(
    seq="seq INTEGER PRIMARY KEY",
    id="id INTEGER PRIMARY KEY",
    real="REAL",
    blob="BLOB",
    locks=False,  # one writer at a time: BEGIN IMMEDIATE takes the database's write lock
    table_exists="SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?",
    row_order="rowid",
    without_rowid=" WITHOUT ROWID",
)


# Result codes of a failure that may pass: busy, locked, out of memory, I/O error, disk full, cannot open,
# locking protocol. Not a read-only file, a constraint or a statement the library refuses: those stay.
PASSING = frozenset({5, 6, 7, 10, 13, 14, 15})
NEVER_PASSING = frozenset({8202, 8458})  # SQLITE_IOERR_DATA, SQLITE_IOERR_CORRUPTFS: damage, not a wait
LOCK_WAIT = 5.0  # seconds at most a statement waits for the file's lock


def history_path(settings: Settings) -> Path:
    """reports.history_path, by default a file beside the spool's directories."""
    return settings.reports.history_path or settings.spool.path / "history.sqlite3"


def connect(path: Path, *, readonly: bool = False, timeout: float = 30.0) -> sqlite3.Connection:
    """Open (and for writing, create with mode 0600) the history file. `timeout`: reports.history_timeout; a
    statement waits for the file's lock LOCK_WAIT seconds at most, since a stop cannot cut a wait short (a
    longer lock is waited out by the writer trying again)."""
    wait = min(timeout, LOCK_WAIT)
    if readonly:
        return sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False, timeout=wait
        )
    os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=wait)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")  # FULL for the transactions that must survive power loss
    db.execute(f"PRAGMA busy_timeout = {round(wait * 1000)}")
    db.execute("PRAGMA secure_delete = ON")  # deleted rows (pruned, or a converted layout 1's) are zeroed, not freed
    return db


class SqliteDb(Db):
    def __init__(self, conn: sqlite3.Connection, cols: Columns) -> None:
        super().__init__(SQLITE, cols)
        self.conn = conn

    def run(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(sql, args)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self.conn.executemany(sql, rows)


class SqliteHistory(SqlHistory):
    """HistoryStore on SQLite. Use from one thread at a time (relay/outcomes/writer.py sees to it)."""

    def __init__(
        self, path: Path, keys: Sequence[bytes] = (), *, readonly: bool = False, timeout: float = 30.0
    ) -> None:
        """`keys`: the spool's (spool.encryption_keys, current first); none: values in the clear. `timeout`:
        reports.history_timeout (see `connect`)."""
        self.path = path
        self.db = connect(path, readonly=readonly, timeout=timeout)
        self._db = SqliteDb(self.db, columns_for(keys))
        try:
            with self._read() if readonly else self._tx() as db:
                if readonly:
                    check_layout(db)
                else:
                    create_schema(db)
                    db.run("UPDATE bounces SET state = 'pending' WHERE state = 'sending'")  # a crash mid-send: again
                check_keys(db)
        except BaseException:
            self.db.close()
            raise

    @contextlib.contextmanager
    def _tx(self, *, durable: bool = False, unlimited: bool = False) -> Iterator[Db]:
        self.db.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")  # not inside a transaction
        with self._begin("BEGIN IMMEDIATE") as db:
            yield db

    def _read(self) -> contextlib.AbstractContextManager[Db]:
        return self._begin("BEGIN")

    @contextlib.contextmanager
    def _begin(self, begin: str) -> Iterator[Db]:
        """A failure inside (COMMIT's own included) is raised as it came: SQLite may have rolled back already
        (a full disk, an I/O error), and a ROLLBACK failing then must not hide the error that says it may pass.
        A COMMIT refused (busy) leaves the transaction open: it is rolled back, or every later BEGIN fails."""
        self.db.execute(begin)
        try:
            yield self._db
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise

    def passing(self, error: Exception) -> bool:
        code = getattr(error, "sqlite_errorcode", None)  # the library's; none on the module's own errors
        return isinstance(code, int) and code & 0xFF in PASSING and code not in NEVER_PASSING

    def close(self) -> None:
        self.db.close()
