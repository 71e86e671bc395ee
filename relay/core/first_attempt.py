"""What the SMTP client is told once Infobip has answered (or failed to). Pure."""

from __future__ import annotations

import re

from relay.core.headers import clean_value
from relay.core.replies import Reply
from relay.core.retry import AttemptResult
from relay.core.smtp_client import DeliveryResult, ServerReply, queued_id

_ENHANCED_PREFIX = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*(.*)$", re.DOTALL)


def _split(reply: ServerReply) -> tuple[str | None, str]:
    """Infobip's enhanced code and text; a code whose class contradicts the reply's stays in the text."""
    match = _ENHANCED_PREFIX.match(reply.first_line)
    if match and match.group(1)[0] == str(reply.code)[0]:
        return match.group(1), match.group(2)
    return None, reply.first_line


def client_reply(result: DeliveryResult) -> Reply:
    """Infobip's text is cleaned of control characters: it goes into our reply line as it is otherwise."""
    final = result.final
    enhanced, text = _split(final)
    if final.ok:
        infobip_id = queued_id(final) or "unknown"
        note = ""
        if result.refused:
            first = next(iter(result.refused.values()))
            note = (
                f"; {len(result.refused)} of {len(result.refused) + len(result.accepted)} recipients refused ({first})"
            )
        return Reply(250, "2.6.0", clean_value(f"Message queued as {infobip_id}{note}"))
    if 500 <= final.code < 600:
        return Reply(final.code, enhanced or "5.0.0", f"Infobip refused the message: {clean_value(text)}")
    # 4xx, and anything that is neither success nor a known permanent failure: never a 5xx for those.
    return Reply(451, "4.4.3", f"Infobip deferred the message ({clean_value(str(final))}); try again later")


def _parse(text: str) -> ServerReply:
    """A reply kept in the spool as text ("550 5.7.1 ...") back into a reply."""
    code, _, rest = text.partition(" ")
    return ServerReply(int(code) if code.isdigit() else 451, rest)


def spooled_reply(queue_id: str, result: AttemptResult | None) -> Reply:
    """The reply once the message is safely in the spool, given the first attempt's result (if any came)."""
    if result is None:
        return Reply(250, "2.0.0", f"Queued as {queue_id}; delivery to Infobip continues in the background")
    failed = {**result.transient, **result.permanent}
    if result.accepted:
        note = ""
        if failed:
            total = len(failed) + len(result.accepted)
            note = f"; {len(failed)} of {total} recipients refused or deferred ({next(iter(failed.values()))})"
        return Reply(250, "2.6.0", clean_value(f"Message queued as {','.join(result.infobip_ids) or queue_id}{note}"))
    if result.permanent and not result.transient:
        refusal = _parse(next(iter(result.permanent.values())))
        enhanced, words = _split(refusal)
        code = refusal.code if 500 <= refusal.code < 600 else 550
        return Reply(code, enhanced or "5.0.0", f"Infobip refused the message: {clean_value(words)}")
    first = clean_value(next(iter(failed.values())))
    return Reply(250, "2.0.0", f"Queued as {queue_id}; Infobip deferred it ({first}); the relay will retry")
