"""relay.inbound.upload: what a DATA upload keeps, what the memory budget holds, and why it is refused."""

from __future__ import annotations

from relay.core.replies import Reply
from relay.inbound.access import Refusal
from relay.inbound.limits import MemoryBudget
from relay.inbound.upload import Upload


def test_lines_are_kept_dot_unstuffed_and_counted_against_the_budget() -> None:
    budget = MemoryBudget(1000)
    upload = Upload(budget, max_size=100)
    for line in (b"Subject: x\r\n", b"\r\n", b"..leading dot\r\n", b"..\r\n"):
        upload.add(line)
    assert upload.refusal is None
    data = upload.take()
    assert data == b"Subject: x\r\n\r\n.leading dot\r\n.\r\n"
    assert budget.used == len(data)  # handed on, still counted until released
    upload.release()
    assert budget.used == 0


def test_too_big_is_refused_and_what_was_held_goes_back_at_once() -> None:
    budget = MemoryBudget(0)
    upload = Upload(budget, max_size=10)
    upload.add(b"12345678\r\n")
    upload.add(b"x\r\n")
    assert upload.refusal == Refusal(
        "too_big", Reply(552, "5.3.4", "Message too big: this relay takes at most 10 bytes; nothing was sent")
    )
    assert budget.used == 0 and upload.take() == b""
    upload.add(b"y\r\n")  # read to the end of data, nothing kept
    assert budget.used == 0 and upload.take() == b""


def test_an_exhausted_budget_refuses_the_upload() -> None:
    budget = MemoryBudget(5)
    assert budget.take(3)
    upload = Upload(budget, max_size=100)
    upload.add(b"ab\r\n")
    assert upload.refusal == Refusal(
        "memory_budget", Reply(451, "4.3.2", "The relay holds too much message data right now; try again shortly")
    )
    assert budget.used == 3  # only the other upload's bytes


def test_the_first_problem_is_the_one_told() -> None:
    upload = Upload(MemoryBudget(0), max_size=5)
    upload.line_too_long()
    upload.add(b"too big for the limit\r\n")
    assert upload.refusal == Refusal(
        "too_long", Reply(500, "5.5.6", "A message line is longer than this relay accepts; nothing was sent")
    )
