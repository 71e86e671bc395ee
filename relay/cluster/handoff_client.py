"""`relay queue handoff --to HOST:PORT`: a replica leaving for good sends every waiting message, with its
original envelope and bytes, to another relay over plain SMTP (that relay's normal durable path: its 250
is what lets us delete our copy), so the replica's volume can be deleted without losing mail.

A stopped relay's spool: the command holds the spool lock (no relay can start meanwhile), moves what a
crash left in journal/ to queue/ (as start-up would take it) and sends from queue/. A running relay's: the
command leaves a request in the spool and the relay does it (relay/cluster/handoff.py), taking each message
out of its lane's queue first, so no message goes both ways. Dead letters stay: they are not waiting, and
Infobip refused them for good (`relay queue requeue` first to send one on).

Handing off to this relay itself would take each message back in under a new queue id, again and again
until the deadline: a --to that is this relay's own listener is refused (exit status 2). One spool has one
relay (the spool lock), so "the same spool" is the same relay. Not detectable: a load-balanced address that
routes back to this replica (Kubernetes takes a terminating Pod out of its Service first).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import secrets
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiosmtplib

from relay.config import ListenSettings
from relay.store.journal import promote_journal
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


def _addresses(host: str) -> set[str]:
    try:
        return {str(info[4][0]).split("%")[0] for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)}
    except (socket.gaierror, UnicodeError):
        return set()  # the hand-off's connect will say what is wrong with it


def _on_this_host(address: str) -> bool:
    """An address this machine answers on: loopback, or one a socket can be bound to."""
    ip = ipaddress.ip_address(address)
    if ip.is_loopback or ip.is_unspecified:
        return True
    with socket.socket(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError:
            return False
    return True


def own_listener(target: str, listen: ListenSettings) -> str | None:
    """Why `target` is this relay's own SMTP listener, or None: its port, on listen.host (or, listening on
    every address, on any address of this host)."""
    host, port = parse_target(target)
    if listen.port == 0 or port != listen.port:
        return None
    mine = None if listen.host in ("", "0.0.0.0", "::") else _addresses(listen.host)
    for address in _addresses(host):
        if (address in mine) if mine is not None else _on_this_host(address):
            return (
                f"--to {target} is this relay's own listener ({listen.host}:{listen.port}): hand off to another relay"
            )
    return None


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


def run_handoff(spool: Spool, target: str, listen: ListenSettings, timeout: float) -> int:
    """The CLI verb: a stopped relay's spool directly, a running one's through the relay. Exit status 0
    when nothing is left waiting here, 1 otherwise (the preStop hook's log says what stayed and why), 2 for
    a --to that cannot be right (not HOST:PORT, or this relay itself), before anything is touched."""
    try:
        refusal = own_listener(target, listen)
    except ValueError as exc:
        refusal = str(exc)
    if refusal is not None:
        print(f"relay: {refusal}", file=sys.stderr)
        return 2
    try:
        spool.lock()
    except SpoolLocked:
        return _report_running(asyncio.run(request_running(spool, target, timeout)), spool, target, timeout)
    try:
        promoted, _ = promote_journal(spool)  # damaged records are in damaged/, as at start-up
        summary = asyncio.run(hand_off_stopped(spool, target, listen.hostname, time.time() + timeout))
    finally:
        spool.unlock()
    if promoted:
        print(f"{promoted} message(s) left in journal/ by a crash moved to queue/ first")
    print(f"handed off {summary.sent} message(s) to {target}; {len(summary.kept)} still waiting here")
    for queue_id, reply in summary.kept.items():
        print(f"{queue_id}: kept: {reply}")
    _dead_letters(spool)
    return 0 if not summary.kept else 1


def _report_running(found: dict[str, object] | None, spool: Spool, target: str, timeout: float) -> int:
    if found is None:
        print(f"relay: the running relay did not answer the hand-off request within {timeout:.0f} s")
        return 1
    if "error" in found:  # the running relay's own settings say --to is itself
        print(f"relay: {found['error']}", file=sys.stderr)
        return 2
    print(f"handed off {found['sent']} message(s) to {target}; {found['left']} still waiting here")
    errors = found.get("errors")
    for queue_id, reply in (errors if isinstance(errors, dict) else {}).items():
        print(f"{queue_id}: kept: {reply}")
    _dead_letters(spool)
    return 0 if found["left"] == 0 else 1


def _dead_letters(spool: Spool) -> None:
    if dead := len(spool.dead_ids()):
        print(f"{dead} dead letter(s) in dead/ not handed off (refused for good; `relay queue requeue ID` to retry)")
