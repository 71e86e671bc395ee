"""What happens after each delivery attempt, and when the next one is due. Pure: no clock, no random.

An attempt splits a message's recipients three ways: accepted (done), transient failure (retry with
exponential backoff and jitter until `max_age`), permanent failure (dead-letter at once).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

INFOBIP_MAX_RECIPIENTS = 1000  # per transaction (seed 002)


def recipient_batches(recipients: Sequence[str], size: int = INFOBIP_MAX_RECIPIENTS) -> list[tuple[str, ...]]:
    """Transactions of at most `size` recipients, in order (ops may allow more per message than Infobip)."""
    return [tuple(recipients[i : i + size]) for i in range(0, len(recipients), size)] or [()]


def backoff(attempt: int, *, initial: float, maximum: float, jitter: float) -> float:
    """Seconds before attempt `attempt + 1`: initial * 2^(attempt-1), capped, scaled by jitter in [0, 1).

    The jitter keeps the delay within [50%, 100%) of the nominal value, so retries of many messages
    that failed together do not arrive together.
    """
    nominal: float = min(maximum, initial * 2.0 ** max(0, attempt - 1))
    return nominal * (0.5 + jitter / 2)


@dataclass(frozen=True, slots=True)
class AttemptResult:
    """One attempt's outcome per recipient, with the reply that decided it."""

    accepted: tuple[str, ...] = ()
    transient: dict[str, str] = field(default_factory=dict)  # recipient -> reply text
    permanent: dict[str, str] = field(default_factory=dict)
    infobip_ids: tuple[str, ...] = ()
    accepted_reply: str = ""  # Infobip's 250 text ("250 2.6.0 Message queued as ...") when it took some
    stored: bool = True  # False: the spool write failed, so nothing can be retried from disk
    unreachable: bool = False  # every failure was Infobip not answering at all (connect, TLS, AUTH)

    @property
    def complete(self) -> bool:
        """Infobip accepted every recipient: the message needs nothing more from us."""
        return bool(self.accepted) and not (self.transient or self.permanent)


@dataclass(frozen=True, slots=True)
class NextStep:
    """What the spool must do with the message now."""

    retry: tuple[str, ...]  # recipients to try again
    retry_at: float | None  # when (None: nothing to retry)
    dead: dict[str, str]  # recipients to dead-letter, with the reason
    last_reply: str
    held: bool = False  # held by an outage, not deferred by Infobip: due again when a probe succeeds


def next_step(
    result: AttemptResult,
    *,
    attempts: int,
    first_seen: float,
    now: float,
    max_age: float,
    initial: float,
    maximum: float,
    jitter: float,
    hold: float = 1.0,
) -> NextStep:
    """An outage (`result.unreachable`) is not the message's fault: it waits `hold` seconds (the breaker
    pauses everything meanwhile) and its own backoff does not grow; Infobip's 4xx backs off."""
    dead = dict(result.permanent)
    last_reply = next(iter(result.transient.values()), None) or next(iter(result.permanent.values()), "")
    if not result.transient:
        return NextStep(retry=(), retry_at=None, dead=dead, last_reply=last_reply)
    held = result.unreachable
    retry_at = now + (hold if held else backoff(attempts, initial=initial, maximum=maximum, jitter=jitter))
    if retry_at - first_seen > max_age:
        expired = f"expired after {attempts} attempts over {int(now - first_seen)} s; last reply: {last_reply}"
        dead.update({rcpt: expired for rcpt in result.transient})
        return NextStep(retry=(), retry_at=None, dead=dead, last_reply=last_reply)
    return NextStep(retry=tuple(result.transient), retry_at=retry_at, dead=dead, last_reply=last_reply, held=held)
