"""`relay queue ...`: what waits in the spool, and the verbs that act on it, as Postfix's `mailq`,
`postqueue -f` and `postsuper -d` do. They work on the files whether the relay runs or not.

Every verb that changes something appends one JSON line to `<spool.path>/audit.log`: when, who (the
process user, and SUDO_USER when run through sudo), the verb, and what came of each queue id.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import re
import socket
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay.config import Settings
from relay.core.message import Envelope
from relay.ops import privacy
from relay.outcomes.history import HistoryStore
from relay.outcomes.service import open_store
from relay.outcomes.sqlite import history_path
from relay.outcomes.store import HistoryLayoutError
from relay.store.journal import live_index
from relay.store.rekey import rekey
from relay.store.sealing import MissingKeyError, SealError
from relay.store.spool import FLUSH_REQUEST, LOCK, EntryState, Spool, SpoolLocked, bounce_noted

AUDIT_LOG = "audit.log"
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_age(text: str) -> float:
    """`--older-than`: 90, 90s, 30m, 2h or 1d, in seconds."""
    match = _AGE.match(text.lower())
    if match is None:
        raise ValueError(f"{text!r} is not an age: use seconds or a number with s, m, h or d (e.g. 30m)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True, slots=True)
class Entry:
    queue_id: str
    envelope: Envelope
    state: EntryState
    dead: bool

    @property
    def recipients(self) -> list[str]:
        """Dead: those that died; waiting: those still to deliver."""
        if self.dead:
            return list(self.state.dead)
        return list(self.state.recipients if self.state.recipients is not None else self.envelope.recipients)

    def as_json(self, now: float) -> dict[str, Any]:
        return {
            "queue_id": self.queue_id,
            "dead": self.dead,
            "sender": self.envelope.mail_from,
            "recipients": self.recipients,
            "attempts": self.state.attempts,
            "next_attempt": None if self.dead else _iso(self.state.next_attempt or self.envelope.received_at),
            "received_at": _iso(self.envelope.received_at),
            "age_seconds": round(max(0.0, now - self.envelope.received_at), 1),
            "last_reply": self.state.last_reply or None,
            "reasons": dict(self.state.dead) if self.dead else None,
            "held": self.state.held,
            "size": self.envelope.size,
            "client_ip": self.envelope.client_ip,
            "message_id": self.envelope.message_id,
            "profile": self.envelope.profile,
        }


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds")


def read_entries(spool: Spool, *, dead: bool) -> tuple[list[Entry], list[tuple[str, str]]]:
    """Every readable entry in queue/ (or dead/), and (id, why) for the damaged ones."""
    entries: list[Entry] = []
    damaged: list[tuple[str, str]] = []
    for queue_id in spool.dead_ids() if dead else spool.queued_ids():
        try:
            envelope = spool.read_envelope(queue_id, dead=dead)
            state = spool.read_state(queue_id, dead=dead)
            if dead:
                state.attempts = _dead_attempts(spool, queue_id, state)
        except FileNotFoundError:
            continue  # delivered or deleted while we looked
        except Exception as exc:  # a damaged entry: say so and go on
            damaged.append((queue_id, f"{type(exc).__name__}: {exc}"))
            continue
        entries.append(Entry(queue_id, envelope, state, dead))
    return entries, damaged


def _dead_attempts(spool: Spool, queue_id: str, state: EntryState) -> int:
    """dead/<id>.state does not count attempts; queue/<id>.state does while the message still waits there
    for other recipients. Either way a dead letter was tried at least once."""
    queued = spool.read_state(queue_id).attempts if (spool.queue / f"{queue_id}.msg").exists() else 0
    return max(state.attempts, queued, 1)


def matches(entry: Entry, *, sender: str | None, older_than: float | None, now: float) -> bool:
    """`--sender a@b.example` is one address, `--sender @b.example` a domain; both case-insensitive."""
    if sender is not None:
        address = entry.envelope.mail_from.lower()
        wanted = sender.lower()
        if not (address.endswith(wanted) if wanted.startswith("@") else address == wanted):
            return False
    return older_than is None or now - entry.envelope.received_at >= older_than


def relay_running(spool: Spool) -> bool:
    """Does a relay own this spool now? (Its flock on <spool>/lock; a shared try, released at once.)"""
    try:
        fd = os.open(spool.path / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # closing releases a lock we got
    return False


def audit(spool: Spool, verb: str, outcomes: dict[str, str], **details: Any) -> None:
    """One JSON line in <spool>/audit.log per verb that changed something; a failure to write it is said
    on stderr (the change itself is done by then)."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:  # a uid with no passwd entry (containers)
        user = str(os.geteuid())
    record = {
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "event": "queue_command",
        "verb": verb,
        "user": user,
        "uid": os.geteuid(),
        "sudo_user": os.environ.get("SUDO_USER"),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "relay_running": relay_running(spool),
        "ids": outcomes,
        **details,
    }
    line = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(spool.path / AUDIT_LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        print(f"relay: audit log {spool.path / AUDIT_LOG} not written: {exc.strerror or exc}", file=sys.stderr)


def flush(spool: Spool, ids: list[str]) -> int:
    """No ids: everything, by a request the relay picks up (it owns the .state files while it runs).
    Ids on a stopped relay: each is made due now in its .state, so the next start sends it first."""
    if not ids:
        (spool.path / FLUSH_REQUEST).write_bytes(b"")  # empty: all of them
        count = len(spool.queued_ids())
        print(
            f"flush requested for {count} message(s): a running relay retries them within a second; "
            "a stopped one when it starts"
        )
        audit(spool, "flush", {}, messages=count)
        return 0
    outcomes = {
        queue_id: "due now" if (spool.queue / f"{queue_id}.msg").exists() else "not in queue/" for queue_id in ids
    }
    running = relay_running(spool)
    for queue_id, outcome in outcomes.items():
        if outcome != "due now":
            print(f"{queue_id}: not in queue/ (see relay queue list)", file=sys.stderr)
        elif running:
            outcomes[queue_id] = "flush requested"
        else:
            state = spool.read_state(queue_id)
            state.next_attempt, state.held = 0.0, False
            spool.write_state(queue_id, state)
            print(f"{queue_id}: due now; the relay sends it first when it starts")
    if running and "flush requested" in outcomes.values():
        wanted = [q for q, outcome in outcomes.items() if outcome == "flush requested"]
        with open(spool.path / FLUSH_REQUEST, "a", encoding="ascii") as request:
            request.write("".join(f"{queue_id}\n" for queue_id in wanted))
        for queue_id in wanted:
            print(f"{queue_id}: flush requested; the running relay retries it within a second")
    audit(spool, "flush", outcomes)
    return 0 if all(o != "not in queue/" for o in outcomes.values()) else 1


def delete(spool: Spool, ids: list[str], *, all_dead: bool, settings: Settings | None = None) -> int:
    """Ids: gone from queue/ and dead/, and (with `settings`, a history kept) their waiting recipients `failed`
    in the history, so trace does not say they wait and no delay warning tells the sender they will go.
    `--all-dead`: every dead letter, and nothing still waiting (a message whose other recipients wait in queue/
    keeps waiting)."""
    outcomes: dict[str, str] = {}
    if all_dead:
        for queue_id in spool.dead_ids():
            for suffix in (".msg", ".state"):
                with contextlib.suppress(FileNotFoundError):
                    (spool.dead / f"{queue_id}{suffix}").unlink()
            bounce_noted(spool.dead, queue_id)  # deleted: no bounce
            outcomes[queue_id] = "deleted from dead/"
            print(f"{queue_id}: deleted from dead/")
        print(f"-- {len(outcomes)} dead letter(s) deleted from {spool.dead}")
    for queue_id in ids:
        outcomes[queue_id] = "deleted" if spool.delete(queue_id) else "not found"
        if outcomes[queue_id] == "deleted":
            print(f"{queue_id}: deleted")
        else:
            print(f"{queue_id}: not found", file=sys.stderr)
    audit(spool, "delete", outcomes, all_dead=all_dead)
    gone = [queue_id for queue_id in ids if outcomes[queue_id] == "deleted"]
    if settings is not None and gone:
        _history_deleted(settings, gone)
    return 1 if "not found" in outcomes.values() else 0


def _history_deleted(settings: Settings, queue_ids: list[str]) -> None:
    try:
        store = _history(settings)
        if store is None:
            return
        try:
            count = store.deleted(queue_ids, time.time(), "deleted by the operator (relay queue delete; see audit.log)")
        finally:
            store.close()
    except Exception as exc:  # the spool's files are gone all the same: said, not undone
        print(f"relay: queue delete: the message history was not told: {exc}", file=sys.stderr)
        return
    print(f"message history: {count} waiting recipient(s) marked failed (deleted)")


def requeue(spool: Spool, ids: list[str]) -> int:
    """Back from dead/ for the recipients that died. An id that is not dead is an error, not a reset of
    its retry schedule."""
    outcomes: dict[str, str] = {}
    for queue_id in ids:
        if not (spool.dead / f"{queue_id}.msg").exists():
            waiting = (spool.queue / f"{queue_id}.msg").exists()
            outcomes[queue_id] = "not in dead/" if waiting else "not found"
            why = "not in dead/ (it is waiting in queue/: see relay queue list)" if waiting else "not found"
            print(f"{queue_id}: {why}", file=sys.stderr)
            continue
        try:
            spool.requeue(queue_id)
        except FileNotFoundError:  # deleted while we looked
            outcomes[queue_id] = "not found"
            print(f"{queue_id}: not found", file=sys.stderr)
            continue
        outcomes[queue_id] = "requeued"
        print(f"{queue_id}: requeued")
    if "requeued" in outcomes.values():
        spool.request_flush()
    audit(spool, "requeue", outcomes)
    return 0 if all(outcome == "requeued" for outcome in outcomes.values()) else 1


def _age(seconds: float) -> str:
    whole = max(0, int(seconds))
    for unit, size, above in (("d", 86400, 172800), ("h", 3600, 7200), ("m", 60, 120)):
        if whole >= above:
            return f"{whole // size}{unit}"
    return f"{whole}s"


def list_queue(spool: Spool, *, dead: bool, as_json: bool, sender: str | None, older_than: float | None) -> int:
    """The table ops read (or, with --json, one JSON array for scripts); filters apply to both."""
    now = time.time()
    entries, damaged = read_entries(spool, dead=dead)
    shown = [e for e in entries if matches(e, sender=sender, older_than=older_than, now=now)]
    hasher = privacy.hasher()  # privacy.redact: addresses (and Message-IDs) as keyed hashes
    if as_json:
        rows = [entry.as_json(now) for entry in shown]
        if hasher is not None:
            rows = [{key: hasher.value(key, value) for key, value in row.items()} for row in rows]
        print(json.dumps(rows, indent=2))
        for queue_id, why in damaged:
            print(f"relay: {queue_id}: unreadable: {why}", file=sys.stderr)
        return 0
    status = spool.read_status()
    paused = not dead and status.get("paused") is True
    if paused:
        until = _iso(float(str(status.get("next_probe_at", now))))
        print(f"-- delivery is PAUSED: Infobip is not answering; next probe at {until} ({status.get('last_error')})")
    print(f"{'QUEUE ID':<22} {'AGE':>6} {'TRIES':>5} {'RCPTS':>5} {'NEXT TRY':>8}  {'SENDER':<30} LAST REPLY")
    for entry in shown:
        state = entry.state
        next_try = "-" if dead else ("now" if state.next_attempt <= now else _age(state.next_attempt - now))
        next_try = "paused" if paused else next_try  # nothing goes before a probe succeeds
        reply = " ".join(state.last_reply.split())[:100] or "-"
        sender, reply = (
            (entry.envelope.mail_from, reply)
            if hasher is None
            else (hasher.address(entry.envelope.mail_from), hasher.text(reply))
        )
        print(
            f"{entry.queue_id:<22} {_age(now - entry.envelope.received_at):>6} {state.attempts:>5} "
            f"{len(entry.recipients):>5} {next_try:>8}  {sender[:30]:<30} {reply}"
        )
    for queue_id, why in damaged:
        print(f"{queue_id:<22} unreadable: {why}")
    filtered = f" ({len(shown)} shown)" if len(shown) != len(entries) else ""
    print(f"-- {len(entries) + len(damaged)} message(s) in {'dead/' if dead else 'queue/'} of {spool.path}{filtered}")
    if not dead and (in_journal := len(live_index(spool.journal_dir, sealer=spool.sealer))):
        print(
            f"-- and {in_journal} in journal/: in their first attempt now, or left by a crash "
            "(the relay moves those to queue/ when it starts)"
        )
    return 0


def run(spool: Spool, verb: str, options: Any, settings: Settings | None = None) -> int:
    """`relay queue <verb>` with argparse's options; exit status 0, or 1 when an id was not found."""
    if verb == "list":
        try:
            older_than = parse_age(options.older_than) if options.older_than is not None else None
        except ValueError as exc:
            print(f"relay: --older-than: {exc}", file=sys.stderr)
            return 2
        return list_queue(spool, dead=options.dead, as_json=options.json, sender=options.sender, older_than=older_than)
    if verb == "flush":
        return flush(spool, options.ids)
    if verb == "delete":
        if not options.ids and not options.all_dead:
            print("relay: queue delete: give queue ids, or --all-dead", file=sys.stderr)
            return 2
        return delete(spool, options.ids, all_dead=options.all_dead, settings=settings)
    if verb == "rekey":
        return rekey_spool(spool)
    return requeue(spool, options.ids)


def rekey_spool(spool: Spool) -> int:
    """`relay queue rekey`: everything waiting sealed again under the current key, on a stopped relay (it
    rewrites files a running relay reads); then the old key can leave spool.old_key_files."""
    if spool.sealer is None:
        print("relay: queue rekey: spool.encryption_key_file is not set", file=sys.stderr)
        return 2
    try:
        spool.lock()
    except SpoolLocked:
        print("relay: queue rekey: a relay is running on this spool; stop it first", file=sys.stderr)
        return 1
    except MissingKeyError as exc:
        print(f"relay: config error: {exc}", file=sys.stderr)
        return 2
    try:
        result = rekey(spool)
    finally:
        spool.unlock()
    for problem in result.damaged:
        print(f"relay: queue rekey: left as it is (damaged): {problem}", file=sys.stderr)
    print(
        f"rekeyed to key id {spool.sealer.current_id}: {result.rewritten} file(s) rewritten, "
        f"{result.from_journal} message(s) moved from journal/ to queue/, {result.unchanged} already under it"
    )
    audit(spool, "rekey", {}, key_id=spool.sealer.current_id, rewritten=result.rewritten, damaged=len(result.damaged))
    return 1 if result.damaged else 0


def rekey_history(settings: Settings) -> int:
    """`relay queue rekey`, second half: the message history's sealed columns (relay/outcomes/store.py)
    under the current key too, so the old key can leave spool.old_key_files for them as well."""
    try:
        store = _history(settings)
    except (HistoryLayoutError, MissingKeyError) as exc:
        print(f"relay: queue rekey: the message history: {exc}", file=sys.stderr)
        return 1
    if store is None:
        return 0  # none kept, or none written yet: nothing under any key
    try:
        rewritten = store.rekey()
    except SealError as exc:
        print(f"relay: queue rekey: the message history was left as it is (damaged): {exc}", file=sys.stderr)
        return 1
    finally:
        store.close()
    print(f"message history: {rewritten} row(s) sealed again under the current key")
    return 0


def _history(settings: Settings) -> HistoryStore | None:
    """The message history, if one is kept and has been written."""
    url = settings.reports.history_url.get_secret_value()
    if not (settings.reports.enabled or settings.bounces.enabled or url):
        return None
    if not url and not history_path(settings).exists():
        return None
    return open_store(settings)
