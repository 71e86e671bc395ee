"""relay.core.smtp_client.Transaction: one pipelined transaction decided with plain values, no socket."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.core.smtp_client import (
    NEED_REPLY,
    SEND_BODY,
    Action,
    DeliveryResult,
    Finished,
    OutOfStep,
    Send,
    ServerClosing,
    ServerReply,
    Transaction,
    TransactionStateError,
    worst,
)

SENDER = "app@example.com"
MAIL_OK = ServerReply(250, f"2.1.0 Sender <{SENDER}> OK")
GO_AHEAD = ServerReply(354, "End data with <CR><LF>.<CR><LF>")
QUEUED = ServerReply(250, "2.6.0 Message queued as abc123")
NO_VALID_RECIPIENTS = ServerReply(554, "5.5.1 No valid recipients")
BLOCKED = ServerReply(550, "5.7.1 Recipient not allowed")
BUSY = ServerReply(450, "4.2.1 Mailbox busy")


def rcpt_ok(address: str) -> ServerReply:
    return ServerReply(250, f"2.1.5 Recipient <{address}> OK")


def feed(transaction: Transaction, replies: list[ServerReply]) -> list[Action]:
    return [transaction.receive(reply) for reply in replies]


def test_all_accepted_sends_the_body_and_reports_the_final_reply() -> None:
    transaction = Transaction(SENDER, ["a@example.org", "b@example.org"], size=120, eight_bit=False, connection_id=7)
    assert transaction.start() == (
        b"MAIL FROM:<app@example.com> SIZE=120\r\nRCPT TO:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
    )
    actions = feed(transaction, [MAIL_OK, rcpt_ok("a@example.org"), rcpt_ok("b@example.org"), GO_AHEAD])
    assert actions == [NEED_REPLY, NEED_REPLY, NEED_REPLY, SEND_BODY]
    assert not transaction.data_sent
    transaction.body_sent()
    assert transaction.data_sent
    assert transaction.receive(QUEUED) == Finished(
        DeliveryResult(QUEUED, ("a@example.org", "b@example.org"), {}, connection_id=7)
    )
    assert not transaction.needs_rset


def test_some_recipients_refused_the_rest_get_the_message() -> None:
    recipients = ["a@example.org", "blocked@example.org", "c@example.org"]
    transaction = Transaction(SENDER, recipients)
    transaction.start()
    replies = [MAIL_OK, rcpt_ok("a@example.org"), BLOCKED, rcpt_ok("c@example.org"), GO_AHEAD]
    assert feed(transaction, replies)[-1] == SEND_BODY
    transaction.body_sent()
    [finished] = feed(transaction, [QUEUED])
    assert finished == Finished(
        DeliveryResult(QUEUED, ("a@example.org", "c@example.org"), {"blocked@example.org": BLOCKED})
    )


def test_a_refusal_at_the_end_of_data_accepts_no_one_but_keeps_the_refused() -> None:
    transaction = Transaction(SENDER, ["a@example.org", "blocked@example.org"])
    transaction.start()
    feed(transaction, [MAIL_OK, rcpt_ok("a@example.org"), BLOCKED, GO_AHEAD])
    transaction.body_sent()
    rejected = ServerReply(554, "5.6.0 Message content rejected")
    assert transaction.receive(rejected) == Finished(DeliveryResult(rejected, (), {"blocked@example.org": BLOCKED}))
    assert transaction.data_sent and not transaction.needs_rset  # the end of data closes the transaction


def test_all_recipients_refused_a_temporary_refusal_wins() -> None:
    transaction = Transaction(SENDER, ["blocked@example.org", "busy@example.org"])
    transaction.start()
    *_, last = feed(transaction, [MAIL_OK, BLOCKED, BUSY, NO_VALID_RECIPIENTS])
    assert last == Finished(DeliveryResult(BUSY, (), {"blocked@example.org": BLOCKED, "busy@example.org": BUSY}))
    assert transaction.needs_rset and not transaction.data_sent


def test_all_recipients_refused_permanently_reports_the_first() -> None:
    other = ServerReply(501, "5.1.7 Bad recipient address")
    assert worst({"x@example.org": BLOCKED, "y@example.org": other}) == BLOCKED
    assert worst({"x@example.org": BLOCKED, "y@example.org": BUSY, "z@example.org": other}) == BUSY


def test_mail_refused_reports_the_mail_reply_and_no_recipients() -> None:
    refused = ServerReply(550, "5.7.1 Sender domain not verified")
    need_mail = ServerReply(503, "5.5.1 Error: need MAIL command")
    transaction = Transaction(SENDER, ["a@example.org"])
    transaction.start()
    *_, last = feed(transaction, [refused, need_mail, need_mail])
    assert last == Finished(DeliveryResult(refused, (), {}))  # RCPT replies to a refused MAIL mean nothing
    assert transaction.needs_rset


def test_421_at_mail_gives_up_the_connection_without_reading_on() -> None:
    closing = ServerReply(421, "4.4.2 Idle timeout, closing connection")
    transaction = Transaction(SENDER, ["a@example.org", "b@example.org"])
    transaction.start()
    action = transaction.receive(closing)
    assert action == ServerClosing(closing)
    assert isinstance(action, ServerClosing)
    assert action.why == "Infobip closed the connection: 421 4.4.2 Idle timeout, closing connection"
    with pytest.raises(TransactionStateError):
        transaction.receive(rcpt_ok("a@example.org"))


def test_a_stray_354_after_a_failure_gets_an_empty_message_ended() -> None:
    transaction = Transaction(SENDER, ["blocked@example.org"])
    transaction.start()
    assert feed(transaction, [MAIL_OK, BLOCKED, GO_AHEAD]) == [NEED_REPLY, NEED_REPLY, Send(b".\r\n")]
    assert not transaction.data_sent  # the empty message is not ours: Infobip cannot have it
    # whatever the server says to the empty message, the verdict is the refusal that came first
    assert transaction.receive(NO_VALID_RECIPIENTS) == Finished(
        DeliveryResult(BLOCKED, (), {"blocked@example.org": BLOCKED})
    )
    assert transaction.needs_rset and not transaction.data_sent


def test_a_stray_354_after_a_refused_mail() -> None:
    refused = ServerReply(550, "5.7.1 Sender refused")
    transaction = Transaction(SENDER, ["a@example.org"])
    transaction.start()
    *_, send = feed(transaction, [refused, rcpt_ok("a@example.org"), GO_AHEAD])
    assert send == Send(b".\r\n")
    assert transaction.receive(QUEUED) == Finished(DeliveryResult(refused, (), {}))


def test_a_2xx_to_data_means_we_are_out_of_step() -> None:
    transaction = Transaction(SENDER, ["a@example.org"])
    transaction.start()
    ok = ServerReply(250, "2.0.0 OK")
    *_, action = feed(transaction, [MAIL_OK, rcpt_ok("a@example.org"), ok])
    assert action == OutOfStep(ok, "DATA")
    assert isinstance(action, OutOfStep)
    assert action.why == "out of step with the server: DATA answered 250 2.0.0 OK"
    with pytest.raises(TransactionStateError):
        transaction.body_sent()


def test_a_4xx_to_data_ends_early_and_asks_for_rset() -> None:
    transaction = Transaction(SENDER, ["a@example.org"])
    transaction.start()
    busy = ServerReply(451, "4.3.0 Try again later")
    *_, last = feed(transaction, [MAIL_OK, rcpt_ok("a@example.org"), busy])
    assert last == Finished(DeliveryResult(busy, (), {}))
    assert transaction.needs_rset


def test_rset_goes_ahead_of_the_next_flight_after_an_early_end() -> None:
    first = Transaction(SENDER, ["blocked@example.org"])
    first.start()
    feed(first, [MAIL_OK, BLOCKED, NO_VALID_RECIPIENTS])
    assert first.needs_rset

    second = Transaction(SENDER, ["a@example.org"], rset_first=first.needs_rset)
    assert second.start() == b"RSET\r\nMAIL FROM:<app@example.com>\r\nRCPT TO:<a@example.org>\r\nDATA\r\n"
    assert second.needs_rset  # until RSET is answered
    # the RSET reply is paired with RSET, whatever it says, and not taken for the MAIL reply
    actions = feed(second, [ServerReply(250, "2.0.0 Reset OK"), MAIL_OK, rcpt_ok("a@example.org"), GO_AHEAD])
    assert actions == [NEED_REPLY, NEED_REPLY, NEED_REPLY, SEND_BODY]
    assert not second.needs_rset
    second.body_sent()
    assert second.receive(QUEUED) == Finished(DeliveryResult(QUEUED, ("a@example.org",), {}))

    third = Transaction(SENDER, ["a@example.org"], rset_first=second.needs_rset)
    assert third.start().startswith(b"MAIL FROM:")


def test_the_final_reply_waits_for_the_body() -> None:
    transaction = Transaction(SENDER, ["a@example.org"])
    transaction.start()
    feed(transaction, [MAIL_OK, rcpt_ok("a@example.org"), GO_AHEAD])
    with pytest.raises(TransactionStateError):  # a reply before our final dot answers nothing we sent
        transaction.receive(QUEUED)
    transaction.body_sent()
    with pytest.raises(TransactionStateError):
        transaction.body_sent()
    transaction.receive(QUEUED)
    with pytest.raises(TransactionStateError):  # done: nothing more is expected
        transaction.receive(QUEUED)


def test_misuse_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one recipient"):
        Transaction(SENDER, [])
    transaction = Transaction(SENDER, ["a@example.org"])
    with pytest.raises(TransactionStateError):
        transaction.receive(MAIL_OK)
    transaction.start()
    with pytest.raises(TransactionStateError):
        transaction.start()


def test_eight_bit_and_size_reach_the_mail_command() -> None:
    transaction = Transaction(SENDER, ["a@example.org"], size=5, eight_bit=True)
    assert transaction.start().startswith(b"MAIL FROM:<app@example.com> SIZE=5 BODY=8BITMIME\r\n")


def test_a_thousand_recipients_are_paired_in_order() -> None:
    recipients = [f"r{i}@example.org" for i in range(1000)]
    transaction = Transaction(SENDER, recipients)
    transaction.start()
    replies = [MAIL_OK] + [BLOCKED if i % 3 == 0 else rcpt_ok(r) for i, r in enumerate(recipients)] + [GO_AHEAD]
    assert feed(transaction, replies)[-1] == SEND_BODY
    transaction.body_sent()
    final = transaction.receive(QUEUED)
    assert isinstance(final, Finished)
    assert final.result.accepted == tuple(r for i, r in enumerate(recipients) if i % 3)
    assert list(final.result.refused) == [r for i, r in enumerate(recipients) if i % 3 == 0]


codes = st.sampled_from([250, 251, 354, 421, 450, 451, 452, 501, 503, 550, 554])


@given(mail=codes, rcpts=st.lists(codes, min_size=1, max_size=6), data=codes)
def test_the_body_goes_only_after_a_good_mail_an_accepted_recipient_and_354(
    mail: int, rcpts: list[int], data: int
) -> None:
    recipients = [f"r{i}@example.org" for i in range(len(rcpts))]
    transaction = Transaction(SENDER, recipients)
    transaction.start()
    actions = feed(transaction, [ServerReply(mail, "")])
    if mail == 421:
        assert actions == [ServerClosing(ServerReply(421, ""))]
        return
    actions += feed(transaction, [ServerReply(code, "") for code in rcpts] + [ServerReply(data, "")])
    assert actions[:-1] == [NEED_REPLY] * (len(rcpts) + 1)
    last = actions[-1]
    mail_ok, any_accepted = 200 <= mail < 300, any(200 <= c < 300 for c in rcpts)
    if 200 <= data < 300:
        assert isinstance(last, OutOfStep)
    elif mail_ok and any_accepted and data == 354:
        assert last == SEND_BODY and not transaction.needs_rset
    else:
        assert transaction.needs_rset
        if data == 354:
            assert last == Send(b".\r\n")
            last = transaction.receive(ServerReply(250, ""))
        assert isinstance(last, Finished)
        assert not last.result.final.ok and last.result.accepted == ()
        expected_refused = {r: ServerReply(c, "") for r, c in zip(recipients, rcpts, strict=True) if c >= 300}
        assert last.result.refused == (expected_refused if mail_ok else {})
