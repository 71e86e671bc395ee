"""Every use of aiosmtpd's private API, in one place (aiosmtpd >=1.4.6,<1.5, as pyproject pins it).

aiosmtpd documents handlers, `smtp_*` verbs, `push`, `Session` and `Envelope`; the relay also needs a
few of its internals: a session class of its own, a faster address parser, a check before the greeting,
its own DATA reader (for the memory budget and the time limits) and so the stream, the idle timer and the
end of a transaction, and what is left in the stream when STARTTLS switches to TLS. `CompatSMTP` renames
aiosmtpd's private extension points to methods we own; the functions below wrap the private attributes.
Nothing else in relay/ touches an underscore name of an aiosmtpd object. tests/test_aiosmtpd_contract.py
pins each use, so an aiosmtpd upgrade that changes one
fails there, by name, before it can change the relay's behaviour.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP, Session

# aiosmtpd's own refusals (as it words them, before with_enhanced_code) that are about the message's size;
# relay_messages_rejected_total counts these as "size" and every other stock refusal as "protocol".
STOCK_SIZE_REFUSALS = ("552 Error: message size exceeds", "552 Error: Too much mail data")
CLOCK_GRAIN = 0.001  # seconds: uvloop keeps time in milliseconds, so a timer's when() can be a hair late


_stock_sanitized_log = aiosmtpd.smtp.sanitized_log


def sanitized_log_when_enabled(func: Callable[..., None], msg: Any, *args: Any, **kwargs: Any) -> None:
    """aiosmtpd logs every command line through `sanitized_log(log.info, ...)`, which masks AUTH arguments
    before asking the logger whether it logs at all; `mail.log` is held at ERROR (relay/ops/logs.py), so
    that was two regex matches per command for nothing. Ask first."""
    logger = getattr(func, "__self__", None)
    if isinstance(logger, logging.Logger) and not logger.isEnabledFor(logging.getLevelName(func.__name__.upper())):
        return
    _stock_sanitized_log(func, msg, *args, **kwargs)


aiosmtpd.smtp.sanitized_log = sanitized_log_when_enabled  # read as a module global by SMTP._handle_client


def stock_refusal_reason(line: str) -> str:
    """The metric reason for one of aiosmtpd's own 4xx/5xx lines."""
    return "size" if line.startswith(STOCK_SIZE_REFUSALS) else "protocol"


class CompatSMTP(SMTP):
    """aiosmtpd's SMTP with its private extension points renamed: override `new_session`, `parse_address`
    and `admit`, never the underscore names."""

    def __init__(self, handler: Any, *, line_length_limit: int, **options: Any) -> None:
        # SMTP.__init__ reads line_length_limit for its StreamReader's limit, and clears command_size_limits,
        # which aiosmtpd keeps on the class: shared by every session (EHLO raises MAIL's limit in it). Each
        # session gets its own, set before SMTP.__init__ sees them.
        self.line_length_limit = line_length_limit
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(handler, **options)

    def new_session(self) -> Session:
        """The session object for a new connection, and again after STARTTLS (RFC 3207 4.2)."""
        return Session(self.loop)

    def parse_address(self, arg: str) -> tuple[str | None, str | None]:
        """MAIL FROM / RCPT TO argument -> (address, parameters); (None, None) when malformed. aiosmtpd's parser."""
        return SMTP._getaddr(self, arg)

    async def admit(self) -> bool:
        """Once per connection, before the PROXY header and the greeting: False to serve nothing (the override
        replies and closes the transport itself)."""
        return True

    # aiosmtpd's private extension points, each handing over to one of ours.

    def _create_session(self) -> Session:
        return self.new_session()

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        return self.parse_address(arg)

    async def _handle_client(self) -> None:
        if await self.admit():
            await super()._handle_client()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """aiosmtpd re-arms its idle timer after every command: a cancelled TimerHandle and a new one each
        time, which left a pipelining client's message costing five heap entries. Here the deadline moves
        and the one armed timer, when it fires early, re-arms itself for what is left."""
        self._idle_deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        # Later than the new deadline by more than uvloop's millisecond clock can round: re-arm (a shorter
        # `duration`). Within it, a command in the same millisecond re-armed the timer for nothing.
        if handle is None or handle.cancelled() or handle.when() > self._idle_deadline + CLOCK_GRAIN:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)

    def _idle_check(self) -> None:
        if self.loop.time() < self._idle_deadline:
            self._timeout_handle = self.loop.call_at(self._idle_deadline, self._idle_check)
        else:
            self._timeout_cb()  # type: ignore[no-untyped-call]


def reader(server: SMTP) -> asyncio.StreamReader:
    """The connection's input stream (aiosmtpd's own DATA and command loop read from it too)."""
    stream: asyncio.StreamReader = server._reader
    return stream


def writer(server: SMTP) -> asyncio.StreamWriter:
    """The connection's output stream, with drain() for flow control."""
    stream: asyncio.StreamWriter = server._writer
    return stream


def next_command_waiting(server: SMTP) -> bool:
    """Whether a whole further line is already buffered: the client pipelines (RFC 2920), so a reply can wait
    to go out with the next one. asyncio's StreamReader has no public view of its buffer."""
    return b"\n" in getattr(server._reader, "_buffer", b"")


def buffered(server: SMTP) -> int:
    """Bytes received and not yet read. In `connection_made` after STARTTLS, these came in clear before the
    switch, and aiosmtpd is about to throw them away quietly (RFC 3207 4.2); the relay hangs up instead."""
    return len(getattr(server._reader, "_buffer", b""))


def unread(server: SMTP, data: bytes) -> None:
    """Put back bytes read past the end of data (DATA is read in large chunks): the client's next commands,
    pipelined behind the dot, for aiosmtpd's command loop. asyncio's StreamReader cannot unread publicly."""
    buffer: bytearray = server._reader._buffer  # type: ignore[attr-defined]
    buffer[0:0] = data


def end_transaction(server: SMTP) -> None:
    """After the reply to the end of data: a fresh envelope, as aiosmtpd's own DATA leaves it."""
    server._set_post_data_state()  # type: ignore[no-untyped-call]


def pause_idle_timer(server: SMTP) -> None:
    """Stop aiosmtpd's idle timeout (`timeout`): while the relay works on an answer the client is not idle."""
    if server._timeout_handle is not None:
        server._timeout_handle.cancel()


def restart_idle_timer(server: SMTP) -> None:
    """Start aiosmtpd's idle timeout afresh, as it does after each command."""
    server._reset_timeout()


SYNTAX_ATTRIBUTES = ("__smtp_syntax__", "__smtp_syntax_extended__", "__smtp_syntax_when__")


def keep_help(cls: type[SMTP]) -> type[SMTP]:
    """A class decorator: aiosmtpd's HELP lists a command only if its smtp_* method carries @syntax's text, which
    an override loses; each override gets its parent's, so HELP names EHLO, MAIL, DATA, ... again."""
    for name, method in vars(cls).items():
        parent = getattr(SMTP, name, None)
        if name.startswith("smtp_") and hasattr(parent, SYNTAX_ATTRIBUTES[0]) and callable(method):
            for attribute in SYNTAX_ATTRIBUTES:
                setattr(method, attribute, getattr(parent, attribute))
    return cls
