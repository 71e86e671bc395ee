"""relay.core.first_attempt: what the SMTP client is told once Infobip has answered."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.first_attempt import client_reply
from relay.core.replies import Reply
from relay.core.smtp_client import DeliveryResult, ServerReply


def result(
    code: int, text: str, accepted: tuple[str, ...] = ("a@example.org",), refused: dict[str, ServerReply] | None = None
) -> DeliveryResult:
    return DeliveryResult(final=ServerReply(code, text), accepted=accepted, refused=refused or {})


# --- accepted -----------------------------------------------------------------------------------


def test_queued_returns_infobips_id() -> None:
    reply = client_reply(result(250, "2.6.0 Message queued as <7b6f1e2a-9c1d>"))
    assert reply == Reply(250, "2.6.0", "Message queued as 7b6f1e2a-9c1d")
    assert str(reply) == "250 2.6.0 Message queued as 7b6f1e2a-9c1d"


def test_queued_without_brackets() -> None:
    assert client_reply(result(250, "2.6.0 Message queued as abc123")) == Reply(
        250, "2.6.0", "Message queued as abc123"
    )


def test_accepted_without_an_id() -> None:
    assert client_reply(result(250, "2.0.0 OK")) == Reply(250, "2.6.0", "Message queued as unknown")


def test_accepted_with_some_recipients_refused() -> None:
    refused = {
        "blocked@example.org": ServerReply(550, "5.7.1 Recipient <blocked@example.org> not allowed"),
        "bad@example.org": ServerReply(501, "5.1.7 Bad recipient address <bad@example.org>"),
    }
    reply = client_reply(result(250, "2.6.0 Message queued as <id1>", ("a@example.org", "b@example.org"), refused))
    assert reply == Reply(
        250,
        "2.6.0",
        "Message queued as id1; 2 of 4 recipients refused (550 5.7.1 Recipient <blocked@example.org> not allowed)",
    )


# --- refused ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("final", "expected"),
    [
        (
            ServerReply(550, "5.7.1 Envelope From and Header From domains are not aligned"),
            Reply(550, "5.7.1", "Infobip refused the message: Envelope From and Header From domains are not aligned"),
        ),
        (
            ServerReply(552, "5.3.4 Message size exceeds fixed maximum message size"),
            Reply(552, "5.3.4", "Infobip refused the message: Message size exceeds fixed maximum message size"),
        ),
        (
            ServerReply(554, "Transaction failed"),
            Reply(554, "5.0.0", "Infobip refused the message: Transaction failed"),
        ),
        (
            ServerReply(535, "5.7.8 Authentication credentials invalid\nsecond line is not shown"),
            Reply(535, "5.7.8", "Infobip refused the message: Authentication credentials invalid"),
        ),
        (
            ServerReply(501, "5.1.7 Bad recipient address <x>"),
            Reply(501, "5.1.7", "Infobip refused the message: Bad recipient address <x>"),
        ),
        (ServerReply(550, ""), Reply(550, "5.0.0", "Infobip refused the message: ")),
    ],
)
def test_permanent_failure_passes_infobips_code_and_text(final: ServerReply, expected: Reply) -> None:
    assert client_reply(DeliveryResult(final=final, accepted=())) == expected


def test_a_mismatched_enhanced_class_is_not_passed_on() -> None:
    # RFC 3463: the class of the enhanced code follows the basic code; a 5xx never carries 4.x.x or 2.x.x.
    assert client_reply(result(550, "4.7.1 odd")) == Reply(550, "5.0.0", "Infobip refused the message: 4.7.1 odd")


def test_control_characters_from_upstream_are_not_passed_on() -> None:
    reply = client_reply(result(550, "5.7.1 bad\rthing\x00"))
    assert reply == Reply(550, "5.7.1", "Infobip refused the message: bad thing ")


# --- transient ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("final", "shown"),
    [
        (ServerReply(451, "4.3.0 Temporary failure"), "451 4.3.0 Temporary failure"),
        (ServerReply(421, "4.7.0 Too many connections\nbye"), "421 4.7.0 Too many connections"),
        (ServerReply(452, "4.5.3 Too many recipients"), "452 4.5.3 Too many recipients"),
        (ServerReply(450, "Mailbox busy"), "450 Mailbox busy"),
    ],
)
def test_temporary_failure_is_451_4_4_x(final: ServerReply, shown: str) -> None:
    assert client_reply(DeliveryResult(final=final, accepted=())) == Reply(
        451, "4.4.3", f"Infobip deferred the message ({shown}); try again later"
    )


@pytest.mark.parametrize("code", [354, 334, 199, 600, 999])
def test_a_reply_that_is_neither_success_nor_permanent_is_temporary(code: int) -> None:
    reply = client_reply(result(code, "huh"))
    assert (reply.code, reply.enhanced) == (451, "4.4.3")


@settings(max_examples=300, deadline=None)
@given(code=st.integers(400, 499), text=st.text(max_size=60))
def test_never_a_5xx_for_a_temporary_failure(code: int, text: str) -> None:
    reply = client_reply(result(code, text))
    assert reply.code == 451
    assert reply.enhanced.startswith("4.4.")
    assert not reply.is_permanent


@settings(max_examples=300, deadline=None)
@given(code=st.integers(100, 999), text=st.text(max_size=60))
def test_every_reply_is_well_formed(code: int, text: str) -> None:
    reply = client_reply(result(code, text))
    assert reply.code in (250, 451) or 500 <= reply.code <= 599
    assert reply.enhanced[0] == str(reply.code)[0]
    assert not any(ch in str(reply) for ch in "\r\n\x00")
