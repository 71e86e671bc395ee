"""Bounces over real sockets: the stand-in's HTTPS reports and refusals in, a real SMTP server (the
company's, here a sink) out; each bounce parsed back with the standard library's `email` package."""

from __future__ import annotations

import asyncio
import contextlib
import email
import email.policy
import errno
import sqlite3
import threading
from collections.abc import AsyncIterator
from email.message import EmailMessage, Message
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

import relay.outcomes.writer
from relay.app import Relay
from relay.cli import main as relay_main
from relay.config import BouncesSettings
from relay.core.message import Envelope
from relay.ops import queue_verbs
from relay.outcomes.bounces import CHECK_EVERY, CLAIM_USE, Bouncer
from relay.outcomes.history import BounceJob, BounceRecipient
from relay.outcomes.metrics import OutcomeMetrics
from relay.outcomes.sqlite import SqliteHistory, history_path
from relay.outcomes.store import SENDING_STALE
from relay.store.spool import EntryState, Spool
from relay.testing.clock import FakeClock
from relay.testing.sink import MailSink
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, free_port, message, relay_settings
from tests.helpers import SENDER, get, send_one, spooled, until, write_config
from tests.outcomes import history_failing, messages, notify_url, reports_on, until_status


@pytest.fixture
async def sink() -> AsyncIterator[MailSink]:
    server = MailSink()
    await server.start()
    yield server
    await server.stop()


