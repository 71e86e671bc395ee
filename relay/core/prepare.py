"""Turn what a client sent into exactly what goes upstream, or a rejection. Pure: no I/O, no clock.

The message is never re-encoded. New header lines go in front of the original bytes, which are sent
as they came (byte for byte, so an app's DKIM signature still verifies), except for fields a rule
with `replace_existing = true` removes.
"""

from __future__ import annotations

import re
from email.errors import ObsoleteHeaderDefect
from email.policy import SMTP
from email.utils import format_datetime

from relay.config import ListenSettings, PolicySettings
from relay.core.alignment import aligned, check_alignment, domain_of
from relay.core.headers import HeaderError, HeaderField, fold_header, read_header_block
from relay.core.message import Prepared, Received
from relay.core.policy import MessageFacts, header_actions
from relay.core.replies import (
    FROM_MALFORMED,
    FROM_NOT_ONE_ADDRESS,
    NO_FROM,
    Rejection,
    Reply,
    duplicate_policy_header,
    from_display_name_shows,
    rewritten_sender_not_allowed,
    sender_domain_not_allowed,
    several_from_fields,
    too_big_with_added_headers,
)

DEFAULT_LISTEN = ListenSettings()

# What we accept as an address to put in an upstream MAIL/RCPT command: no spaces, brackets or controls.
_SAFE_ADDRESS_RE = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+@[A-Za-z0-9.\-\[\]:]+")


def is_safe_address(address: str) -> bool:
    """What may go into an upstream MAIL/RCPT command: no spaces, brackets or controls."""
    return bool(_SAFE_ADDRESS_RE.fullmatch(address))


_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")  # 63 at most, no hyphen at an end
MAX_LOCAL_PART, MAX_DOMAIN = 64, 255  # RFC 5321 4.5.3.1.1 and .2: what a server must take; past them, it may refuse


def within_smtp_limits(address: str, *, local_part: bool = True) -> bool:
    """An address Infobip, or the next hop, will not refuse for its shape after the app heard 250: a local
    part (unless not `local_part`: a sender's VERP or SRS address runs longer) and a domain within RFC 5321's
    limits, and a domain of labels (or an address literal). Checked at MAIL and RCPT only: a message queued
    by an older relay is still sent as it is."""
    local, _, domain = address.rpartition("@")
    if (local_part and len(local) > MAX_LOCAL_PART) or len(domain) > MAX_DOMAIN:
        return False
    return domain.startswith("[") or all(_LABEL_RE.fullmatch(label) for label in domain.split("."))


# The usual From: shapes, "Name <a@b>", "<a@b>" and "a@b" (a dot-atom address, a name of plain words),
# read without the email package's parser, which takes a good share of prepare()'s time. Python's email
# reads them the same (tests/test_header_block.py fuzzes that); anything else goes to it.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_ADDR = rf"{_ATOM}(?:\.{_ATOM})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*"
_PLAIN_FROM = re.compile(rf"[ \t]*(?:(?:[\w'-]+(?:[ .]+[\w'-]+)*[ \t]*)?<({_ADDR})>|({_ADDR}))[ \t]*")
MAX_FROM_LENGTH = 998  # one line (RFC 5322 2.1.1) holds any one address with a name
_SHOWN_ADDRESS_RE = re.compile(r"[^\s<>\"'@(),;:]+@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)")


def from_address(value: str) -> str:
    """The one address a From: value names, as a mail client reads it; a Rejection when that is not one clear,
    usable address: a list or group, syntax readers repair differently (`app@ok.example <ceo@evil.example>`),
    or a display name that shows an address in another organization."""
    if len(value) > MAX_FROM_LENGTH:
        raise Rejection(FROM_MALFORMED, reason="bad_headers")
    plain = _PLAIN_FROM.fullmatch(value)
    if plain is not None:
        return plain.group(1) or plain.group(2)
    try:
        header = SMTP.header_factory("From", value)
    except Exception:  # the email package's parser gives up on some inputs (a TypeError, a HeaderParseError)
        raise Rejection(FROM_MALFORMED, reason="bad_headers") from None
    if not any(is_safe_address(address.addr_spec) for address in header.addresses):
        raise Rejection(NO_FROM, reason="bad_headers")
    if any(not isinstance(defect, ObsoleteHeaderDefect) for defect in header.defects):
        raise Rejection(FROM_MALFORMED, reason="bad_headers")
    if len(header.addresses) > 1 or header.groups[0].display_name is not None:
        raise Rejection(FROM_NOT_ONE_ADDRESS, reason="bad_headers")
    [address] = header.addresses
    for shown in _SHOWN_ADDRESS_RE.findall(address.display_name):
        if not aligned(shown.lower(), domain_of(address.addr_spec)):
            raise Rejection(from_display_name_shows(shown.lower()), reason="bad_headers")
    return str(address.addr_spec)


