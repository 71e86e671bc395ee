"""SMTP replies we send, and the exception that carries one.

Every reply carries an enhanced status code (RFC 3463) and words an app owner can act on. aiosmtpd's
built-in replies do not; `with_enhanced_code` rewrites them on the way out.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

_ENHANCED_RE = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}( |$)")


@dataclass(frozen=True, slots=True)
class Reply:
    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"

    @property
    def is_permanent(self) -> bool:
        return self.code >= 500


class Rejection(Exception):
    """A decision to refuse a message (or part of it), carrying the reply the client gets and the reason
    it counts under in relay_messages_rejected_total (decided together, so nobody maps one to the other)."""

    def __init__(self, reply: Reply, reason: str = "content") -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.reason = reason


# aiosmtpd's own replies, by prefix, with what we say instead.
_REWRITES: tuple[tuple[str, str], ...] = (
    ("500 Error: bad syntax", "500 5.5.2 Syntax error: empty or malformed command line"),
    ("500 Command line too long", "500 5.5.6 Command line too long"),
    ("500 Line too long", "500 5.5.6 A message line is longer than this relay accepts"),
    ("500 Error: strict ASCII mode", "500 5.6.7 Non-ASCII command or address: SMTPUTF8 is not supported"),
    ("552 Error: message size exceeds", "552 5.3.4 Message too big for this relay (SIZE= is over the limit)"),
    ("552 Error: Too much mail data", "552 5.3.4 Message too big for this relay; nothing was sent"),
    ("503 Error: send HELO first", "503 5.5.1 Send EHLO (or HELO) first"),
    ("503 Error: send EHLO first", "503 5.5.1 Send EHLO first"),
    ("503 Error: need MAIL command", "503 5.5.1 Send MAIL FROM first"),
    ("503 Error: need RCPT command", "503 5.5.1 Send RCPT TO first: the message has no recipient"),
    ("503 Error: nested MAIL command", "503 5.5.1 MAIL FROM already given; send RSET to start over"),
    ("553 5.1.3 Error: malformed address", "553 5.1.3 Malformed address; use <user@example.com>"),
    ("221 Bye", "221 2.0.0 Bye"),
    ("250 OK", "250 2.0.0 OK"),
)

# The class and subject we give a reply that has no enhanced code yet, by basic code.
_DEFAULT_ENHANCED = {
    "211": "2.0.0",
    "214": "2.0.0",
    "221": "2.0.0",
    "235": "2.7.0",
    "250": "2.0.0",
    "251": "2.1.5",
    "252": "2.5.0",
    "421": "4.3.0",
    "450": "4.2.0",
    "451": "4.3.0",
    "452": "4.3.1",
    "454": "4.7.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "550": "5.0.0",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.0.0",
    "555": "5.5.4",
}


@functools.lru_cache(maxsize=1024)  # the same few lines (MAIL's, RCPT's 250) go through it for every message
def with_enhanced_code(line: str) -> str:
    """Give one reply line an enhanced status code if it lacks one.

    Lines that must not have one are left alone: the greeting (220), the 354 go-ahead, AUTH challenges
    (334) and the continuation lines of a multi-line reply such as EHLO's.
    """
    for prefix, replacement in _REWRITES:
        if line.startswith(prefix):
            return replacement
    code, sep, rest = line[:3], line[3:4], line[4:]
    if sep != " " or code not in _DEFAULT_ENHANCED or _ENHANCED_RE.match(rest):
        return line
    return f"{code} {_DEFAULT_ENHANCED[code]} {rest}"


# The catalogue: every reply the relay composes itself, by name, so each text has one home.
# Replies that carry a value are functions returning a Reply; fixed ones are constants.

# -- inbound: connection, envelope and DATA --
TOO_MANY_CONNECTIONS = Reply(421, "4.7.0", "Too many connections to this relay; try again later")
TLS_ALREADY_ACTIVE = Reply(503, "5.5.1", "TLS is already active")
TLS_REQUIRED = Reply(530, "5.7.0", "Must issue a STARTTLS command first (listen.require_tls)")
CLEARTEXT_AFTER_STARTTLS = Reply(
    554, "5.5.1", "Commands were sent behind STARTTLS, before TLS began; they are not run inside TLS: closing"
)
SENDER_MALFORMED = Reply(553, "5.1.7", "Sender address must look like user@example.com")
RECIPIENT_MALFORMED = Reply(553, "5.1.3", "Recipient address must look like user@example.com")
NO_RECIPIENT = Reply(503, "5.5.1", "Send RCPT TO first: the message has no recipient")
NO_SENDER = Reply(503, "5.5.1", "Send MAIL FROM first")  # DATA with no transaction (or one whose MAIL was refused)
DATA_TAKES_NO_ARGUMENT = Reply(501, "5.5.4", "Syntax: DATA takes no argument")
DATA_GO_AHEAD = "354 End data with <CR><LF>.<CR><LF>"  # a go-ahead, not a verdict: no enhanced code (RFC 3463)
MEMORY_BUDGET_FULL = Reply(451, "4.3.2", "The relay holds too much message data right now; try again shortly")
LINE_TOO_LONG = Reply(500, "5.5.6", "A message line is longer than this relay accepts; nothing was sent")
# The end of data is CRLF.CRLF only (SMTP smuggling); a dot line next to a bare LF is refused at once.
BARE_LF_DOT_LINE = Reply(
    554,
    "5.6.0",
    "Bare LF next to a dot line: end the message with CRLF.CRLF and every line with CRLF;"
    " nothing was sent; closing the connection",
)
DOT_AFTER_BARE_LF = Reply(
    550,
    "5.6.0",
    "A line after a bare LF starts with a dot, which mail servers read in different ways;"
    " end every line with CRLF; nothing was sent",
)


AUTH_OK = Reply(235, "2.7.0", "Authentication successful")
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed logins on this connection; closing it")


def auth_locked_out(client_ip: str, seconds: float) -> Reply:
    return Reply(454, "4.7.0", f"Too many failed logins from {client_ip}; try again in {max(1, round(seconds))} s")


def too_many_client_connections(client_ip: str, cap: int) -> Reply:
    return Reply(421, "4.7.0", f"Too many connections from {client_ip} (at most {cap} at once); try again later")


def proxy_not_trusted(shown: str) -> Reply:
    """listen.proxy_protocol is on and the TCP peer is not in listen.trusted_proxies."""
    return Reply(554, "5.7.1", f"{shown} is not a trusted proxy: this port takes connections from the load balancer")


def client_not_allowed(shown: str) -> Reply:
    """`shown`: the client's address as the relay saw it, or "unknown"."""
    return Reply(554, "5.7.1", f"Client address {shown} is not allowed to relay through this server")


