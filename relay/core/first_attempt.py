"""The first attempt: what the SMTP client is told, and what the store must do. Pure, like h11's `_state.py`.

Rule 1: every decision about a message between its DATA and the client's answer lives in this file.

A message's first attempt runs beside its commit to the journal, while the client may wait up to
`sync_wait` for Infobip's verdict. Three things change independently: the commit (pending, written,
failed), the attempt (waiting for a worker, sending, and then Infobip's verdict), and the client
(waiting, stopped waiting after `sync_wait`, gone). `TABLE` says, for every combination, what the client
is told and what the store must do; `FirstAttempt` holds one message's state and answers each event
with the decision it now implies. The shells carry decisions out and never decide themselves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

from relay.core.headers import clean_value
from relay.core.replies import Reply, unstorable
from relay.core.retry import AttemptResult
from relay.core.smtp_client import DeliveryResult, ServerReply, queued_id


class Commit(Enum):
    PENDING = "pending"
    WRITTEN = "written"  # in the journal and fsync'd
    FAILED = "failed"  # not on disk: nothing can be retried from it


class Attempt(Enum):
    WAITING = "waiting"  # no worker has it yet
    SENDING = "sending"
    ACCEPTED = "accepted"  # Infobip took every recipient
    PARTIAL = "partial"  # Infobip took some; the others were deferred or refused
    REFUSED = "refused"  # none taken, every refusal permanent
    DEFERRED = "deferred"  # none taken, some refusal temporary (or no verdict: connection failed)


class Client(Enum):
    WAITING = "waiting"
    STOPPED_WAITING = "stopped_waiting"  # sync_wait passed: "queued" is the best answer now
    GONE = "gone"  # hung up: nobody to tell


class Answer(Enum):
    WAIT = "wait"  # nothing to say yet
    VERDICT = "verdict"  # what Infobip decided (`verdict_reply`)
    QUEUED = "queued"  # 250: safely on disk, delivery continues in the background
    UNSTORABLE = "unstorable"  # 452: neither on disk nor accepted by Infobip: the app must retry
    NOBODY = "nobody"  # the client is gone (or was answered already)


class Store(Enum):
    NOTHING = "nothing"
    TAKE_TO_QUEUE = "take_to_queue"  # a message no worker has yet: to its own file in queue/, out of memory
    WITHDRAW = "withdraw"  # never stored, never sent: forget it (the client hears 452)
    MARK_DONE = "mark_done"  # delivered: a done mark in the journal, lazily (a crash first: one redelivery)
    MARK_DONE_DURABLY = "mark_done_durably"  # handed back to the client as 5xx: gone before the answer
    SETTLE = "settle"  # to queue/, then retry or dead-letter by the retry schedule
    DROP = "drop"  # not on disk and not all accepted: nothing to keep (the client hears 452 or 5xx)


# Actions the worker carries out (it holds the message and Infobip's result); the others are carried
# out by whoever brought the event (the commit finishing, the client's wait ending).
WORKER_ACTIONS = frozenset({Store.SETTLE, Store.MARK_DONE_DURABLY, Store.DROP})
# The client hears its answer only after these are done, so that what it is told is true on disk.
ANSWER_AFTER = frozenset({Store.TAKE_TO_QUEUE, Store.SETTLE, Store.MARK_DONE_DURABLY})


@dataclass(frozen=True, slots=True)
class Decision:
    answer: Answer
    store: Store

    @property
    def answer_now(self) -> bool:
        """May the answer go out before the store action is done?"""
        return self.answer not in (Answer.WAIT, Answer.NOBODY) and self.store not in ANSWER_AFTER


ANY = None
VERDICTS = (Attempt.PARTIAL, Attempt.REFUSED, Attempt.DEFERRED)  # not all accepted
PRESENT = (Client.WAITING, Client.STOPPED_WAITING)
_Key = tuple[Commit | None, Attempt | tuple[Attempt, ...] | None, Client | tuple[Client, ...] | None]

# (commit, attempt, client) -> (answer, store). The first matching row wins; None matches anything.
TABLE: tuple[tuple[_Key, Decision], ...] = (
    # Infobip took every recipient: the answer needs nothing from the disk.
    ((Commit.PENDING, Attempt.ACCEPTED, PRESENT), Decision(Answer.VERDICT, Store.NOTHING)),
    ((Commit.PENDING, Attempt.ACCEPTED, Client.GONE), Decision(Answer.NOBODY, Store.NOTHING)),
    ((Commit.WRITTEN, Attempt.ACCEPTED, PRESENT), Decision(Answer.VERDICT, Store.MARK_DONE)),
    ((Commit.WRITTEN, Attempt.ACCEPTED, Client.GONE), Decision(Answer.NOBODY, Store.MARK_DONE)),
    ((Commit.FAILED, Attempt.ACCEPTED, PRESENT), Decision(Answer.VERDICT, Store.NOTHING)),
    ((Commit.FAILED, Attempt.ACCEPTED, Client.GONE), Decision(Answer.NOBODY, Store.NOTHING)),
    # Anything less than all needs the commit's outcome first.
    ((Commit.PENDING, ANY, PRESENT), Decision(Answer.WAIT, Store.NOTHING)),
    ((Commit.PENDING, ANY, Client.GONE), Decision(Answer.NOBODY, Store.NOTHING)),
    # On disk.
    ((Commit.WRITTEN, Attempt.WAITING, Client.WAITING), Decision(Answer.WAIT, Store.NOTHING)),
    ((Commit.WRITTEN, Attempt.WAITING, Client.STOPPED_WAITING), Decision(Answer.QUEUED, Store.TAKE_TO_QUEUE)),
    ((Commit.WRITTEN, Attempt.WAITING, Client.GONE), Decision(Answer.NOBODY, Store.TAKE_TO_QUEUE)),
    ((Commit.WRITTEN, Attempt.SENDING, Client.WAITING), Decision(Answer.WAIT, Store.NOTHING)),
    ((Commit.WRITTEN, Attempt.SENDING, Client.STOPPED_WAITING), Decision(Answer.QUEUED, Store.NOTHING)),
    ((Commit.WRITTEN, Attempt.SENDING, Client.GONE), Decision(Answer.NOBODY, Store.NOTHING)),
    ((Commit.WRITTEN, Attempt.REFUSED, Client.WAITING), Decision(Answer.VERDICT, Store.MARK_DONE_DURABLY)),
    ((Commit.WRITTEN, (Attempt.PARTIAL, Attempt.DEFERRED), Client.WAITING), Decision(Answer.VERDICT, Store.SETTLE)),
    ((Commit.WRITTEN, VERDICTS, Client.STOPPED_WAITING), Decision(Answer.QUEUED, Store.SETTLE)),
    ((Commit.WRITTEN, VERDICTS, Client.GONE), Decision(Answer.NOBODY, Store.SETTLE)),
    # Not on disk: never a 250 unless Infobip has every recipient.
    ((Commit.FAILED, Attempt.WAITING, PRESENT), Decision(Answer.UNSTORABLE, Store.WITHDRAW)),
    ((Commit.FAILED, Attempt.WAITING, Client.GONE), Decision(Answer.NOBODY, Store.WITHDRAW)),
    ((Commit.FAILED, Attempt.SENDING, PRESENT), Decision(Answer.WAIT, Store.NOTHING)),  # its verdict decides
    ((Commit.FAILED, Attempt.SENDING, Client.GONE), Decision(Answer.NOBODY, Store.NOTHING)),
    ((Commit.FAILED, Attempt.REFUSED, PRESENT), Decision(Answer.VERDICT, Store.DROP)),  # nothing to keep anyway
    ((Commit.FAILED, (Attempt.PARTIAL, Attempt.DEFERRED), PRESENT), Decision(Answer.UNSTORABLE, Store.DROP)),
    ((Commit.FAILED, VERDICTS, Client.GONE), Decision(Answer.NOBODY, Store.DROP)),
)


def _matches(value: Enum, pattern: Enum | tuple[Enum, ...] | None) -> bool:
    return pattern is None or value == pattern or (isinstance(pattern, tuple) and value in pattern)


def _first_row(commit: Commit, attempt: Attempt, client: Client) -> Decision:
    for (c, a, cl), decision in TABLE:
        if _matches(commit, c) and _matches(attempt, a) and _matches(client, cl):
            return decision
    raise AssertionError(f"no row for {commit}, {attempt}, {client}")  # the row-by-row test covers all


# Every combination looked up once: decide() runs several times per message on the hot path.
_DECISIONS = {(c, a, cl): _first_row(c, a, cl) for c in Commit for a in Attempt for cl in Client}


def decide(commit: Commit, attempt: Attempt, client: Client) -> Decision:
    """The table's answer for one combination."""
    return _DECISIONS[commit, attempt, client]


