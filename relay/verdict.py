"""What the SMTP client is told once Infobip has answered (or failed to). Pure."""

from __future__ import annotations

import re

from relay.replies import Reply
from relay.upstream import DeliveryResult
from relay.wire import ServerReply, queued_id

_ENHANCED_PREFIX = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\s*(.*)$", re.DOTALL)


def _split(reply: ServerReply) -> tuple[str | None, str]:
    match = _ENHANCED_PREFIX.match(reply.first_line)
    return (match.group(1), match.group(2)) if match else (None, reply.first_line)


def client_reply(result: DeliveryResult) -> Reply:
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
        return Reply(250, "2.6.0", f"Message queued as {infobip_id}{note}")
    if final.code >= 500:
        return Reply(final.code, enhanced or "5.0.0", f"Infobip refused the message: {text}")
    return Reply(451, "4.4.3", f"Infobip deferred the message ({final}); try again later")