def sender_domain_not_allowed(domain: str) -> Reply:
    return Reply(550, "5.7.1", f"Sender domain {domain} is not allowed to send through this relay")


def too_many_recipients(limit: int) -> Reply:
    return Reply(452, "4.5.3", f"Too many recipients: at most {limit} per message; send the rest separately")


def client_message_rate(client_ip: str, limit: int) -> Reply:
    return Reply(451, "4.7.0", f"Rate limit: {client_ip} sent more than {limit} messages a minute; try again later")


def message_rate(limit: int) -> Reply:
    return Reply(451, "4.7.0", f"Rate limit: this relay takes at most {limit} messages a minute; try again later")


def profile_rate(profile: str, limit: int) -> Reply:
    return Reply(451, "4.7.0", f"Rate limit: profile {profile} takes at most {limit} messages a minute; try later")


def client_recipient_rate(client_ip: str, limit: int) -> Reply:
    return Reply(451, "4.7.0", f"Rate limit: {client_ip} sent to more than {limit} recipients an hour; try again later")


def message_too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"Message too big: this relay takes at most {limit} bytes; nothing was sent")


def sender_ok(address: str) -> Reply:
    return Reply(250, "2.1.0", f"Sender <{address}> OK")


def recipient_ok(address: str) -> Reply:
    return Reply(250, "2.1.5", f"Recipient <{address}> OK")