def attempt_of(result: AttemptResult) -> Attempt:
    """Infobip's verdict on every recipient, as one of the table's attempt states."""
    if result.complete:
        return Attempt.ACCEPTED
    if result.accepted:
        return Attempt.PARTIAL
    if result.permanent and not result.transient:
        return Attempt.REFUSED
    return Attempt.DEFERRED


class FirstAttempt:
    """One message's first attempt. Each event returns the decision it now implies, once: an answer
    already given and a store action already begun are not repeated. Once the worker has begun a
    store action, the decision it acted on stands (the client's wait ending cannot change it)."""

    def __init__(self) -> None:
        self.commit = Commit.PENDING
        self.attempt = Attempt.WAITING
        self.client = Client.WAITING
        self.result: AttemptResult | None = None
        self.answered = False
        self.answered_with = Answer.WAIT
        self._begun: set[Store] = set()
        self._locked: Decision | None = None

    def committed(self) -> Decision:
        self.commit = Commit.WRITTEN
        return self.decision()

    def commit_failed(self) -> Decision:
        self.commit = Commit.FAILED
        return self.decision()

    def sending(self) -> Decision:
        self.attempt = Attempt.SENDING
        return self.decision()

    def verdict(self, result: AttemptResult) -> Decision:
        self.result = result
        self.attempt = attempt_of(result)
        return self.decision()

    def stopped_waiting(self) -> Decision:
        if self.client is Client.WAITING and self._locked is None:
            self.client = Client.STOPPED_WAITING
        return self.decision()

    def gone(self) -> Decision:
        self.client = Client.GONE
        return self.decision()

    def decision(self) -> Decision:
        """What the current state implies, less what was already done."""
        decision = self._locked or decide(self.commit, self.attempt, self.client)
        answer = Answer.NOBODY if self.answered or self.client is Client.GONE else decision.answer
        store = Store.NOTHING if decision.store in self._begun else decision.store
        return Decision(answer, store)

    def begin(self, store: Store) -> None:
        """The shell starts carrying `store` out; a worker's action fixes the decision."""
        self._begun.add(store)
        if store in WORKER_ACTIONS:
            self._locked = decide(self.commit, self.attempt, self.client)

    def answer(self, decision: Decision, queue_id: str) -> Reply | None:
        """The reply for `decision`, once (None when there is nothing, or nothing more, to say)."""
        if self.answered or decision.answer in (Answer.WAIT, Answer.NOBODY):
            return None
        self.answered = True
        self.answered_with = decision.answer
        if decision.answer is Answer.UNSTORABLE:
            return unstorable()
        if decision.answer is Answer.QUEUED:
            return spooled_reply(queue_id, None)
        return spooled_reply(queue_id, self.result)


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
    if result.accepted and not failed:
        return Reply(250, "2.6.0", clean_value(f"Message queued as {','.join(result.infobip_ids) or queue_id}"))
    if result.accepted:  # "queued", not Infobip's acceptance: say what happened to the others
        total = len(failed) + len(result.accepted)
        parts = [f"Queued as {queue_id}; Infobip took {len(result.accepted)} of {total} recipients"]
        if result.transient:
            parts.append(
                f"{len(result.transient)} deferred, the relay will retry ({next(iter(result.transient.values()))})"
            )
        if result.permanent:
            parts.append(f"{len(result.permanent)} refused for good ({next(iter(result.permanent.values()))})")
        return Reply(250, "2.0.0", clean_value("; ".join(parts)))
    if result.permanent and not result.transient:
        refusal = _parse(next(iter(result.permanent.values())))
        enhanced, words = _split(refusal)
        code = refusal.code if 500 <= refusal.code < 600 else 550
        return Reply(code, enhanced or "5.0.0", f"Infobip refused the message: {clean_value(words)}")
    first = clean_value(next(iter(failed.values())))
    return Reply(250, "2.0.0", f"Queued as {queue_id}; Infobip deferred it ({first}); the relay will retry")


def outcome(answer: Answer, attempt: Attempt) -> str:
    """The `outcome` of the `message_answered` log line."""
    if answer is Answer.VERDICT and attempt in (Attempt.ACCEPTED, Attempt.PARTIAL):
        return "relayed"
    if answer is Answer.VERDICT and attempt is Attempt.REFUSED:
        return "refused"
    return "unstorable" if answer is Answer.UNSTORABLE else "queued"
