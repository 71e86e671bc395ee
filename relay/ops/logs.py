"""structlog set-up: JSON lines (or console), one event per step of a message's life.

aiosmtpd's own `mail.log` logger writes envelope addresses and command lines at INFO/DEBUG; messages may
carry PHI, so it is held at ERROR whatever our level is.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from relay.config import LogSettings
from relay.core.message import Envelope


def configure_logging(settings: LogSettings) -> None:
    level = getattr(logging, settings.level.upper())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if settings.format == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.WriteLoggerFactory(sys.stderr),
        cache_logger_on_first_use=False,  # True would ignore a log.level changed by SIGHUP
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s %(message)s")
    logging.getLogger("mail.log").setLevel(logging.ERROR)


def log_message(
    logger: Any,
    event: str,
    *,
    queue_id: str,
    client_ip: str,
    sender: str,
    recipients: int,
    size: int,
    outcome: str,
    reply: str | None,
    infobip_id: str | None = None,
    attempt: int | None = None,
    level: str = "info",
    **extra: Any,
) -> None:
    """One step of a message's life, always with the same keys, so ops can follow a queue id."""
    getattr(logger, level)(
        event,
        queue_id=queue_id,
        client_ip=client_ip,
        sender=sender,
        recipients=recipients,
        size=size,
        infobip_id=infobip_id,
        attempt=attempt,
        outcome=outcome,
        reply=reply,
        **extra,
    )


def message_fields(envelope: Envelope, **overrides: Any) -> dict[str, Any]:
    """The keys every line about a message carries besides the bound `queue_id` and `client_ip`."""
    fields: dict[str, Any] = {
        "sender": envelope.mail_from,
        "recipients": len(envelope.recipients),
        "size": envelope.size,
    }
    fields.update(overrides)
    return fields
