"""The upstream connection reads replies in bulk (relay.core.smtp_client.ReplyReader over a real socket):
a 1000-recipient flight is paired reply by reply, nothing read ahead is lost between transactions, and
bytes read ahead of a STARTTLS still end the connection before TLS."""

from __future__ import annotations

import pytest

from relay.core.message import Prepared
from relay.core.smtp_client import ServerReply
from relay.testing.standin import MAX_RECIPIENTS, InfobipStandIn
from relay.upstream.connection import UpstreamConnection
from relay.upstream.errors import UpstreamTLSError
from relay.upstream.tls import make_tls_context
from tests.conftest import message, relay_settings
from tests.test_starttls_injection import HostileUpstream, hostile, settings_for

__all__ = ["hostile"]  # the fixture, shared with tests/test_starttls_injection.py

SENDER = "billing@erp.example.com"


async def connect(standin: InfobipStandIn) -> UpstreamConnection:
    settings = relay_settings(standin).upstream
    return await UpstreamConnection.open(settings, make_tls_context(settings), "relay.test", 1)


async def test_a_thousand_recipients_go_in_one_flight_and_each_reply_pairs_with_its_rcpt(
    standin: InfobipStandIn,
) -> None:
    recipients = tuple(f"customer.{i}@example.org" for i in range(MAX_RECIPIENTS))  # Infobip's limit (seed 002)
    refused = {recipients[i]: f"550 5.7.1 Recipient <{recipients[i]}> not allowed" for i in (0, 499, 999)}
    standin.behaviour.refuse_recipients.update(refused)
    connection = await connect(standin)
    result = await connection.transact(Prepared("q1", SENDER, recipients, "<q1@relay.test>", b"", message()))
    assert result.final.ok
    assert result.accepted == tuple(r for r in recipients if r not in refused)
    assert result.refused == {r: ServerReply(550, line[4:]) for r, line in refused.items()}
    [record] = standin.connections
    assert record.commands == ["STARTTLS", "AUTH", "MAIL", *["RCPT"] * MAX_RECIPIENTS, "DATA"]
    [delivered] = standin.messages
    assert delivered.pipelined and delivered.rcpt_tos == list(result.accepted)
    # Nothing read ahead is left over: the next transaction on the connection pairs its own replies.
    again = await connection.transact(Prepared("q2", SENDER, ("a@example.org",), "<q2@relay.test>", b"", message()))
    assert again.final.ok and again.accepted == ("a@example.org",)
    assert record.commands[-3:] == ["MAIL", "RCPT", "DATA"]
    await connection.quit()


@pytest.mark.parametrize("extra", [b"250-injected\r\n", b"250 AUTH LO"], ids=["a reply's first line", "half a line"])
async def test_part_of_a_reply_read_ahead_of_starttls_still_ends_the_connection(
    hostile: HostileUpstream, extra: bytes
) -> None:
    hostile.extra = extra
    settings = settings_for(hostile)
    with pytest.raises(UpstreamTLSError, match="sent more after its 220 to STARTTLS, in clear"):
        await UpstreamConnection.open(settings, make_tls_context(settings), "relay.test", 1)
    assert hostile.after_tls == []