def bounces_to(sink: MailSink, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": sink.port, "timeout": 5, **extra}


def parsed(data: bytes) -> EmailMessage:
    parsed = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def status_blocks(bounce: EmailMessage) -> list[Message]:
    """The message/delivery-status part's field blocks: the per-message one, then one per recipient."""
    [status] = [p for p in bounce.iter_parts() if p.get_content_type() == "message/delivery-status"]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return blocks


def bounce_count(relay: Relay, result: str) -> float:
    return relay.metrics.registry.get_sample_value("relay_bounces_total", {"result": result}) or 0.0


async def test_a_bounced_report_becomes_one_rfc3464_bounce_to_the_sender(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    await standin.reports.start()
    relay = await start_relay(**reports_on(standin, tmp_path), bounces=bounces_to(sink))
    data = message(Message_ID="<inv-42@erp.example.com>", body=b"Secret invoice body.\r\n")
    recipients = ["a@example.org", "nobody@bounce.example", "gone@bounce.example"]
    reply = await send_one(relay.port, SENDER, recipients, data)
    infobip_id = reply.rsplit(" ", 1)[1]
    [sent] = await sink.wait_for(1)
    assert sent.mail_from == "" and sent.rcpt_tos == [SENDER]  # MAIL FROM:<>, to the envelope sender
    bounce = parsed(sent.data)
    assert bounce.get_content_type() == "multipart/report"
    assert bounce.get_param("report-type") == "delivery-status"
    assert bounce["Auto-Submitted"] == "auto-replied" and "MAILER-DAEMON@relay.test" in bounce["From"]
    words, _, headers = bounce.iter_parts()
    assert words.get_content_type() == "text/plain" and "nobody@bounce.example" in words.get_content()
    head, *per_recipient = status_blocks(bounce)
    assert head["Reporting-MTA"] == "dns; relay.test" and head["Arrival-Date"]
    assert [b["Final-Recipient"] for b in per_recipient] == [
        "rfc822; nobody@bounce.example",
        "rfc822; gone@bounce.example",
    ]
    for block in per_recipient:  # both recipients of the message in one report; a@example.org was delivered
        assert block["Action"] == "failed" and block["Status"] == "5.1.1"
        assert block["Diagnostic-Code"].startswith("x-infobip; EC_MAILBOX_DOES_NOT_EXIST (")
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_content()
    assert "Message-ID: <inv-42@erp.example.com>" in original and "X-IB-Bulk-Id: relay-" in original
    assert "Secret invoice body" not in sent.data.decode()
    await until(lambda: bounce_count(relay, "sent") == 1)
    [traced] = await messages(relay, infobip_id)
    assert any(e["kind"] == "bounce" and "failed report sent" in e["detail"] for e in traced["events"])
    assert len(sink.messages) == 1


async def test_a_bounce_quotes_the_headers_without_the_push_token(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """The token in our X-IB-Notify-Url and X-IB-Tracking-Url lets whoever holds it post reports (and so
    bounces): the sender's mailbox, which the bounce goes to, must not get it."""
    await standin.reports.start()
    sections = reports_on(standin, tmp_path, notify_url="https://hooks.example.com/ib")
    sections["reports"]["notify_listen"] = f"127.0.0.1:{free_port()}"
    relay = await start_relay(**sections, bounces=bounces_to(sink))
    await send_one(relay.port, SENDER, ["nobody@bounce.example"], message())
    [upstream] = await standin.wait_for_messages(1)
    token = notify_url(upstream.data).rsplit("/", 1)[1]
    assert len(token) >= 24 and token.encode() in upstream.data  # Infobip needs it
    [sent] = await sink.wait_for(1)
    headers = parsed(sent.data).get_payload()[2].get_content()
    assert "X-IB-Notify-Url: https://hooks.example.com/ib/<token>" in headers
    assert "X-IB-Tracking-Url: https://hooks.example.com/ib/<token>/tracking" in headers
    assert token not in sent.data.decode()


async def test_refused_after_250_bounces_and_a_refusal_the_app_heard_does_not(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient <nosuch@example.org> unknown"
    relay = await start_relay(spool=spooled(tmp_path), bounces=bounces_to(sink))
    heard = await send_one(relay.port, SENDER, ["nosuch@example.org"], message())
    assert heard.startswith("550")  # the app was told: no bounce for this one
    partial = await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
    assert partial.startswith("250")  # the app heard 250: the refused recipient must come back as a bounce
    [sent] = await sink.wait_for(1)
    [head, block] = status_blocks(parsed(sent.data))
    assert block["Final-Recipient"] == "rfc822; nosuch@example.org" and block["Status"] == "5.1.1"
    assert block["Diagnostic-Code"] == "smtp; 550 5.1.1 Recipient <nosuch@example.org> unknown"
    assert head["X-Relay-Queue-ID"] == partial.split("Queued as ")[1][:21]
    found = await messages(relay, "nosuch@example.org")
    assert len(found) == 2
    assert {r["status"] for m in found for r in m["recipients"] if r["address"] == "nosuch@example.org"} == {"failed"}
    assert len(sink.messages) == 1


async def test_a_history_held_up_does_not_hold_up_delivery(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """The history's file locked by another process (a backup, say) while a recipient dies after the app heard
    250: the one delivery worker goes on to the next message at once, and the bounce follows once the history
    is written (the dead message is in dead/ already: waiting for the history kept nothing safer)."""
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient <nosuch@example.org> unknown"
    relay = await start_relay(spool=spooled(tmp_path), bounces=bounces_to(sink), upstream={"pool_size": 1})
    lock = sqlite3.connect(history_path(relay.settings), isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the relay's history writes wait for it (busy_timeout, 5 s)
        assert (await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())).startswith(
            "250"
        )
        async with asyncio.timeout(2):  # well within the history's 5 s wait for the lock
            assert (await send_one(relay.port, SENDER, ["b@example.org"], message())).startswith("250 2.6.0")
            await standin.wait_for_messages(2)
        assert not sink.messages
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    [sent] = await sink.wait_for(1)
    [_, block] = status_blocks(parsed(sent.data))
    assert block["Final-Recipient"] == "rfc822; nosuch@example.org"


async def send_or_refused_at_mail(port: int, rcpt: str) -> str:
    """One message; the MAIL reply if it is not 250, else the reply at the end of DATA."""
    dialog = await Dialog.open(port)
    try:
        await dialog.hello()
        if not (reply := await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250"):
            return reply
        assert (await dialog.send(f"RCPT TO:<{rcpt}>")).startswith("250")
        assert (await dialog.send("DATA")).startswith("354")
        return await dialog.send(message() + b".\r\n")
    finally:
        await dialog.close()


async def test_a_history_held_up_makes_new_mail_wait_and_a_healthy_one_never_does(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """reports.history_backlog notes waiting behind a history write held up for a second or more: MAIL gets
    451 4.3.0, rather than memory growing for ever. A healthy history never refuses, even with a backlog this
    small (its notes gather for 50 ms between quick writes). Once the write goes through, mail is taken again,
    and the messages taken while it was held up are in the history."""
    settings = {"spool": spooled(tmp_path), "bounces": bounces_to(sink), "reports": {"history_backlog": 3}}
    relay = await start_relay(**settings)
    for i in range(5):
        assert (await send_or_refused_at_mail(relay.port, f"healthy{i}@example.org")).startswith("250")
    lock = sqlite3.connect(history_path(relay.settings), isolation_level=None, timeout=10)
    taken: list[str] = []
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the relay's history write waits for it (busy_timeout, 5 s)
        async with asyncio.timeout(4):  # held up after 1 s; within the write's 5 s
            while (reply := await send_or_refused_at_mail(relay.port, f"r{len(taken)}@example.org")).startswith("250"):
                taken.append(f"r{len(taken)}@example.org")
        assert reply == "451 4.3.0 The relay's message history is not keeping up; try again later"
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    async with asyncio.timeout(5):  # the held-up write goes through, and the next batch is taken
        while not (await send_or_refused_at_mail(relay.port, "after@example.org")).startswith("250"):
            await asyncio.sleep(0.02)
    for rcpt in (taken[0], taken[-1]):
        assert [r["address"] for m in await messages(relay, rcpt) for r in m["recipients"]] == [rcpt]
    assert relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": "history_behind"}) >= 1


async def test_a_history_held_up_counts_the_bytes_its_notes_hold_too(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """With bounces on, a note keeps its message's header block (up to 64 KiB): reports.history_backlog_bytes of
    them waiting behind a held-up write make MAIL wait too, however few the notes."""
    reports = {"history_backlog": 1_000_000, "history_backlog_bytes": 4000}
    relay = await start_relay(spool=spooled(tmp_path), bounces=bounces_to(sink), reports=reports)
    lock = sqlite3.connect(history_path(relay.settings), isolation_level=None, timeout=10)
    taken = 0
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the relay's history write waits for it
        async with asyncio.timeout(4):  # held up after 1 s; within the write's 5 s
            while (reply := await send_big_headers_or_refused(relay.port)).startswith("250"):
                taken += 1
        assert reply == "451 4.3.0 The relay's message history is not keeping up; try again later"
        assert taken >= 3  # 4000 bytes: at least three blocks of 1.2 KB
        lock.execute("ROLLBACK")
    finally:
        lock.close()


async def send_big_headers_or_refused(port: int) -> str:
    dialog = await Dialog.open(port)
    try:
        await dialog.hello()
        if not (reply := await dialog.send(f"MAIL FROM:<{SENDER}>")).startswith("250"):
            return reply
        assert (await dialog.send("RCPT TO:<a@example.org>")).startswith("250")
        assert (await dialog.send("DATA")).startswith("354")
        return await dialog.send(message(X_Padding="x" * 1200) + b".\r\n")
    finally:
        await dialog.close()


async def test_the_bounce_sender_lives_through_a_history_that_fails(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """The outbox cannot be read (its claim fails, as on a failing disk): the sender says so and looks again at
    its next check, and the bounce goes then (it used to stop for good, until a restart)."""
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient <nosuch@example.org> unknown"
    clock = FakeClock()
    relay = await start_relay(clock=clock, spool=spooled(tmp_path), bounces=bounces_to(sink))
    with history_failing(relay, "UPDATE ON bounces"), structlog.testing.capture_logs() as logs:
        partial = await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
        assert partial.startswith("250")
        await until(lambda: any(e["event"] == "bounce_outbox_failed" for e in logs))
    [failed] = [e for e in logs if e["event"] == "bounce_outbox_failed"]
    assert "disk I/O error" in failed["error"] and not sink.messages
    clock.advance(CHECK_EVERY)
    [sent] = await sink.wait_for(1)
    assert status_blocks(parsed(sent.data))[1]["Final-Recipient"] == "rfc822; nosuch@example.org"


@contextlib.asynccontextmanager
async def bounce_record_locked_out(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path, **relay: Any
) -> AsyncIterator[tuple[Relay, sqlite3.Connection, list[dict[str, Any]]]]:
    """A message with a recipient refused after 250, whose bounce the server takes while the history's file
    gets locked (by the sink, before its 250; the relay waits 1 s for the lock): the bounce's record fails.
    Yields the relay, the lock (to release) and the logs from the message on."""
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient <nosuch@example.org> unknown"
    settings = {"spool": spooled(tmp_path), "bounces": bounces_to(sink), "reports": {"history_timeout": 1}}
    started = await start_relay(**settings, **relay)
    lock = sqlite3.connect(history_path(started.settings), isolation_level=None, timeout=10)
    sink.on_message = lambda _: lock.execute("BEGIN EXCLUSIVE")
    try:
        with structlog.testing.capture_logs() as logs:
            partial = await send_one(started.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
            assert partial.startswith("250")
            yield started, lock, logs
    finally:
        lock.close()


def bounce_states(relay: Relay) -> list[tuple[str]]:
    db = sqlite3.connect(f"file:{history_path(relay.settings)}?mode=ro", uri=True)
    try:
        return db.execute("SELECT state FROM bounces").fetchall()
    finally:
        db.close()


async def test_a_bounce_sent_whose_record_fails_is_recorded_later_and_never_sent_again(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """The server took the bounce, but the history is locked (past history_timeout) when the sender marks it
    sent: the sender keeps that in memory and records it at its next look. The bounce stays claimed meanwhile,
    so it does not go again once the claim would be stale (it did: a duplicate after SENDING_STALE)."""
    clock = FakeClock()
    async with bounce_record_locked_out(standin, start_relay, sink, tmp_path, clock=clock) as (relay, lock, logs):
        await sink.wait_for(1)
        await until(lambda: any(e["event"] == "bounce_outbox_failed" and e.get("kept") for e in logs))
        lock.execute("ROLLBACK")
        for _ in range(2):  # the next look records it; the one after SENDING_STALE finds nothing to send
            looked = sum(e["event"] == "bounce_outbox_checked" for e in logs)
            clock.advance(SENDING_STALE + CHECK_EVERY)
            await until(lambda: sum(e["event"] == "bounce_outbox_checked" for e in logs) > looked)  # noqa: B023
    assert len(sink.messages) == 1
    assert bounce_states(relay) == [("sent",)]


async def test_a_stop_with_a_record_kept_says_so(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    async with bounce_record_locked_out(standin, start_relay, sink, tmp_path) as (relay, lock, logs):
        await until(lambda: any(e["event"] == "bounce_outbox_failed" and e.get("kept") for e in logs))
        # kept, and tried again before the next batch: the look ends there, until the next check
        await until(lambda: any(e["event"] == "bounce_outbox_failed" and "kept" not in e for e in logs))
        lock.execute("ROLLBACK")
        await relay.stop()
    assert [e["records"] for e in logs if e["event"] == "bounce_records_lost"] == [1]


async def test_a_stop_while_a_bounce_record_is_being_written_counts_it(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    async with bounce_record_locked_out(standin, start_relay, sink, tmp_path) as (relay, _, logs):
        await until(lambda: any(e["event"] == "bounce_sent" for e in logs))
        await relay.stop()
    assert [e["records"] for e in logs if e["event"] == "bounce_records_lost"] == [1]


async def test_a_bounce_whose_record_is_refused_for_good_is_not_kept_and_goes_again_once_stale(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """A record the history will never take (here a trigger refuses it) is not kept, so it cannot stop every
    later bounce: the claim goes stale and the bounce is offered again, as after a crash."""
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient <nosuch@example.org> unknown"
    clock = FakeClock()
    relay = await start_relay(clock=clock, spool=spooled(tmp_path), bounces=bounces_to(sink))
    with structlog.testing.capture_logs() as logs:
        with history_failing(relay, "UPDATE ON bounces WHEN NEW.state = 'sent'"):
            assert (await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())).startswith(
                "250"
            )
            await sink.wait_for(1)
            await until(lambda: any(e["event"] == "bounce_outbox_failed" for e in logs))
        [failed] = [e for e in logs if e["event"] == "bounce_outbox_failed"]
        assert (failed["kept"], failed["unrecorded"], failed["error_type"]) == (False, 0, "IntegrityError")
        clock.advance(SENDING_STALE + CHECK_EVERY)
        await sink.wait_for(2)
    await until(lambda: bounce_states(relay) == [("sent",)])  # recorded this time


async def test_expired_in_the_spool_bounces_with_5_4_7(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    standin.behaviour.data_replies.extend(["451 4.3.0 Try again later"] * 3)
    relay = await start_relay(spool=spooled(tmp_path, max_age=0.01), bounces=bounces_to(sink))
    reply = await send_one(relay.port, SENDER, ["late@example.org"], message())
    assert reply.startswith("250")
    [sent] = await sink.wait_for(1)
    [_, block] = status_blocks(parsed(sent.data))
    assert block["Action"] == "failed" and block["Status"] == "5.4.7"
    assert block["Diagnostic-Code"].startswith("smtp; expired after 1 attempts")
    await until_status(relay, "late@example.org", {"late@example.org": "expired"})


async def test_a_bounce_server_that_is_down_gets_the_bounce_later_once(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    clock = FakeClock()
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 unknown"
    port = free_port()  # nothing listens there yet: the company's server is down
    sink = MailSink()
    relay = await start_relay(clock=clock, spool=spooled(tmp_path), bounces={**bounces_to(sink), "smtp_port": port})

    with structlog.testing.capture_logs() as logs:

        async def looked_at(when: float) -> None:
            """Until the sender has looked at the outbox at `when` or later, found nothing due and gone to
            sleep: what it did at that time is then done (a look begun before a jump of the clock arms its
            next one after the jump, so each jump waits for the look before it)."""
            await until(lambda: any(e["event"] == "bounce_outbox_checked" and e["at"] >= when for e in logs))

        await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
        await until(lambda: bounce_count(relay, "retried") == 1)
        [deferred] = [e for e in logs if e["event"] == "bounce_deferred"]
        assert deferred["next_attempt_in"] == 30.0 and "Connect" in deferred["error"]
        await looked_at(clock.now)
        await sink.start(port=port)
        try:
            clock.advance(29)
            await looked_at(clock.now)
            assert sink.messages == [] and bounce_count(relay, "retried") == 1  # not before its time
            clock.advance(10)  # the next look (one every 10 s) finds it due
            await until(lambda: bounce_count(relay, "sent") == 1)
            assert len(sink.messages) == 1
            await looked_at(clock.now)
            for _ in range(5):  # the outbox is looked at again and again: the bounce is not in it any more
                clock.advance(3600)
                await looked_at(clock.now)
            assert len(sink.messages) == 1 and bounce_count(relay, "sent") == 1 and bounce_count(relay, "retried") == 1
        finally:
            await sink.stop()


class HeldSink(MailSink):
    """A mail server that has the whole bounce but holds its 250 until `answer` is set (a busy Exchange)."""

    answer: asyncio.Event

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        reply: str = await super().handle_DATA(server, session, envelope)
        await self.answer.wait()
        return reply


async def test_a_stop_while_a_bounce_is_being_sent_lets_it_finish_so_it_goes_once(
    standin: InfobipStandIn, tmp_path: Path
) -> None:
    """The stop used to cancel the bounce mid-transaction: the server kept it, the history still said it was
    being sent, and the next start sent it again."""
    await standin.reports.start()
    sink = HeldSink()
    sink.answer = asyncio.Event()
    await sink.start()
    relay = Relay(relay_settings(standin, **reports_on(standin, tmp_path), bounces=bounces_to(sink)))
    await relay.start()
    try:
        await send_one(relay.port, SENDER, ["nobody@bounce.example"], message())
        await sink.wait_for(1)  # the server has it; its 250 waits
        with structlog.testing.capture_logs() as logs:
            stopping = asyncio.create_task(relay.stop())
            await until(lambda: any(e["event"] == "bounce_stop_waiting" for e in logs))
            sink.answer.set()
            await stopping
    finally:
        await sink.stop()
    assert bounce_states(relay) == [("sent",)]
    said = [e["event"] for e in logs if e["event"].startswith("bounce_") and e["log_level"] != "debug"]
    assert said == ["bounce_stop_waiting", "bounce_sent"]


async def test_a_batch_outliving_half_its_claim_leaves_the_rest_to_be_offered_again(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """A slow mail server: a batch of bounces is sent one by one under one claim, and past SENDING_STALE
    another replica offers the rest again. So the sender stops using a claim at CLAIM_USE: the rest go stale
    unsent and are sent then, each once."""
    clock = FakeClock()
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient unknown"
    relay = await start_relay(clock=clock, spool=spooled(tmp_path), bounces=bounces_to(sink))
    with history_failing(relay, "UPDATE ON bounces"):  # no claim: both bounces wait for one look
        for _ in range(2):
            await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
        await until(lambda: bounce_states(relay) == [("pending",), ("pending",)])
    sink.on_message = lambda _: clock.advance(CLAIM_USE) if len(sink.messages) == 1 else None  # the first: slow
    with structlog.testing.capture_logs() as logs:
        clock.advance(CHECK_EVERY)
        await until(lambda: any(e["event"] == "bounce_claims_left" for e in logs))
    assert len(sink.messages) == 1 and sorted(bounce_states(relay)) == [("sending",), ("sent",)]

    def offered_again() -> bool:  # a look at a time, until the claim is stale
        clock.advance(CHECK_EVERY)
        return len(sink.messages) == 2

    await until(offered_again)
    await until(lambda: bounce_states(relay) == [("sent",), ("sent",)])
    assert len({m.data.split(b"X-Relay-Queue-ID: ")[1][:21] for m in sink.messages}) == 2


def notes_cut_off_at_stop(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sink: MailSink) -> dict[str, Any]:
    """Sections for a relay whose history, held up, gives up on a write within a second, and whose stop gives
    up on the notes waiting behind it within 0.2 s (history_notes_lost): a bounce's note cut off by a stop."""
    monkeypatch.setattr(relay.outcomes.writer, "CLOSE_WAIT", 0.2)
    return {
        "spool": spooled(tmp_path, retry_initial=60, retry_max=60),
        "bounces": bounces_to(sink),
        "reports": {"history_timeout": 1},
    }


async def test_a_stop_while_a_bounce_waits_for_the_history_sends_nobody_anything_twice(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A retry: Infobip takes a@, refuses b@ for good (the app heard 250 long ago), and the history is held up,
    so the bounce's note is not on disk when the stop comes (history_notes_lost). The dead letter's marker
    stays: the next start notes it again and bounces b@, once, and never sends a@ again."""
    clock, sections = FakeClock(), notes_cut_off_at_stop(monkeypatch, tmp_path, sink)
    for rcpt in ("a@example.org", "b@example.org"):
        standin.behaviour.refuse_recipients[rcpt] = "450 4.2.0 Try again later"
    first = await start_relay(clock=clock, **sections)
    assert (await send_one(first.port, SENDER, ["a@example.org", "b@example.org"], message())).startswith("250")
    await until(lambda: bool(queue_states(tmp_path)) and queue_states(tmp_path)[0].attempts == 1)
    del standin.behaviour.refuse_recipients["a@example.org"]
    standin.behaviour.refuse_recipients["b@example.org"] = "550 5.1.1 Recipient unknown"
    lock = sqlite3.connect(history_path(first.settings), isolation_level=None, timeout=10)
    lock.execute("BEGIN EXCLUSIVE")  # the history's writes wait, and fail, and are tried again
    try:
        clock.advance(60)
        await until(lambda: len(standin.messages) == 1 and not queue_states(tmp_path))
        assert len(list((tmp_path / "dead").glob("*.unnoted"))) == 1
        await first.stop(grace=0)
    finally:
        lock.close()
    assert [m.rcpt_tos for m in standin.messages] == [["a@example.org"]] and sink.messages == []
    again = await start_relay(clock=clock, **sections)
    [bounce] = await sink.wait_for(1)
    assert b"Final-Recipient: rfc822; b@example.org" in bounce.data
    await until(lambda: not list((tmp_path / "dead").glob("*.unnoted")))
    await again.stop()
    assert [m.rcpt_tos for m in standin.messages] == [["a@example.org"]] and len(sink.messages) == 1


async def test_a_stop_cutting_the_settling_short_still_notes_what_infobip_took(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The outcome used to be noted after the spool settled: a stop cancelling a worker in a slow state write
    lost the note, and a@ stayed queued in the history, without its Infobip id, for good (its report then
    matched nothing)."""
    clock = FakeClock()
    for rcpt in ("a@example.org", "c@example.org"):
        standin.behaviour.refuse_recipients[rcpt] = "450 4.2.0 Try again later"
    spool = spooled(tmp_path, retry_initial=60, retry_max=60)
    first = await start_relay(clock=clock, spool=spool, bounces=bounces_to(sink))
    assert (await send_one(first.port, SENDER, ["a@example.org", "c@example.org"], message())).startswith("250")
    await until(lambda: bool(queue_states(tmp_path)) and queue_states(tmp_path)[0].attempts == 1)
    writing, release, real = threading.Event(), threading.Event(), Spool.write_state

    def slow_disk(spool: Spool, queue_id: str, state: EntryState) -> None:
        writing.set()
        release.wait(10)
        real(spool, queue_id, state)

    monkeypatch.setattr(Spool, "write_state", slow_disk)
    del standin.behaviour.refuse_recipients["a@example.org"]
    clock.advance(60)  # the retry: a@ taken, c@ deferred again, and the state write hangs
    await until(writing.is_set)
    await first.stop(grace=0)
    release.set()
    stored = SqliteHistory(history_path(first.settings), readonly=True)
    [trace] = stored.lookup("a@example.org", 5)
    stored.close()
    [taken] = [r for r in trace.recipients if r.address == "a@example.org"]
    assert taken.status == "sent" and taken.infobip_id == standin.messages[0].infobip_id


async def b_dies_with_its_note_lost(
    standin: InfobipStandIn,
    start_relay: StartRelay,
    tmp_path: Path,
    clock: FakeClock,
    sections: dict[str, Any],
    *,
    c_waits: bool = True,
) -> str:
    """A relay that takes a@, refuses b@ for good and defers c@ (or takes it) while the history is locked,
    then stops: b@'s note is lost and its dead letter keeps its marker. Returns the queue id."""
    rcpts = ["a@example.org", "b@example.org", "c@example.org"]
    for rcpt in rcpts:
        standin.behaviour.refuse_recipients[rcpt] = "450 4.2.0 Try again later"
    first = await start_relay(clock=clock, **sections)
    queue_id = (await send_one(first.port, SENDER, rcpts, message())).split("Queued as ")[1][:21]
    await until_status(first, queue_id, dict.fromkeys(rcpts, "queued"))
    del standin.behaviour.refuse_recipients["a@example.org"]
    if not c_waits:
        del standin.behaviour.refuse_recipients["c@example.org"]
    standin.behaviour.refuse_recipients["b@example.org"] = "550 5.1.1 Recipient unknown"
    lock = sqlite3.connect(history_path(first.settings), isolation_level=None, timeout=10)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        clock.advance(60)
        await until(lambda: len(list((tmp_path / "dead").glob("*.unnoted"))) == 1 and len(standin.messages) == 1)
        await until(lambda: bool(queue_states(tmp_path)) is c_waits)
        await first.stop(grace=0)
    finally:
        lock.close()
    return queue_id


def held_dead_reads(monkeypatch: pytest.MonkeyPatch) -> tuple[threading.Event, threading.Event]:
    """Reads of dead letters (the re-noting at start) wait for the second event; the first says one began."""
    reading, release, real_read = threading.Event(), threading.Event(), Spool.read

    def slow_dead_read(spool: Spool, queue_id: str, *, dead: bool = False) -> tuple[Envelope, bytes]:
        if dead:  # a big dead/, a slow disk
            reading.set()
            release.wait(10)
        return real_read(spool, queue_id, dead=dead)

    monkeypatch.setattr(Spool, "read", slow_dead_read)
    return reading, release


async def test_a_new_dead_recipient_does_not_take_the_mark_of_one_still_to_be_noted_again(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """b@'s note was cut off by a stop (the marker stays) while c@ still waits in queue/. At the next start
    c@ dies before the re-noting reaches the message: c@'s note on disk used to take the marker away, and a
    stop then would lose b@'s bounce for good. The marker stays until b@ is noted again: both are bounced."""
    clock, sections = FakeClock(), notes_cut_off_at_stop(monkeypatch, tmp_path, sink)
    await b_dies_with_its_note_lost(standin, start_relay, tmp_path, clock, sections)
    standin.behaviour.refuse_recipients["c@example.org"] = "550 5.1.1 Recipient unknown"
    reading, release = held_dead_reads(monkeypatch)
    again = await start_relay(clock=clock, **sections)
    await until(reading.is_set)
    clock.advance(60)  # c@'s retry: refused for good, noted, bounced
    [c_bounce] = await sink.wait_for(1)
    assert b"Final-Recipient: rfc822; c@example.org" in c_bounce.data
    await until(lambda: bounce_states(again) == [("sent",)])
    assert list((tmp_path / "dead").glob("*.unnoted"))  # b@ is still to be noted again
    release.set()
    [_, b_bounce] = await sink.wait_for(2)
    assert b"Final-Recipient: rfc822; b@example.org" in b_bounce.data
    await until(lambda: not list((tmp_path / "dead").glob("*.unnoted")))
    await again.stop()
    assert len(sink.messages) == 2


async def test_a_dead_letter_requeued_before_the_renoting_leaves_no_marker_behind(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Requeued from the command line while the start's re-noting waited: the files went, and the re-noting
    counted it as a note that failed, so the marker of its next death stayed for the whole run (and a later
    start would note it once more). Gone is not damaged: b@ dies again, is bounced once, and no marker stays."""
    clock, sections = FakeClock(), notes_cut_off_at_stop(monkeypatch, tmp_path, sink)
    queue_id = await b_dies_with_its_note_lost(standin, start_relay, tmp_path, clock, sections, c_waits=False)
    reading, release = held_dead_reads(monkeypatch)
    again = await start_relay(clock=clock, **sections)
    await until(reading.is_set)
    assert queue_verbs.requeue(Spool(tmp_path), [queue_id]) == 0  # b@ alone, back in queue/, due now
    release.set()
    [bounce] = await sink.wait_for(1)  # b@ refused again, and bounced
    assert b"Final-Recipient: rfc822; b@example.org" in bounce.data
    await until(lambda: bounce_states(again) == [("sent",)])
    await until(lambda: not list((tmp_path / "dead").glob("*.unnoted")))
    await again.stop()
    assert len(sink.messages) == 1


async def test_a_full_disk_after_an_attempt_does_not_send_infobip_what_it_took_again(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Infobip took a@ and deferred c@, then the state write failed (ENOSPC): the message was tried again
    with all its recipients, and a@ got it twice. Only c@ goes again."""
    clock = FakeClock()
    for rcpt in ("a@example.org", "c@example.org"):
        standin.behaviour.refuse_recipients[rcpt] = "450 4.2.0 Try again later"
    started = await start_relay(clock=clock, spool=spooled(tmp_path, retry_initial=60, retry_max=60))
    assert (await send_one(started.port, SENDER, ["a@example.org", "c@example.org"], message())).startswith("250")
    await until(lambda: bool(queue_states(tmp_path)) and queue_states(tmp_path)[0].attempts == 1)
    real, failed = Spool.write_state, []

    def full_disk(spool: Spool, queue_id: str, state: EntryState) -> None:
        if not failed:
            failed.append(queue_id)
            raise OSError(errno.ENOSPC, "No space left on device")
        real(spool, queue_id, state)

    monkeypatch.setattr(Spool, "write_state", full_disk)
    del standin.behaviour.refuse_recipients["a@example.org"]
    with structlog.testing.capture_logs() as logs:
        clock.advance(60)  # a@ taken, c@ deferred; the state write fails
        await until(lambda: any(e["event"] == "delivery_error" for e in logs))
    del standin.behaviour.refuse_recipients["c@example.org"]
    clock.advance(60)  # the job tried again after retry_initial
    await until(lambda: len(standin.messages) == 2)
    assert [m.rcpt_tos for m in standin.messages] == [["a@example.org"], ["c@example.org"]]


def queue_states(spool: Path) -> list[EntryState]:
    store = Spool(spool)
    return [store.read_state(path.stem) for path in sorted(store.queue.glob("*.state"))]


async def test_a_5xx_from_the_bounce_server_is_logged_and_not_retried(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 unknown"
    sink.refuse.append("550 5.1.1 No such mailbox here")
    relay = await start_relay(spool=spooled(tmp_path), bounces=bounces_to(sink))
    with structlog.testing.capture_logs() as logs:
        await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
        await until(lambda: bounce_count(relay, "dropped") == 1)
    [refused] = [e for e in logs if e["event"] == "bounce_refused"]
    assert refused["reply"] == "550 No such mailbox here" or refused["reply"].startswith("550")
    assert bounce_count(relay, "retried") == 0 and sink.messages == []


async def test_bounces_to_a_fixed_address(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 unknown"
    relay = await start_relay(spool=spooled(tmp_path), bounces=bounces_to(sink, to="postmaster@erp.example.com"))
    await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
    [sent] = await sink.wait_for(1)
    assert sent.rcpt_tos == ["postmaster@erp.example.com"] and parsed(sent.data)["To"] == "postmaster@erp.example.com"
    await until(lambda: not list((tmp_path / "dead").glob("*.unnoted")))  # the bounce is noted: no marker left
    assert list((tmp_path / "dead").glob("*.msg"))


async def test_a_bounce_for_the_null_sender_is_logged_never_sent(sink: MailSink) -> None:
    """MAIL FROM:<> never reaches the spool through our own listener; a bounce of a bounce would loop anyway."""
    from prometheus_client import CollectorRegistry

    metrics = OutcomeMetrics(CollectorRegistry())
    done: list[tuple[int, str, str]] = []

    async def record(bounce_id: int, at: float, outcome: str, detail: str, claimed_at: float | None) -> None:
        done.append((bounce_id, outcome, detail))

    async def nothing(*args: object) -> Any:
        return []

    settings = BouncesSettings(enabled=True, smtp_host="127.0.0.1", smtp_port=sink.port)
    bouncer = Bouncer(settings, "relay.test", FakeClock(), metrics, nothing, record, nothing, nothing)
    rcpt = BounceRecipient("a@example.org", "bounced", "5.1.1", "EC_X (y)", "ib1")
    with structlog.testing.capture_logs() as logs:
        await bouncer.send(BounceJob(1, "q1", "<m@x>", "", 0.0, b"", (rcpt,), 0, 0.0))
    assert done == [(1, "dropped", "not sent: no route to sender <>")] and sink.messages == []
    assert [e["event"] for e in logs] == ["bounce_not_sent"]


async def test_a_delay_warning_once_for_a_message_still_queued(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    clock = FakeClock()
    standin.behaviour.data_replies.extend(["451 4.3.0 Try again later"] * 50)
    relay = await start_relay(
        clock=clock,
        spool=spooled(tmp_path, retry_initial=60, retry_max=60),
        bounces=bounces_to(sink, delay_warning="5m"),
    )
    await send_one(relay.port, SENDER, ["slow@example.org"], message())
    clock.advance(290)  # the outbox is looked at every 10 s: not yet 5 minutes
    assert sink.messages == []

    def warned_time_moves_on() -> bool:
        # A step per look, not one jump past 5 minutes: the sender's first look (at start-up) may still be
        # under way, and a look begun before a jump arms its next one 10 s after it, which nothing reaches.
        clock.advance(1)
        return bool(sink.messages)

    await until(warned_time_moves_on)
    [sent] = await sink.wait_for(1)
    bounce = parsed(sent.data)
    [_, block] = status_blocks(bounce)
    assert block["Action"] == "delayed" and block["Status"] == "4.4.7"
    assert "Delayed Mail" in bounce["Subject"] and "451 4.3.0 Try again later" in block["Diagnostic-Code"]
    for _ in range(3):
        clock.advance(600)  # one warning per message, however long it stays queued
    await until(lambda: bounce_count(relay, "sent") == 1)
    assert len(sink.messages) == 1


async def test_a_message_the_operator_deleted_gets_no_delay_warning_and_trace_says_so(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    """`relay queue delete` removed the files but told the history nothing: trace said the recipient still
    waited, and the sender later heard "still trying, no need to send it again" about mail that would never go."""
    clock = FakeClock()
    standin.behaviour.data_replies.extend(["451 4.3.0 Try again later"] * 50)
    spool, bounces = spooled(tmp_path, retry_initial=60, retry_max=60), bounces_to(sink, delay_warning="5m")
    sections = {"spool": spool, "bounces": bounces}
    relay = await start_relay(clock=clock, **sections)
    queue_id = (await send_one(relay.port, SENDER, ["slow@example.org"], message())).split("Queued as ")[1][:21]
    await until_status(relay, queue_id, {"slow@example.org": "queued"})  # deferred, and noted
    config = write_config(tmp_path / "relay.toml", standin, port=relay.port, **sections)
    assert relay_main(["queue", "--config", str(config), "delete", queue_id]) == 0
    assert "1 waiting recipient(s) marked failed" in capsys.readouterr().out
    [found] = await messages(relay, queue_id)
    [rcpt] = found["recipients"]
    assert rcpt["status"] == "failed" and "deleted by the operator" in rcpt["detail"]
    assert "deleted" in [e["kind"] for e in found["events"]]
    warn_at = clock.now + 310  # delay_warning past: the outbox's looks from then on would warn

    def looked_past_warn_at() -> bool:  # a step a look, as in the test above
        clock.advance(1)
        return any(e["event"] == "bounce_outbox_checked" and e["at"] >= warn_at for e in logs)

    clock.advance(290)  # not yet 5 minutes
    with structlog.testing.capture_logs() as logs:
        await until(looked_past_warn_at)
    assert sink.messages == [] and bounce_count(relay, "sent") == 0


async def test_pass_through_bounces_only_what_was_refused_inside_a_250(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """Spool off: the app waits for Infobip's verdict. A whole refusal or a deferral was the app's own
    answer (no bounce); a recipient refused inside a 250 comes back as a bounce."""
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient <nosuch@example.org> unknown"
    history = {"history_path": str(tmp_path / "history.sqlite3")}
    relay = await start_relay(spool={"enabled": False}, bounces=bounces_to(sink), reports={**history})
    assert (await send_one(relay.port, SENDER, ["nosuch@example.org"], message())).startswith("550")
    standin.behaviour.data_replies.append("451 4.3.0 Try later")
    assert (await send_one(relay.port, SENDER, ["later@example.org"], message())).startswith("451")
    standin.behaviour.down = True
    standin.close_idle_connections()  # Infobip unreachable: the relay's own 4xx
    assert (await send_one(relay.port, SENDER, ["down@example.org"], message())).startswith("4")
    standin.behaviour.down = False
    partial = await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
    assert partial.startswith("250 2.6.0 Message queued as ")
    [sent] = await sink.wait_for(1)
    [_, block] = status_blocks(parsed(sent.data))
    assert block["Final-Recipient"] == "rfc822; nosuch@example.org" and block["Status"] == "5.1.1"
    await until_status(relay, "later@example.org", {"later@example.org": "failed"})
    await until_status(relay, "down@example.org", {"down@example.org": "failed"})
    found = await messages(relay, "nosuch@example.org")
    assert sorted(r["status"] for m in found for r in m["recipients"]) == ["failed", "failed", "sent"]
    [deferred] = await messages(relay, "later@example.org")
    assert "the app was told 4" in deferred["recipients"][0]["detail"]
    assert len(sink.messages) == 1


@pytest.mark.slow  # PASS_THROUGH_WAIT (5 s) has to run out
async def test_pass_through_answers_within_its_wait_while_the_history_fails_and_the_bounce_follows(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    """Spool off, the history's file locked past history_timeout (so the write fails, and is tried again): the app
    hears its 250 after PASS_THROUGH_WAIT rather than waiting as long as the history fails, and the bounce for
    the recipient refused inside it goes out, once, when the history takes the note."""
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient <nosuch@example.org> unknown"
    history = {"history_path": str(tmp_path / "history.sqlite3"), "history_timeout": 1}
    relay = await start_relay(spool={"enabled": False}, bounces=bounces_to(sink), reports={**history})
    lock = sqlite3.connect(history_path(relay.settings), isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        with structlog.testing.capture_logs() as logs:
            async with asyncio.timeout(9):
                partial = await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
            assert partial.startswith("250 2.6.0 Message queued as ")
            await until(lambda: any(e["event"] == "history_write_failed" for e in logs))
            assert (await get(relay.http.port, "/messages?q=a@example.org"))[0] == 503  # not a wait
        assert not sink.messages
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    [sent] = await sink.wait_for(1)
    [_, block] = status_blocks(parsed(sent.data))
    assert block["Final-Recipient"] == "rfc822; nosuch@example.org"
    await until_status(relay, "nosuch@example.org", {"a@example.org": "sent", "nosuch@example.org": "failed"})
    assert len(sink.messages) == 1


async def test_a_4xx_from_the_bounce_server_is_tried_again(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    clock = FakeClock()
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 unknown"
    sink.refuse.append("451 4.3.0 Mailbox busy, try later")
    relay = await start_relay(clock=clock, spool=spooled(tmp_path), bounces=bounces_to(sink))
    await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
    await until(lambda: bounce_count(relay, "retried") == 1)
    assert sink.messages == []

    def sent_once_time_moves_on() -> bool:
        # Moved a step per look, not once: the sender may not be asleep on the clock yet when "retried"
        # counts (advancing before it is would leave its timer in the future, and the test hanging).
        clock.advance(5)
        return bounce_count(relay, "sent") == 1

    await until(sent_once_time_moves_on)
    assert len(sink.messages) == 1


async def test_a_reload_changes_where_bounces_go_and_reports_on_waits_for_a_restart(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 unknown"
    relay = await start_relay(spool=spooled(tmp_path), bounces=bounces_to(sink))
    bounces = relay.settings.bounces.model_copy(update={"to": "postmaster@erp.example.com"})
    reports = relay.settings.reports.model_copy(update={"enabled": True})
    await relay.reload(relay.settings.model_copy(update={"bounces": bounces, "reports": reports}))
    await send_one(relay.port, SENDER, ["a@example.org", "nosuch@example.org"], message())
    [sent] = await sink.wait_for(1)
    assert sent.rcpt_tos == ["postmaster@erp.example.com"]  # applied at once
    [upstream] = await standin.wait_for_messages(1)
    assert b"X-IB-Bulk-Id" not in upstream.data  # reports.enabled waits for a restart (restart_needed_for says so)
