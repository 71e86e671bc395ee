"""structlog set-up: JSON lines (or console), one event per step of a message's life.

Everything else that writes to stderr goes through the same renderer: stdlib loggers (aiosmtpd's `mail.log`,
asyncio's TLS errors and "Task exception was never retrieved", aiohttp's), warnings, and exceptions nobody
caught (main thread, other threads, "Exception ignored in"). With `format = "json"` every line is one JSON
object, and a traceback is the `exception` field of its line, never lines of its own.

aiosmtpd's `mail.log` writes envelope addresses and command lines (AUTH included) at INFO/DEBUG; messages
may carry PHI, so it is held at ERROR whatever our level is, and no body is logged at any level.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import sys
import threading
from types import TracebackType
from typing import Any

import structlog

from relay.config import LogSettings
from relay.core.message import Envelope
from relay.ops import privacy

log = structlog.get_logger("relay.ops.logs")
_handler: logging.Handler | None = None  # ours on the root logger, replaced by a reload
# One list for the life of the process, changed in place by a reload: loggers are cached on first use
# (re-assembling one per call cost about a third of each line), and a cached logger keeps this list.
_processors: list[structlog.typing.Processor] = []
_threshold = logging.INFO  # log.level, read on every line, so a SIGHUP that changes it applies at once
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "warn": 30, "error": 40, "exception": 40, "critical": 50}


class LineBatcher:
    """structlog's logger: the lines of one event-loop iteration go out in one write, at its end.

    A message costs two JSON lines; writing and flushing each was two write(2) calls per message on the
    hot path. Lines from other threads, or with no loop running (start-up, shutdown), are written at once,
    after whatever is pending, so order is kept; at exit anything pending is written. The file is the
    sys.stderr of the moment of writing (loggers are cached, and tests swap sys.stderr).
    """

    def __init__(self) -> None:
        self._pending: list[str] = []
        self._lock = threading.Lock()
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        with self._lock:
            if loop is None:
                self._pending.append(message)
            else:
                if not self._pending:
                    loop.call_soon(self.flush)
                self._pending.append(message)
                return
        self.flush()

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
            if lines:
                sys.stderr.write("\n".join(lines) + "\n")
                sys.stderr.flush()

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


_lines = LineBatcher()


def _batcher(*_: Any) -> LineBatcher:
    return _lines


def _below_threshold(_: Any, method: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    if _LEVELS.get(method, logging.CRITICAL) < _threshold:
        raise structlog.DropEvent
    return event


def configure_logging(settings: LogSettings) -> None:
    global _handler, _threshold
    as_json = settings.format == "json"
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    stamped: list[structlog.typing.Processor] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tracebacks: list[structlog.typing.Processor] = (
        [structlog.processors.format_exc_info] if as_json else []
    )  # the console prints them itself
    tracebacks.append(redact)  # last before rendering: bound fields and tracebacks too
    _threshold = getattr(logging, settings.level.upper())
    _processors[:] = [_below_threshold, structlog.contextvars.merge_contextvars, *stamped, *tracebacks, renderer]
    structlog.configure(
        processors=_processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),  # the level is _below_threshold's
        logger_factory=_batcher,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *tracebacks, renderer],
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamped],
        )
    )
    root = logging.getLogger()
    if _handler is not None:
        root.removeHandler(_handler)
    root.addHandler(handler)
    _handler = handler
    root.setLevel(logging.WARNING)  # other libraries' chatter stays out, whatever our level
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    logging.captureWarnings(True)
    if as_json:
        sys.excepthook = _uncaught
        threading.excepthook = _uncaught_in_thread
        sys.unraisablehook = _unraisable


def redact(_: Any, __: str, event: structlog.typing.EventDict) -> structlog.typing.EventDict:
    """privacy.redact: every address in every field as its keyed hash, no Subject (relay/core/redaction.py)."""
    hasher = privacy.hasher()
    if hasher is None:
        return event
    return {key: hasher.value(key, value) for key, value in event.items()}


def _uncaught(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
    log.critical("uncaught_exception", exc_info=(kind, error, trace))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    thread = args.thread.name if args.thread is not None else None
    log.critical("uncaught_exception", thread=thread, exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def _unraisable(unraisable: Any) -> None:
    error = unraisable.exc_value
    log.error(
        "unraisable_exception",
        message=unraisable.err_msg or "Exception ignored in",
        object=repr(unraisable.object),
        exc_info=(unraisable.exc_type, error, unraisable.exc_traceback) if error is not None else None,
    )


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
