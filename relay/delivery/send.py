"""One attempt through the upstream pool, and what it is counted and logged as."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import structlog

from relay.core.breaker import Change, CircuitBreaker
from relay.core.message import Prepared
from relay.core.replies import INTERNAL_ERROR
from relay.core.retry import AttemptResult, NextStep, recipient_batches
from relay.core.smtp_client import queued_id
from relay.delivery.clock import Clock
from relay.delivery.queue import Job
from relay.ops.logs import message_fields
from relay.ops.metrics import Metrics
from relay.upstream.errors import UpstreamError, UpstreamUnreachable
from relay.upstream.pool import UpstreamPool

log = structlog.get_logger("relay.delivery")


async def send(
    pool: UpstreamPool,
    breaker: CircuitBreaker,
    clock: Clock,
    metrics: Metrics,
    message: Prepared,
    recipients: tuple[str, ...],
    on_change: Callable[[Change | None], None],
) -> AttemptResult:
    """One attempt: every batch of at most 1000 recipients, each through the pool; the breaker hears
    of each connection-level failure and each success."""
    accepted: list[str] = []
    transient: dict[str, str] = {}
    permanent: dict[str, str] = {}
    ids: list[str] = []
    accepted_reply = ""
    unreachable = True  # until Infobip answers anything, or a connection is lost mid-way
    for batch in recipient_batches(recipients):
        try:
            result = await pool.deliver(dataclasses.replace(message, recipients=batch))
        except UpstreamError as exc:
            on_change(breaker.failure(clock.monotonic(), str(exc.reply), clock.random()))
            unreachable = unreachable and isinstance(exc, UpstreamUnreachable)
            transient.update({rcpt: str(exc.reply) for rcpt in batch})
            continue
        except Exception as exc:  # a bug or a surprise: retried on schedule, dead-lettered after max_age
            log.error("delivery_error", error_type=type(exc).__name__, error=str(exc))
            transient.update({rcpt: str(INTERNAL_ERROR) for rcpt in batch})
            unreachable = False
            continue
        unreachable = False
        on_change(breaker.success())
        metrics.upstream_replies.labels(str(result.final.code)).inc()
        for rcpt, reply in result.refused.items():
            (transient if reply.transient else permanent)[rcpt] = str(reply)
        if result.final.ok:
            accepted.extend(result.accepted)
            accepted_reply = str(result.final)
            if infobip_id := queued_id(result.final):
                ids.append(infobip_id)
        else:
            target = transient if result.final.transient else permanent
            target.update({rcpt: str(result.final) for rcpt in batch if rcpt not in result.refused})
    held = unreachable and bool(transient) and not (accepted or permanent)
    return AttemptResult(
        tuple(accepted), transient, permanent, tuple(ids), unreachable=held, accepted_reply=accepted_reply
    )


def count_and_log(
    metrics: Metrics, job: Job, result: AttemptResult, step: NextStep, *, handed_back: bool, now: float
) -> None:
    if result.accepted:
        metrics.relayed.inc()
        metrics.profile_relayed.labels(job.envelope.profile).inc()
    if step.retry:
        metrics.deferred.inc()
        metrics.profile_deferred.labels(job.envelope.profile).inc()
    if step.dead and not handed_back:
        metrics.dead.inc()
    log.info(
        "delivery_attempt",
        **message_fields(job.envelope, recipients=len(job.recipients or job.envelope.recipients)),
        infobip_id=",".join(result.infobip_ids) or None,
        attempt=job.attempts,
        outcome="handed_back" if handed_back else _outcome(result, step.retry),
        reply=step.last_reply or result.accepted_reply or None,
        accepted=len(result.accepted),
        deferred=len(step.retry),
        dead=0 if handed_back else len(step.dead),
        next_attempt_in=round(step.retry_at - now, 1) if step.retry_at else None,
    )


def _outcome(result: AttemptResult, retry: tuple[str, ...]) -> str:
    if result.accepted and not retry and not result.permanent:
        return "delivered"
    if result.accepted:
        return "partial"
    return "deferred" if retry else "dead"
