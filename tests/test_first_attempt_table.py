"""The first-attempt table, row by row, and the state machine around it: plain values, no socket."""

from __future__ import annotations

import pytest

from relay.core.first_attempt import (
    Answer,
    Attempt,
    Client,
    Commit,
    Decision,
    FirstAttempt,
    Store,
    attempt_of,
    decide,
)
from relay.core.retry import AttemptResult

PENDING, WRITTEN, FAILED = Commit.PENDING, Commit.WRITTEN, Commit.FAILED
WAITING, SENDING, ACCEPTED, PARTIAL, REFUSED, DEFERRED = (
    Attempt.WAITING,
    Attempt.SENDING,
    Attempt.ACCEPTED,
    Attempt.PARTIAL,
    Attempt.REFUSED,
    Attempt.DEFERRED,
)
STOPPED_WAITING, GONE = Client.STOPPED_WAITING, Client.GONE
WAIT, VERDICT, QUEUED, UNSTORABLE, NOBODY = Answer.WAIT, Answer.VERDICT, Answer.QUEUED, Answer.UNSTORABLE, Answer.NOBODY
NOTHING, TAKE_TO_QUEUE, WITHDRAW, MARK_DONE, MARK_DONE_DURABLY, SETTLE, DROP = (
    Store.NOTHING,
    Store.TAKE_TO_QUEUE,
    Store.WITHDRAW,
    Store.MARK_DONE,
    Store.MARK_DONE_DURABLY,
    Store.SETTLE,
    Store.DROP,
)

# Every combination, written out: (commit, attempt, client as Attempt/Client names, answer, store).
# The client column reuses WAITING for Client.WAITING (see _client).
ROWS = [
    (PENDING, WAITING, "WAITING", WAIT, NOTHING),
    (PENDING, WAITING, "STOPPED_WAITING", WAIT, NOTHING),
    (PENDING, WAITING, "GONE", NOBODY, NOTHING),
    (PENDING, SENDING, "WAITING", WAIT, NOTHING),
    (PENDING, SENDING, "STOPPED_WAITING", WAIT, NOTHING),
    (PENDING, SENDING, "GONE", NOBODY, NOTHING),
    (PENDING, ACCEPTED, "WAITING", VERDICT, NOTHING),
    (PENDING, ACCEPTED, "STOPPED_WAITING", VERDICT, NOTHING),
    (PENDING, ACCEPTED, "GONE", NOBODY, NOTHING),
    (PENDING, PARTIAL, "WAITING", WAIT, NOTHING),
    (PENDING, PARTIAL, "STOPPED_WAITING", WAIT, NOTHING),
    (PENDING, PARTIAL, "GONE", NOBODY, NOTHING),
    (PENDING, REFUSED, "WAITING", WAIT, NOTHING),
    (PENDING, REFUSED, "STOPPED_WAITING", WAIT, NOTHING),
    (PENDING, REFUSED, "GONE", NOBODY, NOTHING),
    (PENDING, DEFERRED, "WAITING", WAIT, NOTHING),
    (PENDING, DEFERRED, "STOPPED_WAITING", WAIT, NOTHING),
    (PENDING, DEFERRED, "GONE", NOBODY, NOTHING),
    (WRITTEN, WAITING, "WAITING", WAIT, NOTHING),
    (WRITTEN, WAITING, "STOPPED_WAITING", QUEUED, TAKE_TO_QUEUE),
    (WRITTEN, WAITING, "GONE", NOBODY, TAKE_TO_QUEUE),
    (WRITTEN, SENDING, "WAITING", WAIT, NOTHING),
    (WRITTEN, SENDING, "STOPPED_WAITING", QUEUED, NOTHING),
    (WRITTEN, SENDING, "GONE", NOBODY, NOTHING),
    (WRITTEN, ACCEPTED, "WAITING", VERDICT, MARK_DONE),
    (WRITTEN, ACCEPTED, "STOPPED_WAITING", VERDICT, MARK_DONE),
    (WRITTEN, ACCEPTED, "GONE", NOBODY, MARK_DONE),
    (WRITTEN, PARTIAL, "WAITING", VERDICT, SETTLE),
    (WRITTEN, PARTIAL, "STOPPED_WAITING", QUEUED, SETTLE),
    (WRITTEN, PARTIAL, "GONE", NOBODY, SETTLE),
    (WRITTEN, REFUSED, "WAITING", VERDICT, MARK_DONE_DURABLY),
    (WRITTEN, REFUSED, "STOPPED_WAITING", QUEUED, SETTLE),
    (WRITTEN, REFUSED, "GONE", NOBODY, SETTLE),
    (WRITTEN, DEFERRED, "WAITING", VERDICT, SETTLE),
    (WRITTEN, DEFERRED, "STOPPED_WAITING", QUEUED, SETTLE),
    (WRITTEN, DEFERRED, "GONE", NOBODY, SETTLE),
    (FAILED, WAITING, "WAITING", UNSTORABLE, WITHDRAW),
    (FAILED, WAITING, "STOPPED_WAITING", UNSTORABLE, WITHDRAW),
    (FAILED, WAITING, "GONE", NOBODY, WITHDRAW),
    (FAILED, SENDING, "WAITING", WAIT, NOTHING),
    (FAILED, SENDING, "STOPPED_WAITING", WAIT, NOTHING),
    (FAILED, SENDING, "GONE", NOBODY, NOTHING),
    (FAILED, ACCEPTED, "WAITING", VERDICT, NOTHING),
    (FAILED, ACCEPTED, "STOPPED_WAITING", VERDICT, NOTHING),
    (FAILED, ACCEPTED, "GONE", NOBODY, NOTHING),
    (FAILED, PARTIAL, "WAITING", UNSTORABLE, DROP),
    (FAILED, PARTIAL, "STOPPED_WAITING", UNSTORABLE, DROP),
    (FAILED, PARTIAL, "GONE", NOBODY, DROP),
    (FAILED, REFUSED, "WAITING", VERDICT, DROP),
    (FAILED, REFUSED, "STOPPED_WAITING", VERDICT, DROP),
    (FAILED, REFUSED, "GONE", NOBODY, DROP),
    (FAILED, DEFERRED, "WAITING", UNSTORABLE, DROP),
    (FAILED, DEFERRED, "STOPPED_WAITING", UNSTORABLE, DROP),
    (FAILED, DEFERRED, "GONE", NOBODY, DROP),
]

