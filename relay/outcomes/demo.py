"""`relay serve --demo` closes the loop too: reports from the stand-in, bounces to a local mail server
that prints each one, so a newcomer sees swaks -> relay -> "Infobip" -> report -> bounce in one terminal."""

from __future__ import annotations

import email
import email.policy

from pydantic import SecretStr

from relay.config import Settings
from relay.testing.reports import BOUNCE_DOMAIN
from relay.testing.sink import MailSink, SunkMessage
from relay.testing.standin import InfobipStandIn


def print_bounce(message: SunkMessage) -> None:
    """What a bounce mailbox would receive, shortened to what a person reads first."""
    bounce = email.message_from_bytes(message.data, policy=email.policy.default)
    status = next((p for p in bounce.walk() if p.get_content_type() == "message/delivery-status"), None)
    blocks = status.get_payload() if status is not None else []
    lines = [f"{k}: {v}" for block in blocks if not isinstance(block, str) for k, v in block.items()]
    print(
        f"\n=== [demo company mail server] a bounce for <{', '.join(message.rcpt_tos)}> (MAIL FROM:<>) ===\n"
        f"Subject: {bounce['Subject']}\nContent-Type: {bounce.get_content_type()}; "
        f"report-type={bounce.get_param('report-type')}\n" + "\n".join(lines) + "\n"
        f"[{len(message.data)} bytes: a text part, this delivery-status part and the original header block]\n",
        flush=True,
    )


async def demo_outcomes(settings: Settings, standin: InfobipStandIn) -> tuple[Settings, MailSink]:
    """Turn reports (pulled from the stand-in every second) and bounces (to a printing sink) on."""
    await standin.reports.start()
    sink = MailSink(on_message=print_bounce)
    await sink.start()
    reports = settings.reports.model_copy(
        update={
            "enabled": True,
            "base_url": standin.reports.base_url,
            "api_key": SecretStr(standin.reports.api_key),
            "ca_file": standin.ca_file,
            "poll_interval": 1.0,
            "notify_url": "",
            "notify_listen": "",
            "history_path": None,
        }
    )
    bounces = settings.bounces.model_copy(
        update={"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": sink.port, "to": ""}
    )
    print(
        f"Delivery reports and bounces are on: every recipient at {BOUNCE_DOMAIN} bounces, and the bounce is\n"
        f"printed below a few seconds later, e.g.\n"
        f"  swaks --server 127.0.0.1:{settings.listen.port} --from app@example.com --to nobody@{BOUNCE_DOMAIN}\n"
        f"Then: RELAY_SPOOL__PATH={settings.spool.path} relay trace nobody@{BOUNCE_DOMAIN}",
        flush=True,
    )
    return settings.model_copy(update={"reports": reports, "bounces": bounces}), sink
