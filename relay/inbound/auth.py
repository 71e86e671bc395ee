"""Inbound AUTH (PLAIN or LOGIN, only after STARTTLS): who may log in, and guessing made slow and short.

- A password in listen.users is checked against its scrypt hash (`password_hash`, from `relay hash-password`)
  in a thread, at most two at once (each costs about 0.15 s and 32 MiB), or, for a plain-text entry, compared
  in constant time. An unknown user costs what a known one does.
- Each failure waits before its 535: auth_failure_delay, doubled for each earlier failure of that address within
  auth_lockout seconds (at most 16 times).
- After auth_failures_per_connection failures the connection is closed (421 4.7.0).
- An address with auth_failures_per_client failures within auth_lockout seconds is locked out for auth_lockout
  seconds: every AUTH gets 454 4.7.0 at once, even with the right password.
- `client_auth_failed` is logged at most once a minute per address, with how many failures it stands for.
"""

from __future__ import annotations

import asyncio
import collections
import getpass
import hmac
import secrets
import sys
from dataclasses import dataclass, field
from typing import Protocol

import structlog
from aiosmtpd.smtp import LoginPassword

from relay.config import ClientUser, ListenSettings
from relay.core.passwords import PasswordHash, hash_password, parse_password_hash, password_matches
from relay.core.replies import AUTH_INVALID, AUTH_OK, AUTH_TOO_MANY_FAILURES, auth_locked_out
from relay.inbound.access import Refusal
from relay.ops.metrics import Metrics

log = structlog.get_logger("relay.inbound.auth")
LOG_EVERY = 60.0  # seconds between client_auth_failed lines for one address
MAX_DELAY_FACTOR = 16
_decoy: PasswordHash | None = None  # an unknown user's password is checked against this, so it takes as long


class AuthClient(Protocol):
    """What the check needs of the connection (RelaySMTP)."""

    async def push(self, status: str) -> None: ...

    async def refuse_connection(self, refusal: Refusal, client_ip: str) -> None: ...


class AuthSession(Protocol):
    """What the check needs of the session (RelaySession)."""

    client_ip: str
    authenticated: bool
    auth_data: object
    relay_user: str | None
    pending_login: LoginPassword | None


@dataclass
class _Address:
    failures: collections.deque[float] = field(default_factory=collections.deque)
    locked_until: float = 0.0
    logged_at: float = float("-inf")
    unlogged: int = 0


class AuthGuard:
    """Failures by client address: the delay before each 535, the lockout, and when to log. Pure bookkeeping
    over the `now` the caller gives."""

    def __init__(self, listen: ListenSettings) -> None:
        self.listen = listen
        self.addresses: dict[str, _Address] = {}

    def locked_for(self, client_ip: str, now: float) -> float:
        """Seconds `client_ip` is still locked out (0: it may try)."""
        entry = self.addresses.get(client_ip)
        return max(0.0, entry.locked_until - now) if entry is not None else 0.0

    def failed(self, client_ip: str, now: float) -> float:
        """Count one failure; the seconds to wait before saying so."""
        entry = self._entry(client_ip, now)
        entry.failures.append(now)
        entry.unlogged += 1
        recent = len(entry.failures)
        if recent >= self.listen.auth_failures_per_client:
            entry.locked_until = now + self.listen.auth_lockout
            entry.failures.clear()
        return float(self.listen.auth_failure_delay * min(2 ** (recent - 1), MAX_DELAY_FACTOR))

    def log_due(self, client_ip: str, now: float) -> int:
        """How many failures a client_auth_failed line now stands for; 0 while the last line is recent."""
        entry = self._entry(client_ip, now)
        if now - entry.logged_at < LOG_EVERY and entry.locked_until <= now:
            return 0
        entry.logged_at, count, entry.unlogged = now, entry.unlogged, 0
        return count

    def _entry(self, client_ip: str, now: float) -> _Address:
        entry = self.addresses.get(client_ip)
        if entry is None:
            if len(self.addresses) > 10000:  # forget addresses with nothing recent
                self.addresses = {k: e for k, e in self.addresses.items() if self._recent(e, now)}
            entry = self.addresses[client_ip] = _Address()
        while entry.failures and now - entry.failures[0] > self.listen.auth_lockout:
            entry.failures.popleft()
        return entry

    def _recent(self, entry: _Address, now: float) -> bool:
        return entry.locked_until > now or any(now - t <= self.listen.auth_lockout for t in entry.failures)


