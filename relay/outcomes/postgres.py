"""The message history on PostgreSQL (`[reports] history_url`), one database for every replica.

What it stores and how it answers is relay/outcomes/store.py, shared with SQLite, so `relay trace` and
GET /messages on any replica see every replica's messages. Here: the connection (psycopg 3, blocking, on
the history's own thread), its transactions, and what only several replicas need. What SQLite got from
being one writer is taken here with row locks: a report or a bounce claimed by one replica is not claimed
again by another, and a lease row says which replica polls reports.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from relay.outcomes.columns import Columns, columns_for
from relay.outcomes.store import SENDING_STALE, Cursor, Db, Dialect, SqlHistory, check_keys, create_schema, pyformat

__all__ = ["PRUNE_LOCK", "SENDING_STALE", "PostgresHistory"]

SCHEMA_LOCK = 0x72656C6179  # pg_advisory_xact_lock key ("relay"): replicas starting at once create it in turn
PRUNE_LOCK = SCHEMA_LOCK + 1
POSTGRES = Dialect(
    seq="seq BIGINT GENERATED ALWAYS AS IDENTITY",
    id="id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
    real="DOUBLE PRECISION",
    blob="BYTEA",
    locks=True,
    table_exists="SELECT to_regclass(?::text)",
    row_order="seq",
    rename_index="ALTER INDEX IF EXISTS {old} RENAME TO {new}",
)

Conn = psycopg.Connection[tuple[Any, ...]]
DEFAULT_TIMEOUT = 30.0  # reports.history_timeout's default
# connection exception, insufficient resources, query canceled (statement_timeout), admin or crash shutdown,
# cannot connect now, idle session timeout, serialization failure, deadlock, lock not available
PASSING_SQLSTATES = ("08", "53", "57014", "57P01", "57P02", "57P03", "57P05", "40001", "40P01", "55P03")


def connection_params(url: str, timeout: float) -> dict[str, Any]:
    """The URL's parameters, and what makes a server or a network that stops answering an error within about
    `timeout` seconds rather than a history thread blocked for ever: the statement timeout (set once connected)
    covers a server that is slow or waits for a lock; TCP keepalives and tcp_user_timeout a silent network.
    A parameter the URL sets itself is kept."""
    params: dict[str, Any] = {**conninfo_to_dict(url), "autocommit": True, "application_name": "relay-history"}
    idle = max(1, round(timeout / 3))
    defaults = {
        "connect_timeout": 10,
        "keepalives": 1,
        "keepalives_idle": idle,
        "keepalives_interval": idle,
        "keepalives_count": 2,
        "tcp_user_timeout": round(max(timeout, 30.0) * 1000),  # a server busy reading counts too: not too short
    }
    return {**defaults, **params}


class PostgresDb(Db):
    def __init__(self, conn: Conn, cols: Columns) -> None:
        super().__init__(POSTGRES, cols)
        self.conn = conn

    def run(self, sql: str, args: Sequence[Any] = ()) -> Cursor:
        return self.conn.execute(pyformat(sql), args)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            with self.conn.cursor() as cursor:
                cursor.executemany(pyformat(sql), rows)


class PostgresHistory(SqlHistory):
    """HistoryStore on PostgreSQL. One connection, used from one thread (relay/outcomes/writer.py)."""

    def __init__(
        self, url: str, keys: Sequence[bytes] = (), *, readonly: bool = False, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        """`keys`: the spool's (spool.encryption_keys, current first); none: values in the clear. `readonly`
        (`relay trace`): an older relay's history is refused, not converted. `timeout`: reports.history_timeout."""
        self._url = url  # a secret (it may carry the password): never logged
        self._timeout = timeout
        self._cols = columns_for(keys)
        self._convert = not readonly
        self._meta: dict[str, str] = {}  # what meta() answered: kept if the tables must be made again
        self.conn = self._connect()

    def _connect(self, *, schema: bool = True) -> Conn:
        """Connect and create the schema if missing; the advisory lock makes replicas starting together take
        turns. Not on a reconnect that finds the tables: waiting on the lock has no time limit."""
        conn = psycopg.connect(**connection_params(self._url, self._timeout))
        self._db = PostgresDb(conn, self._cols)
        try:
            conn.execute("SELECT set_config('statement_timeout', %s, false)", (f"{round(self._timeout * 1000)}ms",))
            if not schema and conn.execute("SELECT to_regclass('messages')").fetchone() != (None,):
                return conn  # (a database that came back empty, from a restore say, gets its tables again)
            with conn.transaction():
                # converting an older layout, or waiting for the replica that does, may take longer
                conn.execute("SET LOCAL statement_timeout = 0")
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
                create_schema(self._db, convert=self._convert)
                check_keys(self._db)
                for key, value in self._meta.items():  # this process's instance id and push token stand
                    self._db.run("INSERT INTO meta VALUES (?, ?) ON CONFLICT DO NOTHING", (key, value))
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _tx(self, *, durable: bool = False, unlimited: bool = False) -> Iterator[Db]:
        """Not `durable`: the commit does not wait for the WAL flush (as SQLite's NORMAL, safe from our crash,
        not the server's); durable ones flush it, with everything before them."""
        try:
            if self.conn.closed:  # the server restarted or the connection broke: the call that found out failed
                # (history_write_failed, say); this one starts on a fresh connection
                self.conn = self._connect(schema=False)
            with self.conn.transaction():
                if not durable:
                    self.conn.execute("SET LOCAL synchronous_commit = off")
                if unlimited:
                    self.conn.execute("SET LOCAL statement_timeout = 0")
                yield self._db
        except psycopg.Error as exc:
            # whether the connection was lost, said now, on this thread: by the time `passing` asks, a later call
            # may have reconnected
            lost = exc.sqlstate is None and bool(self.conn.closed or self.conn.broken)
            setattr(exc, "connection_lost", lost)  # noqa: B010
            raise

    def meta(self, key: str, default: str) -> str:
        self._meta[key] = value = super().meta(key, default)
        return value

    def _prune_turn(self, db: Db) -> bool:
        """Every replica prunes hourly: one at a time does (the others find the lock taken and skip), so their
        deletes never deadlock."""
        return bool(db.one("SELECT pg_try_advisory_xact_lock(?)", (PRUNE_LOCK,))[0])

    def passing(self, error: Exception) -> bool:
        """A connection lost or not made (libpq gives no code for either, so a password refused at a reconnect
        counts too), a statement cancelled (history_timeout), a server shutting down or short of resources, a
        deadlock, a serialization failure or a lock not available, by SQLSTATE. Not what the server or the
        client refuses (data, SQL, limits): that stays."""
        if not isinstance(error, psycopg.Error):
            return False
        if error.sqlstate is None:  # the client's: the connection lost or not made (_tx says which), or a refusal
            return bool(getattr(error, "connection_lost", False))
        return error.sqlstate.startswith(PASSING_SQLSTATES)

    def close(self) -> None:
        self.conn.close()

    def poll_lease(self, holder: str, seconds: float) -> bool:
        """Take or renew the report poller's lease: True while `holder` is the one replica that polls.
        The database's clock decides expiry, so replicas' clocks need not agree."""
        with self._tx() as db:
            row = db.one(
                "INSERT INTO report_lease VALUES ('reports', ?, extract(epoch FROM clock_timestamp()) + ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, expires = excluded.expires "
                "WHERE report_lease.holder = excluded.holder "
                "OR report_lease.expires < extract(epoch FROM clock_timestamp()) "
                "RETURNING holder",
                (holder, seconds),
            )
            return row is not None
