"""The client side of SMTP without I/O: reply lines, commands, dot-stuffing and the transaction machine.

No sockets here (h11-style), so each rule is tested with plain values; `relay.upstream` does the I/O.
`Transaction` decides everything about one pipelined mail transaction (which reply answers which
command, when to send the body, RSET, 421, a stray 354); the connection only moves bytes for it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

CHUNK = 256 * 1024  # bytes of body stuffed and written at a time: bounds the extra memory per message
# stuffed_chunks doubles a dot at a line start, or after a bare CR: whatever an upstream parser takes for
# a line break, it never sees <break>.<break> before our real end of data (SMTP smuggling).
_QUEUED_AS = re.compile(r"queued as <?([^\s<>]+)>?", re.IGNORECASE)  # "<>" is no id


class ReplySyntaxError(ValueError):
    """The server sent something that is not an SMTP reply line."""


@dataclass(frozen=True, slots=True)
class ServerReply:
    code: int
    text: str  # lines joined with "\n", enhanced code included as the server sent it

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500

    @property
    def first_line(self) -> str:
        return self.text.split("\n", 1)[0]

    def __str__(self) -> str:
        return f"{self.code} {self.first_line}"


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    final: ServerReply  # the reply to the end of data, or the one that ended the transaction early
    accepted: tuple[str, ...]
    refused: dict[str, ServerReply] = field(default_factory=dict)
    connection_id: int = 0


def parse_reply_line(line: bytes) -> tuple[int, bool, str]:
    """(code, is_last_line, text) of one reply line such as b"250-PIPELINING\\r\\n"."""
    stripped = line.rstrip(b"\r\n")
    code_bytes, sep = stripped[:3], stripped[3:4]
    if len(code_bytes) != 3 or not code_bytes.isdigit() or sep not in (b"", b" ", b"-"):
        raise ReplySyntaxError(f"not an SMTP reply: {stripped[:80]!r}")
    return int(code_bytes), sep != b"-", stripped[4:].decode("utf-8", errors="replace")


class ReplyReader:
    """Whole replies out of bytes as they arrive, in whatever pieces: a pipelined flight's 1000 replies
    come out of one `feed` in one pass, instead of an await per line."""

    def __init__(self, max_line: int = 64 * 1024, max_lines: int = 1000 + 64) -> None:
        self._max_line = max_line
        self._max_lines = max_lines  # per reply: one per recipient plus slack
        self._partial = b""  # after the last line feed
        self._lines: list[str] = []  # the reply being read, until its last line
        self._code = 0

    @property
    def pending(self) -> bool:
        """Bytes received that are not yet part of a whole reply (a line begun, or a reply's first lines)."""
        return bool(self._partial or self._lines)

    def feed(self, data: bytes) -> list[ServerReply]:
        """The replies completed by `data`; raises ReplySyntaxError on what is not SMTP."""
        *complete, self._partial = (self._partial + data).split(b"\n")
        if len(self._partial) > self._max_line:
            raise ReplySyntaxError("reply line too long")
        replies: list[ServerReply] = []
        for raw in complete:
            if len(raw) > self._max_line:
                raise ReplySyntaxError("reply line too long")
            code, last, text = parse_reply_line(raw)
            self._lines.append(text)
            if last:
                replies.append(ServerReply(code, "\n".join(self._lines)))
                self._lines = []
            elif len(self._lines) >= self._max_lines:
                raise ReplySyntaxError("reply too long")
        return replies


def ehlo_extensions(reply: ServerReply) -> dict[str, str]:
    """EHLO keywords (upper-cased) and their parameters; the first line is the server's name."""
    extensions: dict[str, str] = {}
    for line in reply.text.split("\n")[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            extensions[keyword.upper()] = params
    return extensions


def queued_id(reply: ServerReply) -> str | None:
    """Infobip's message id from `250 2.6.0 Message queued as <id>`."""
    match = _QUEUED_AS.search(reply.text)
    return match.group(1) if match else None


def transaction_commands(mail_from: str, recipients: Iterable[str], *, size: int | None, eight_bit: bool) -> bytes:
    """MAIL, every RCPT and DATA as one flight (RFC 2920): the caller checks the addresses first."""
    params = (f" SIZE={size}" if size is not None else "") + (" BODY=8BITMIME" if eight_bit else "")
    lines = [f"MAIL FROM:<{mail_from}>{params}\r\n"]
    lines.extend(f"RCPT TO:<{rcpt}>\r\n" for rcpt in recipients)
    lines.append("DATA\r\n")
    return "".join(lines).encode("ascii")


def stuffed_chunks(segments: Iterable[memoryview], chunk: int = CHUNK) -> Iterator[bytes]:
    """The message body on the wire: dot-stuffed (RFC 5321 4.5.2), ending with CRLF . CRLF.

    Works on bounded pieces so a 20 MB message never exists twice in memory. A "." after a bare LF or
    a bare CR is stuffed too, so no upstream parser can see an early end of data.
    """
    at_line_start = True
    last = b"\r\n"
    for segment in segments:
        pos = 0
        while pos < len(segment):
            end = min(pos + chunk, len(segment))
            if end < len(segment):
                cut = bytes(segment[pos:end]).rfind(b"\n")
                if cut >= 0:
                    end = pos + cut + 1
            piece = bytes(segment[pos:end])
            # bytes.replace runs in C (a regex with a lookbehind cost about 1.5 s of CPU per 20 MB).
            out = piece.replace(b"\r.", b"\r..").replace(b"\n.", b"\n..")
            if at_line_start and piece.startswith(b"."):
                out = b"." + out
            yield out
            at_line_start = piece.endswith((b"\n", b"\r"))
            last = piece[-2:] if len(piece) >= 2 else last[-1:] + piece
            pos = end
    yield b".\r\n" if last.endswith(b"\r\n") else b"\r\n.\r\n"


# --- the transaction state machine -------------------------------------------------------------


class TransactionStateError(RuntimeError):
    """The caller used a Transaction out of order (our bug, not the server's)."""


@dataclass(frozen=True, slots=True)
class NeedReply:
    """Nothing to send: read the next reply and feed it to `receive`."""


@dataclass(frozen=True, slots=True)
class SendBody:
    """Infobip said 354 with a recipient accepted: send the stuffed body, call `body_sent`, read the reply."""


@dataclass(frozen=True, slots=True)
class Send:
    """Write `data`, then read the next reply (an empty message ended after a stray 354)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Finished:
    """Infobip gave its verdict; the connection may serve the next transaction."""

    result: DeliveryResult


@dataclass(frozen=True, slots=True)
class ServerClosing:
    """Infobip said 421: it is closing the connection, so there is no verdict and the session is gone."""

    reply: ServerReply

    @property
    def why(self) -> str:
        return f"Infobip closed the connection: {self.reply}"


@dataclass(frozen=True, slots=True)
class OutOfStep:
    """A reply that cannot answer the command it pairs with: replies and commands no longer match up."""

    reply: ServerReply
    command: str

    @property
    def why(self) -> str:
        return f"out of step with the server: {self.command} answered {self.reply}"


Action = NeedReply | SendBody | Send | Finished | ServerClosing | OutOfStep
NEED_REPLY = NeedReply()
SEND_BODY = SendBody()


class TxState(enum.Enum):
    """Where a Transaction is; the name is the command whose reply comes next."""

    RSET = "rset"  # RSET went ahead of MAIL in the same flight
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    BODY = "body"  # 354 came: the caller is sending the body
    END_OF_DATA = "end_of_data"  # the body's final dot went out: the verdict comes next
    EMPTY_END = "empty_end"  # a 354 after a failure: we ended an empty message and await its reply
    DONE = "done"
    BROKEN = "broken"  # 421 or out of step: the connection must not be used again


class Transaction:
    """One pipelined transaction: MAIL, every RCPT and DATA in one flight, then the body.

    `start()` gives the flight; each reply goes to `receive()`, which says what to do next. Replies are
    paired with commands in order (RFC 2920). A transaction that ends before the body leaves the server
    mid-transaction, so `needs_rset` asks for RSET ahead of the next flight on this connection.
    """

    def __init__(
        self,
        mail_from: str,
        recipients: Sequence[str],
        *,
        size: int | None = None,
        eight_bit: bool = False,
        rset_first: bool = False,
        connection_id: int = 0,
    ) -> None:
        if not recipients:
            raise ValueError("a transaction needs at least one recipient")
        self._mail_from = mail_from
        self._recipients = tuple(recipients)
        self._size = size
        self._eight_bit = eight_bit
        self._rset_first = rset_first
        self._connection_id = connection_id
        self.state = TxState.MAIL
        self.needs_rset = rset_first  # until the RSET is answered, the server may still be mid-transaction
        self._mail: ServerReply | None = None
        self._rcpts: list[ServerReply] = []
        self._early: DeliveryResult | None = None  # the verdict kept while an empty message is ended
        self._started = False
        self._body_sent = False

    @property
    def data_sent(self) -> bool:
        """The body's final dot went out: Infobip may have the message even without a verdict."""
        return self._body_sent

    def start(self) -> bytes:
        """The first flight: RSET when the last transaction ended early, then MAIL, RCPTs, DATA."""
        if self._started:
            raise TransactionStateError("start() called twice")
        self._started = True
        flight = transaction_commands(self._mail_from, self._recipients, size=self._size, eight_bit=self._eight_bit)
        if self._rset_first:
            self.state = TxState.RSET
            return b"RSET\r\n" + flight
        return flight

    def body_sent(self) -> None:
        """The caller wrote the whole stuffed body with its final dot."""
        if self.state is not TxState.BODY:
            raise TransactionStateError(f"body_sent() in state {self.state.value}; no 354 to send it after")
        self.state, self._body_sent = TxState.END_OF_DATA, True

    def receive(self, reply: ServerReply) -> Action:
        """Feed the next reply; the action says what the caller does next."""
        if not self._started:
            raise TransactionStateError("receive() before start(): no command was sent")
        match self.state:
            case TxState.RSET:  # whatever it says, the MAIL behind it starts afresh
                self.state, self.needs_rset = TxState.MAIL, False
                return NEED_REPLY
            case TxState.MAIL:
                return self._on_mail(reply)
            case TxState.RCPT:
                self._rcpts.append(reply)
                if len(self._rcpts) == len(self._recipients):
                    self.state = TxState.DATA
                return NEED_REPLY
            case TxState.DATA:
                return self._on_data(reply)
            case TxState.END_OF_DATA:
                accepted = self._accepted() if reply.ok else ()
                return self._finish(DeliveryResult(reply, accepted, self._refused(), self._connection_id))
            case TxState.EMPTY_END:  # its reply does not matter: the verdict was given before
                assert self._early is not None
                return self._finish(self._early)
        raise TransactionStateError(f"no reply expected in state {self.state.value}")

    def _on_mail(self, reply: ServerReply) -> Action:
        if reply.code == 421:
            return self._broken(ServerClosing(reply))
        self._mail = reply
        self.state = TxState.RCPT
        return NEED_REPLY

    def _on_data(self, reply: ServerReply) -> Action:
        """The last reply of the flight decides: send the body, end early, or give up the connection."""
        assert self._mail is not None
        if reply.ok:  # a 2xx to DATA is not a reply to DATA: we are out of step with the server
            return self._broken(OutOfStep(reply, "DATA"))
        accepted = self._accepted()
        if self._mail.ok and accepted and reply.code == 354:
            self.state = TxState.BODY
            return SEND_BODY
        self.needs_rset = True  # the server may hold a sender or recipients for a message that never came
        if not self._mail.ok:
            early = DeliveryResult(self._mail, (), {}, self._connection_id)
        elif not accepted:
            early = DeliveryResult(worst(self._refused()), (), self._refused(), self._connection_id)
        else:
            early = DeliveryResult(reply, (), self._refused(), self._connection_id)
        if reply.code == 354:  # a server that said 354 anyway gets an empty message ended
            self.state, self._early = TxState.EMPTY_END, early
            return Send(b".\r\n")
        return self._finish(early)

    def _accepted(self) -> tuple[str, ...]:
        return tuple(r for r, reply in zip(self._recipients, self._rcpts, strict=True) if reply.ok)

    def _refused(self) -> dict[str, ServerReply]:
        return {r: reply for r, reply in zip(self._recipients, self._rcpts, strict=True) if not reply.ok}

    def _finish(self, result: DeliveryResult) -> Finished:
        self.state = TxState.DONE
        return Finished(result)

    def _broken(self, action: ServerClosing | OutOfStep) -> ServerClosing | OutOfStep:
        self.state = TxState.BROKEN
        return action


def worst(refused: dict[str, ServerReply]) -> ServerReply:
    """The reply to report when every recipient was refused: a temporary one wins (it may still work)."""
    replies = list(refused.values())
    return next((r for r in replies if r.transient), replies[0])
