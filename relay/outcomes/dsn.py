"""The bounce itself: an RFC 3464 delivery status notification, built with the standard library's
`email` package. Pure: the time and every value come in as arguments.

    multipart/report; report-type=delivery-status
      text/plain                  what happened, in words, for the person who reads the bounce mailbox
      message/delivery-status     Reporting-MTA, Arrival-Date; per recipient Final-Recipient, Action,
                                  Status, Diagnostic-Code (what programs that read bounces parse)
      text/rfc822-headers         the original header block as it was sent (no body)
"""

from __future__ import annotations

from datetime import UTC, datetime
from email.message import Message
from email.mime.base import MIMEBase
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import compat32
from email.utils import format_datetime

from relay.outcomes.decide import BOUNCED
from relay.outcomes.history import BounceJob, BounceRecipient

WIRE = compat32.clone(linesep="\r\n")


_WHY = {
    BOUNCED: "Infobip reported it undeliverable",
    "failed": "Infobip refused it",
    "expired": "the relay gave up after trying for too long",
    "queued": "still waiting",
}


def _text(text: str, subtype: str) -> MIMEText:
    """Plain 7-bit when the text is ASCII (readable as it is), else UTF-8."""
    return MIMEText(text, subtype, "us-ascii" if text.isascii() else "utf-8")


def _when(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(at, UTC))


def _words(job: BounceJob, hostname: str) -> str:
    if job.action == "delayed":
        lead = (
            f"This is the mail relay at {hostname}.\r\n\r\nYour message has not been delivered yet to the "
            "recipients below. The relay is still trying; you need not send it again. You will be told if "
            "it finally fails.\r\n"
        )
    else:
        lead = (
            f"This is the mail relay at {hostname}.\r\n\r\nYour message could not be delivered to the recipients "
            "below. This is a permanent failure: sending it again as it is will not help.\r\n"
        )
    lines = [lead, f"Message-ID: {job.message_id or '(none)'}", f"Received by the relay: {_when(job.received_at)}", ""]
    for r in job.recipients:
        lines.append(f"<{r.address}>: {_WHY.get(r.status, r.status)}: {r.diagnostic}")
    return "\r\n".join(lines) + "\r\n"


def _recipient_block(r: BounceRecipient, action: str, at: float) -> Message:
    block = Message()
    block["Final-Recipient"] = f"rfc822; {r.address}"
    block["Action"] = action
    block["Status"] = "4.4.7" if action == "delayed" else r.dsn_status
    kind = "x-infobip" if r.status == BOUNCED else "smtp"
    block["Diagnostic-Code"] = f"{kind}; {' '.join(r.diagnostic.split())}"
    block["Last-Attempt-Date"] = _when(at)
    return block


def build_dsn(job: BounceJob, *, hostname: str, to: str, now: float) -> bytes:
    """The whole bounce as the bytes to send (CRLF line ends). Its Message-ID is derived from the
    bounce's own id, so a copy sent again after a crash is recognisably the same bounce."""
    report = MIMEMultipart("report", report_type="delivery-status")
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{hostname}>"
    report["To"] = to
    delayed = job.action == "delayed"
    report["Subject"] = "Delayed Mail (still being retried)" if delayed else "Undelivered Mail Returned to Sender"
    report["Date"] = _when(now)
    report["Message-ID"] = f"<bounce-{job.bounce_id}-{job.queue_id}@{hostname}>"
    report["Auto-Submitted"] = "auto-replied"  # RFC 3834: no vacation replies to this
    report.attach(_text(_words(job, hostname), "plain"))
    status = MIMEBase("message", "delivery-status")
    head = Message()
    head["Reporting-MTA"] = f"dns; {hostname}"
    head["X-Relay-Queue-ID"] = job.queue_id
    head["Arrival-Date"] = _when(job.received_at)
    status.set_payload([head, *(_recipient_block(r, job.action, now) for r in job.recipients)])
    report.attach(status)
    report.attach(_text(job.headers.decode("utf-8", "replace"), "rfc822-headers"))
    return report.as_bytes(policy=WIRE)