CLIENTS = {"WAITING": Client.WAITING, "STOPPED_WAITING": STOPPED_WAITING, "GONE": GONE}


def test_the_rows_cover_every_combination_once() -> None:
    keys = {(c, a, client) for c, a, client, _, _ in ROWS}
    assert len(keys) == len(ROWS) == len(Commit) * len(Attempt) * len(Client)


@pytest.mark.parametrize(("commit", "attempt", "client", "answer", "store"), ROWS)
def test_row(commit: Commit, attempt: Attempt, client: str, answer: Answer, store: Store) -> None:
    assert decide(commit, attempt, CLIENTS[client]) == Decision(answer, store)


@pytest.mark.parametrize(("commit", "attempt", "client", "answer", "store"), ROWS)
def test_no_row_says_250_for_a_message_that_is_neither_on_disk_nor_with_infobip(
    commit: Commit, attempt: Attempt, client: str, answer: Answer, store: Store
) -> None:
    if answer is QUEUED or (answer is VERDICT and attempt in (PARTIAL, DEFERRED)):
        assert commit is WRITTEN
    if answer is UNSTORABLE:
        assert commit is FAILED and attempt is not ACCEPTED
    if store in (SETTLE, MARK_DONE_DURABLY, MARK_DONE, TAKE_TO_QUEUE):
        assert commit is WRITTEN  # nothing can be settled that was never written
    if CLIENTS[client] is GONE:
        assert answer is NOBODY


def result(accepted: int = 0, transient: int = 0, permanent: int = 0) -> AttemptResult:
    return AttemptResult(
        accepted=tuple(f"a{n}@example.org" for n in range(accepted)),
        transient={f"t{n}@example.org": "451 4.4.1 later" for n in range(transient)},
        permanent={f"p{n}@example.org": "550 5.1.1 no such user" for n in range(permanent)},
        infobip_ids=("ib-1",) if accepted else (),
    )


@pytest.mark.parametrize(
    ("outcome", "attempt"),
    [
        (result(accepted=2), ACCEPTED),
        (result(accepted=1, transient=1), PARTIAL),
        (result(accepted=1, permanent=1), PARTIAL),
        (result(permanent=2), REFUSED),
        (result(transient=1, permanent=1), DEFERRED),
        (result(transient=1), DEFERRED),
    ],
)
def test_attempt_of(outcome: AttemptResult, attempt: Attempt) -> None:
    assert attempt_of(outcome) is attempt


def test_infobip_taking_everything_answers_before_the_disk() -> None:
    machine = FirstAttempt()
    assert machine.sending() == Decision(WAIT, NOTHING)
    decision = machine.verdict(result(accepted=1))
    assert decision == Decision(VERDICT, NOTHING) and decision.answer_now
    reply = machine.answer(decision, "q1")
    assert reply is not None and str(reply) == "250 2.6.0 Message queued as ib-1"
    assert machine.committed() == Decision(NOBODY, MARK_DONE)  # answered once; the done mark still due


def test_a_refusal_handed_back_stands_when_sync_wait_passes_during_the_durable_done_mark() -> None:
    machine = FirstAttempt()
    machine.committed()
    machine.sending()
    decision = machine.verdict(result(permanent=1))
    assert decision == Decision(VERDICT, MARK_DONE_DURABLY) and not decision.answer_now
    machine.begin(MARK_DONE_DURABLY)
    assert machine.stopped_waiting() == Decision(VERDICT, NOTHING)  # not "queued": it is being removed
    reply = machine.answer(machine.decision(), "q1")
    assert reply is not None and reply.code == 550


def test_sync_wait_passing_before_any_worker_takes_it_queues_it_once() -> None:
    machine = FirstAttempt()
    machine.committed()
    decision = machine.stopped_waiting()
    assert decision == Decision(QUEUED, TAKE_TO_QUEUE) and not decision.answer_now
    machine.begin(TAKE_TO_QUEUE)
    assert machine.gone() == Decision(NOBODY, NOTHING)  # not taken to queue/ twice


def test_a_failed_commit_while_a_worker_sends_waits_for_infobip() -> None:
    machine = FirstAttempt()
    machine.sending()
    assert machine.commit_failed() == Decision(WAIT, NOTHING)
    decision = machine.verdict(result(transient=1))
    assert decision == Decision(UNSTORABLE, DROP)
    reply = machine.answer(decision, "q1")
    assert reply is not None and (reply.code, reply.enhanced) == (452, "4.3.1")
    assert machine.answer(decision, "q1") is None  # never twice