# -- prepare: the sender actually sent upstream --


def rewritten_sender_not_allowed(domain: str) -> Reply:
    """alignment = "rewrite" would make the header From the envelope sender: the allowlists hold for it too."""
    return Reply(
        550,
        "5.7.1",
        f"Header From domain {domain} is not allowed to send through this relay"
        " (alignment = rewrite would make it the envelope sender)",
    )


# -- prepare: the header block, read as a receiving MTA and a mail client would; what is ambiguous is refused --
NO_FROM = Reply(550, "5.6.0", "The message has no valid From: header; add one such as From: <app@example.com>")
BARE_LINE_BREAK_IN_HEADERS = Reply(
    550, "5.6.0", "The header block has a bare CR or LF; end every header line with CRLF; nothing was sent"
)
CONTROL_IN_HEADERS = Reply(
    550, "5.6.0", "The header block has a control character (only tab is allowed there); nothing was sent"
)
FROM_NOT_ONE_ADDRESS = Reply(
    550,
    "5.6.0",
    "The From: header must hold exactly one address (no lists or groups), such as From: App <app@example.com>",
)
FROM_MALFORMED = Reply(
    550,
    "5.6.0",
    "The From: header is malformed, so mail programs could read different senders from it;"
    " use From: App <app@example.com>",
)


def header_block_too_big(limit: int) -> Reply:
    return Reply(552, "5.3.4", f"The header block is over {limit} bytes, more than this relay reads; nothing was sent")


def too_many_header_fields(limit: int) -> Reply:
    return Reply(
        552, "5.3.4", f"The message has over {limit} header fields, more than this relay reads; nothing was sent"
    )


def not_a_header_line(number: int) -> Reply:
    return Reply(
        550,
        "5.6.0",
        f"Header line {number} is neither a field (Name: value) nor a continuation (a space or tab, then text),"
        " so receivers would read the headers differently; nothing was sent",
    )


def several_from_fields(count: int) -> Reply:
    return Reply(550, "5.6.0", f"The message has {count} From: fields; it must have exactly one")


def from_display_name_shows(domain: str) -> Reply:
    """`From: app@allowed.example <ceo@evil.example>` and the like: what a reader sees is not who sends."""
    return Reply(
        550,
        "5.7.1",
        f"The From: display name shows an address at {domain}, which is not the sender's domain;"
        " give the sender's own address only",
    )


def too_big_with_added_headers(limit: int) -> Reply:
    """What the relay adds (Message-ID, Date, policy headers) took the message past what Infobip takes."""
    return Reply(
        552,
        "5.3.4",
        f"Message too big once the relay's headers are added: at most {limit} bytes go on; nothing was sent",
    )


def duplicate_policy_header(name: str, count: int) -> Reply:
    return Reply(550, "5.6.0", f"The message has {count} {name} fields, a header this relay's policy sets; send one")


# -- store and first attempt: what the app is told after we took the message --
INTERNAL_ERROR = Reply(451, "4.3.0", "Internal error in the relay; try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "The relay is shutting down; try again shortly")


HISTORY_BEHIND = Reply(451, "4.3.0", "The relay's message history is not keeping up; try again later")


def unstorable() -> Reply:
    """Neither on disk nor accepted by Infobip: never a 250, so the app keeps the message and retries."""
    return Reply(452, "4.3.1", "The relay cannot store the message right now (disk full?); try again later")


# -- upstream: when Infobip cannot be reached or the connection is lost --


def upstream_unreachable(host: str, port: int, why: str) -> Reply:
    """No authenticated session (connect, TLS, EHLO or AUTH failed): nothing was sent, a retry is safe."""
    return Reply(451, "4.4.1", f"Cannot reach Infobip at {host}:{port}: {why}")


def upstream_lost(why: str) -> Reply:
    """The session broke mid-transaction: temporary, though Infobip may have the message if its end went out."""
    return Reply(451, "4.4.2", f"Connection to Infobip lost: {why}; try again later")
