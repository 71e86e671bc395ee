"""`relay queue handoff --to HOST:PORT`: a replica leaving for good sends every waiting message, with its
original envelope and bytes, to another relay over plain SMTP (that relay's normal durable path: its 250
is what lets us delete our copy), so the replica's volume can be deleted without losing mail.

A stopped relay's spool: the command holds the spool lock (no relay can start meanwhile) and sends from
queue/. A running relay's: the command leaves a request in the spool and the relay does it (relay/cluster/
handoff.py), taking each message out of its lane's queue first, so no message goes both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from relay.store.journal import live_index
from relay.store.spool import EntryState, Spool, SpoolLocked

REQUEST = "handoff-request.json"  # in spool.path: {"id": ..., "to": "host:port", "deadline": epoch seconds}


def result_path(spool: Spool, request_id: str) -> Path:
    return spool.path / f"handoff-result-{request_id}.json"


def write_json(path: Path, value: dict[str, object]) -> None:
    """Atomically (the other process polls for it): a temporary name, then a rename."""
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    temporary.write_text(json.dumps(value), encoding="utf-8")
    os.replace(temporary, path)


def parse_target(target: str) -> tuple[str, int]:
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--to {target!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class Summary:
    """What a hand-off did: messages the other relay took whole, and what is still here (and why)."""

    sent: int = 0
    kept: dict[str, str] = field(default_factory=dict)  # queue id -> the other relay's last reply

    def as_dict(self) -> dict[str, object]:
        return {"sent": self.sent, "kept": len(self.kept), "errors": dict(list(self.kept.items())[:20])}


class HandoffClient:
    """One SMTP connection to the other relay, opened on first use and again after it drops."""

    def __init__(self, target: str, local_hostname: str, timeout: float = 60.0) -> None:
        self.host, self.port = parse_target(target)
        self.local_hostname = local_hostname
        self.timeout = timeout
        self._smtp: aiosmtplib.SMTP | None = None

    async def send(self, mail_from: str, recipients: tuple[str, ...], data: bytes) -> tuple[set[str], str]:
        """The recipients the other relay took (all of them, some, or none) and its last reply."""
        try:
            smtp = await self._connected()
            refused, reply = await smtp.sendmail(mail_from, list(recipients), data)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            await self._reset()
            return set(), "; ".join(f"{e.code} {e.message}" for e in exc.recipients)
        except aiosmtplib.SMTPResponseException as exc:
            if exc.code == 421:
                await self.close()
            else:
                await self._reset()
            return set(), f"{exc.code} {exc.message}"
        except (aiosmtplib.SMTPException, OSError) as exc:
            await self.close()
            return set(), f"{type(exc).__name__}: {exc}"
        return set(recipients) - set(refused), reply

    async def _connected(self) -> aiosmtplib.SMTP:
        if self._smtp is None or not self._smtp.is_connected:
            self._smtp = aiosmtplib.SMTP(
                hostname=self.host,
                port=self.port,
                local_hostname=self.local_hostname,
                timeout=self.timeout,
                start_tls=False,  # relay to relay inside the cluster's network, as the apps send
            )
            await self._smtp.connect()
        return self._smtp

    async def _reset(self) -> None:
        if self._smtp is not None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await self._smtp.rset()

    async def close(self) -> None:
        smtp, self._smtp = self._smtp, None
        if smtp is not None:
            with contextlib.suppress(aiosmtplib.SMTPException, OSError):
                await smtp.quit()
            smtp.close()


async def hand_off_stopped(spool: Spool, target: str, hostname: str, deadline: float) -> Summary:
    """A stopped relay: the caller holds the spool lock. Each message in queue/ goes to `target`; on its
    250 our copy is deleted; a partial acceptance leaves only the refused recipients here."""
    client = HandoffClient(target, hostname)
    summary = Summary()
    try:
        for queue_id in await asyncio.to_thread(spool.queued_ids):
            if time.time() > deadline:
                summary.kept[queue_id] = "deadline passed"
                continue
            try:
                envelope, data = await asyncio.to_thread(spool.read, queue_id)
                state = await asyncio.to_thread(spool.read_state, queue_id)
            except FileNotFoundError:
                continue
            pending = tuple(state.recipients or envelope.recipients)
            taken, reply = await client.send(envelope.mail_from, pending, data)
            if taken >= set(pending):
                await asyncio.to_thread(spool.remove, queue_id)
                summary.sent += 1
                continue
            summary.kept[queue_id] = reply
            if taken:
                left = [r for r in pending if r not in taken]
                kept = EntryState(state.attempts, state.next_attempt, left, reply, held=state.held)
                await asyncio.to_thread(spool.write_state, queue_id, kept)
    finally:
        await client.close()
    return summary


async def request_running(spool: Spool, target: str, timeout: float) -> dict[str, object] | None:
    """A running relay: ask it (a request file it polls for) and wait for its result, or None in time."""
    request_id = secrets.token_hex(8)
    deadline = time.time() + timeout
    write_json(spool.path / REQUEST, {"id": request_id, "to": target, "deadline": deadline})
    result = result_path(spool, request_id)
    while time.time() < deadline + 5.0:
        with contextlib.suppress(FileNotFoundError, ValueError):
            found: dict[str, object] = json.loads(result.read_text(encoding="utf-8"))
            result.unlink()
            return found
        await asyncio.sleep(0.1)
    with contextlib.suppress(FileNotFoundError):  # not picked up: no relay should act on it later
        (spool.path / REQUEST).unlink()
    return None


def run_handoff(spool: Spool, target: str, hostname: str, timeout: float) -> int:
    """The CLI verb: a stopped relay's spool directly, a running one's through the relay. Exit status 0
    when nothing is left waiting here, 1 otherwise (the preStop hook's log says what stayed and why)."""
    parse_target(target)
    try:
        spool.lock()
    except SpoolLocked:
        found = asyncio.run(request_running(spool, target, timeout))
        if found is None:
            print(f"relay: the running relay did not answer the hand-off request within {timeout:.0f} s")
            return 1
        print(f"handed off {found['sent']} message(s) to {target}; {found['left']} still waiting here")
        errors = found.get("errors")
        for queue_id, reply in (errors if isinstance(errors, dict) else {}).items():
            print(f"{queue_id}: kept: {reply}")
        return 0 if found["left"] == 0 else 1
    try:
        summary = asyncio.run(hand_off_stopped(spool, target, hostname, time.time() + timeout))
        in_journal = len(live_index(spool.journal_dir, sealer=spool.sealer))
    finally:
        spool.unlock()
    print(f"handed off {summary.sent} message(s) to {target}; {len(summary.kept)} still waiting here")
    for queue_id, reply in summary.kept.items():
        print(f"{queue_id}: kept: {reply}")
    if in_journal:
        print(f"{in_journal} message(s) in journal/ (left by a crash): start the relay and hand off again")
    return 0 if not summary.kept and not in_journal else 1
