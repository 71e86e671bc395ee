"""A message's story for people (`relay trace`) and for programs (`--json`, GET /messages?q=)."""

from __future__ import annotations

import json
import sqlite3
import sys
from datetime import UTC, datetime
from typing import Any

from relay.config import Settings
from relay.outcomes.history import MessageTrace
from relay.outcomes.sqlite import SqliteHistory, history_path
from relay.outcomes.store import UNREADABLE

SHOWN = 50  # messages a lookup shows, newest first (one more is asked for, to say that there were more)
_KINDS = {"received": "received", "attempt": "attempt", "report": "report", "tracking": "tracking", "bounce": "bounce"}


def iso(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds")


def as_json(trace: MessageTrace) -> dict[str, Any]:
    """One message as JSON: the keys the README promises, then the timeline."""
    return {
        "queue_id": trace.queue_id,
        "message_id": trace.message_id,
        "sender": trace.sender,
        "client_ip": trace.client_ip,
        "received_at": iso(trace.received_at),
        "size": trace.size,
        "bulk_id": trace.bulk_id,
        "recipients": [
            {"address": r.address, "status": r.status, "infobip_id": r.infobip_id, "detail": r.detail, "at": iso(r.at)}
            for r in trace.recipients
        ],
        "events": [{"at": iso(e.at), "kind": e.kind, "recipient": e.address, "detail": e.detail} for e in trace.events],
    }


def in_words(trace: MessageTrace) -> str:
    """The timeline in plain words, oldest first, then each recipient's status now."""
    lines = [f"message {trace.queue_id}  Message-ID: {trace.message_id or '-'}", f"  from <{trace.sender}>"]
    for event in trace.events:
        who = f" {event.address}:" if event.address else ""
        lines.append(f"  {iso(event.at)}  {_KINDS.get(event.kind, event.kind):<8}{who} {event.detail}")
    if trace.bulk_id is None:
        lines.append("  (the app set its own X-IB-Bulk-Id or X-IB-Notify-Url: its reports are the app's, not polled)")
    lines.append("  recipients now:")
    for r in trace.recipients:
        infobip = f" [Infobip {r.infobip_id}]" if r.infobip_id else ""
        lines.append(f"    {r.address:<40} {r.status:<9}{infobip} {r.detail}".rstrip())
    return "\n".join(lines)


def trace_command(settings: Settings, query: str, *, as_lines: bool) -> int:
    """`relay trace [--json] QUERY`: read-only, beside a running relay (SQLite's WAL lets both); with
    `history_url`, the PostgreSQL history every replica shares. An empty query is a usage error (2), as
    GET /messages?q= answers 400: it is not a message that was not found."""
    if not query.strip():
        print(
            "relay trace: the query is empty; give a queue id, an Infobip id, a <Message-ID> or an address",
            file=sys.stderr,
        )
        return 2
    if url := settings.reports.history_url.get_secret_value():
        return _print(_postgres_lookup(url, query, settings), query, as_lines=as_lines)
    path = history_path(settings)
    if not path.is_file():
        print(f"relay: no message history at {path} (it is kept while [reports] or [bounces] is on)", file=sys.stderr)
        return 1
    try:
        store = SqliteHistory(path, settings.spool.encryption_keys, readonly=True)
        try:
            found = store.lookup(query, SHOWN + 1)
        finally:
            store.close()
    except (sqlite3.Error, *UNREADABLE) as exc:  # a wrong spool key, a damaged value, an older layout
        print(f"relay: cannot read the message history at {path}: {exc}", file=sys.stderr)
        return 1
    return _print(found, query, as_lines=as_lines)


def _postgres_lookup(url: str, query: str, settings: Settings) -> list[MessageTrace] | None:
    """None when the database cannot be reached or read (said on stderr, without the URL: a secret)."""
    import psycopg

    from relay.outcomes.postgres import PostgresHistory

    try:
        keys, timeout = settings.spool.encryption_keys, settings.reports.history_timeout
        store = PostgresHistory(url, keys, readonly=True, timeout=timeout)
        try:
            return store.lookup(query, SHOWN + 1)
        finally:
            store.close()
    except (psycopg.Error, *UNREADABLE) as exc:
        print(f"relay: cannot read the message history in PostgreSQL (history_url): {exc}", file=sys.stderr)
        return None


def _print(found: list[MessageTrace] | None, query: str, *, as_lines: bool) -> int:
    if found is None:
        return 1
    if not found:
        print(f"relay: no message matches {query!r} (queue id, Infobip id, <Message-ID> or address)", file=sys.stderr)
        return 1
    for trace in found[:SHOWN]:
        print(json.dumps(as_json(trace)) if as_lines else in_words(trace) + "\n")
    if len(found) > SHOWN:  # on stderr: --json's lines stay one message each
        print(f"relay trace: more than {SHOWN} messages match; the {SHOWN} newest are shown", file=sys.stderr)
    return 0