class Authenticator:
    """listen.users and the guard; the reply to one AUTH attempt whose credentials aiosmtpd has parsed."""

    def __init__(self, listen: ListenSettings, metrics: Metrics, guard: AuthGuard | None = None) -> None:
        self.users = {user.username: user for user in listen.users}
        self.hashes = {
            user.username: parse_password_hash(user.password_hash.get_secret_value())
            for user in listen.users
            if user.password_hash is not None
        }
        self.metrics = metrics
        self.checks = asyncio.Semaphore(2)  # scrypt checks at once (memory), whatever the number of clients
        self.guard = guard or AuthGuard(listen)
        self.guard.listen = listen  # a reload keeps what the guard knows, under the new limits

    async def refused_before(self, client: AuthClient, session: AuthSession) -> bool:
        """A locked-out address hears 454 at AUTH, before it may send a password."""
        left = self.guard.locked_for(session.client_ip, asyncio.get_running_loop().time())
        if not left or session.authenticated:
            return False
        self.metrics.rejected.labels("auth_locked_out").inc()
        await client.push(str(auth_locked_out(session.client_ip, left)))
        return True

    async def answer(self, client: AuthClient, session: AuthSession, failures: int) -> bool:
        """Check the credentials aiosmtpd parsed into `session.pending_login` and say the verdict; True when
        they were right. `failures`: this connection's so far."""
        credentials, session.pending_login = session.pending_login, None
        assert credentials is not None
        user = self.users.get(credentials.login.decode("utf-8", "replace"))
        if await self._matches(user, credentials.password):
            assert user is not None
            session.authenticated = True
            session.auth_data = session.relay_user = user.username
            await client.push(str(AUTH_OK))
            return True
        client_ip, now = session.client_ip, asyncio.get_running_loop().time()
        self.metrics.rejected.labels("auth_failed").inc()
        delay = self.guard.failed(client_ip, now)
        if count := self.guard.log_due(client_ip, now):
            locked = round(self.guard.locked_for(client_ip, now)) or None
            log.warning("client_auth_failed", client_ip=client_ip, failures=count, locked_out_for=locked)
        await asyncio.sleep(delay)
        if failures + 1 >= self.guard.listen.auth_failures_per_connection:
            await client.refuse_connection(Refusal("auth_disconnected", AUTH_TOO_MANY_FAILURES), client_ip)
        else:
            await client.push(str(AUTH_INVALID))
        return False

    async def _matches(self, user: ClientUser | None, password: bytes) -> bool:
        stored = self.hashes.get(user.username) if user is not None else None
        if stored is not None or (user is None and self.hashes):
            async with self.checks:
                matched = await asyncio.to_thread(_matches_in_a_thread, stored, password)
            return matched and stored is not None
        plain = user.password.get_secret_value().encode() if user and user.password else secrets.token_bytes(16)
        return hmac.compare_digest(password, plain) and user is not None


def _matches_in_a_thread(stored: PasswordHash | None, password: bytes) -> bool:
    """Against the user's hash, or (an unknown user) against a decoy made once, so both take as long."""
    global _decoy
    if stored is None:
        _decoy = _decoy or parse_password_hash(hash_password(secrets.token_hex(16), secrets.token_bytes(16)))
        password_matches(_decoy, password)  # the time it takes is the point
        return False
    return password_matches(stored, password)


def print_password_hash() -> int:
    """`relay hash-password`: read a password (twice at a terminal, else one line of stdin), print its hash."""
    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("relay: the two passwords differ", file=sys.stderr)
            return 1
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if not password:
        print("relay: an empty password cannot be hashed", file=sys.stderr)
        return 1
    print(hash_password(password, secrets.token_bytes(16)))
    return 0