def prepare(message: Received, policy: PolicySettings, listen: ListenSettings = DEFAULT_LISTEN) -> Prepared:
    """`listen` gives the caps: the header block's fields and bytes, and the size of what is sent."""
    fields = read_header_block(message.data, listen.max_header_fields, listen.max_header_bytes)
    by_name: dict[str, list[HeaderField]] = {}
    for f in fields:
        by_name.setdefault(f.name.lower(), []).append(f)
    mail_from = _aligned_sender(message, by_name.get("from", []), policy)
    new_lines, ours, message_id = _missing_fields(message, by_name)
    facts = MessageFacts(
        queue_id=message.queue_id,
        message_id=message_id,
        sender=mail_from,
        client_ip=message.client_ip,
        recipients=message.recipients,
    )
    dropped: list[tuple[int, int]] = []
    for action in header_actions(policy.rules, facts):
        key = action.name.lower()
        existing = by_name.get(key, [])
        if len(existing) > 1 and key.startswith("x-ib-"):  # which one would Infobip read?
            raise Rejection(duplicate_policy_header(action.name, len(existing)), reason="bad_headers")
        # A Message-ID or Date we added counts as set: a message never gets two (RFC 5322 3.6).
        if (existing or key in ours) and not action.replace_existing:
            continue
        dropped.extend((f.start, f.end) for f in existing)
        try:
            line = fold_header(action.name, action.value)
        except HeaderError as exc:
            raise Rejection(Reply(554, "5.6.0", f"Cannot add a policy header: {exc}"), reason="bad_headers") from None
        if key in ours:
            new_lines[ours[key]] = line
        else:
            new_lines.append(line)
        if key == "message-id":
            message_id = action.value  # the one that is sent, for logs and the spool
    prepared = Prepared(
        queue_id=message.queue_id,
        mail_from=mail_from,
        recipients=message.recipients,
        message_id=message_id,
        prefix=b"".join(new_lines),
        original=message.data,
        dropped=tuple(sorted(dropped)),
    )
    if prepared.size > listen.max_message_size:  # never accept what Infobip must refuse for size
        raise Rejection(too_big_with_added_headers(listen.max_message_size), reason="too_big")
    return prepared


def _aligned_sender(message: Received, froms: list[HeaderField], policy: PolicySettings) -> str:
    """The envelope sender to send upstream, once the header From: is found and aligned with it."""
    if len(froms) > 1:
        raise Rejection(several_from_fields(len(froms)), reason="bad_headers")
    if not froms:
        raise Rejection(NO_FROM, reason="bad_headers")
    header_from = from_address(froms[0].value)
    verdict = check_alignment(policy.alignment, message.mail_from, header_from)
    if verdict.misaligned:
        raise Rejection(
            Reply(
                550,
                "5.7.1",
                f"Envelope sender domain {domain_of(message.mail_from)} and header From domain "
                f"{domain_of(header_from)} are not aligned; Infobip requires the same organizational domain",
            ),
            reason="misaligned",
        )
    _check_allowlist(message, verdict.mail_from)
    return verdict.mail_from


def _check_allowlist(message: Received, mail_from: str) -> None:
    """The allowlist was checked at MAIL for the envelope sender; a rewrite sends another one."""
    domain = domain_of(mail_from)
    if not message.allowed_sender_domains or domain in message.allowed_sender_domains:
        return
    rewritten = mail_from != message.mail_from
    reply = rewritten_sender_not_allowed(domain) if rewritten else sender_domain_not_allowed(domain)
    raise Rejection(reply, reason="sender")


def _missing_fields(
    message: Received, by_name: dict[str, list[HeaderField]]
) -> tuple[list[bytes], dict[str, int], str]:
    """Message-ID and Date when the app left them out (RFC 5322 wants both): the new lines, their index
    by lower-cased name, and the Message-ID that is sent."""
    new_lines: list[bytes] = []
    ours: dict[str, int] = {}
    id_field = by_name.get("message-id", [None])[0]
    message_id = id_field.value if id_field else f"<{message.queue_id}@{message.hostname}>"
    if id_field is None:
        ours["message-id"] = len(new_lines)
        new_lines.append(fold_header("Message-ID", message_id))
    if "date" not in by_name:
        ours["date"] = len(new_lines)
        new_lines.append(fold_header("Date", format_datetime(message.received_at)))
    return new_lines, ours, message_id
