"""Delivery reports pulled from the stand-in's real HTTPS endpoint into the message history; trace and
GET /messages over it. Real sockets throughout: SMTP to the relay, SMTP+TLS to the stand-in, HTTPS back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog.testing
from prometheus_client import CollectorRegistry
from pydantic import SecretStr

import relay.outcomes.reports
import relay.outcomes.service
import relay.outcomes.trace
from relay.app import Relay
from relay.config import ReportsSettings
from relay.outcomes.decide import Report, bulk_id, bulk_profile
from relay.outcomes.metrics import OutcomeMetrics
from relay.outcomes.reports import Poller, ReportsClient
from relay.outcomes.sqlite import SqliteHistory, history_path
from relay.testing.clock import FakeClock
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, free_port, message, relay_settings
from tests.helpers import SENDER, send_one, until
from tests.outcomes import history_failing, messages, reports_on, statuses, until_status


@pytest.fixture
async def reports(standin: InfobipStandIn) -> AsyncIterator[InfobipStandIn]:
    await standin.reports.start()
    yield standin


async def test_delivered_and_bounced_recipients_of_one_message(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = await start_relay(**reports_on(reports, tmp_path))
    reply = await send_one(relay.port, SENDER, ["a@example.org", "nobody@bounce.example"], message())
    assert reply.startswith("250 2.6.0 Message queued as ")
    infobip_id = reply.rsplit(" ", 1)[1]
    sent = (await reports.wait_for_messages(1))[0]
    bulk_line = next(line for line in sent.data.split(b"\r\n") if line.startswith(b"X-IB-Bulk-Id: "))
    bulk = bulk_line.split(b": ", 1)[1].decode()
    assert bulk.startswith("relay-")

    await until_status(relay, infobip_id, {"a@example.org": "delivered", "nobody@bounce.example": "bounced"})
    [found] = await messages(relay, infobip_id)
    bounced = next(r for r in found["recipients"] if r["status"] == "bounced")
    assert bounced["infobip_id"] == infobip_id and "EC_MAILBOX_DOES_NOT_EXIST" in bounced["detail"]
    assert found["sender"] == SENDER and found["bulk_id"] == bulk
    assert found["message_id"].startswith("<") and found["message_id"].endswith(">")
    # Every request the relay made carried its own bulk id and its key; none asked for everyone's reports.
    assert reports.reports.requests
    for request in reports.reports.requests:
        assert request.authorized and request.query.get("bulkId") == bulk, request
    metrics = relay.metrics.registry
    assert metrics.get_sample_value("relay_reports_total", {"result": "delivered"}) == 1
    assert metrics.get_sample_value("relay_reports_total", {"result": "bounced"}) == 1
    assert metrics.get_sample_value("relay_outcome_seconds_count") == 2


async def test_reports_of_other_systems_on_the_account_are_never_taken(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """Another system's report (its own bulk id, or none) waits in the account; the app's own bulk id
    means the app's reports: the relay adds none of its own and never asks for them."""
    reports.reports.sent("other-system-1", b"X-IB-Bulk-Id: crm-2026\r\n\r\n", ["x@example.org"])
    reports.reports.sent("other-system-2", b"Subject: no bulk id\r\n\r\n", ["y@example.org"])
    relay = await start_relay(**reports_on(reports, tmp_path))
    own = await send_one(relay.port, SENDER, ["a@example.org"], message())
    apps = await send_one(relay.port, SENDER, ["b@example.org"], message(X_IB_Bulk_Id="app-bulk-7"))
    await until_status(relay, own.rsplit(" ", 1)[1], {"a@example.org": "delivered"})
    sent = await reports.wait_for_messages(2)
    assert sent[1].data.count(b"X-IB-Bulk-Id") == 1  # the app's own, and no second one
    left = sorted(w.report["messageId"] for w in reports.reports.waiting)
    assert left == sorted(["other-system-1", "other-system-2", apps.rsplit(" ", 1)[1]])
    assert {r.query.get("bulkId") for r in reports.reports.requests} == {relay_bulk(sent[0].data)}
    [app_message] = await messages(relay, apps.rsplit(" ", 1)[1])
    assert app_message["bulk_id"] is None and app_message["recipients"][0]["status"] == "sent"


def relay_bulk(data: bytes) -> str:
    line = next(line for line in data.split(b"\r\n") if line.startswith(b"X-IB-Bulk-Id: "))
    return line.split(b": ", 1)[1].decode()


async def test_a_429_backs_off_until_retry_after(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    clock = FakeClock()
    relay = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30))
    reply = await send_one(relay.port, SENDER, ["a@example.org"], message())
    registry = relay.metrics.registry
    await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 30)
    reports.reports.behaviour.rate_limited, reports.reports.behaviour.retry_after = 1, 120
    clock.advance(30)
    await reports.reports.wait_for_requests(1)
    await until(lambda: registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "rate_limited"}) == 1)
    assert registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 120
    clock.advance(119.9)  # no poll falls due before Infobip's Retry-After
    assert len(reports.reports.requests) == 1
    clock.advance(0.2)
    await reports.reports.wait_for_requests(2)
    await until_status(relay, reply.rsplit(" ", 1)[1], {"a@example.org": "delivered"})
    # back to the configured interval once a poll works
    await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 30)


async def test_server_errors_double_the_interval(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    clock = FakeClock()
    relay = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    registry = relay.metrics.registry
    await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 30)
    reports.reports.behaviour.failing = 2
    clock.advance(30)
    await reports.reports.wait_for_requests(1)
    await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 60)
    clock.advance(60)
    await reports.reports.wait_for_requests(2)
    await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 120)
    assert registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "http_error"}) == 2


async def test_a_page_the_history_cannot_store_is_kept_and_stored_in_a_later_round(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """Infobip hands a report out once: a page taken while the history fails must not be lost, and the
    poller must live on (it used to end with the history's error)."""
    clock = FakeClock()
    relay = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30))
    infobip_id = (await send_one(relay.port, SENDER, ["a@example.org"], message())).rsplit(" ", 1)[1]
    await until_status(relay, infobip_id, {"a@example.org": "sent"})
    registry = relay.metrics.registry

    def next_poll() -> float | None:
        return registry.get_sample_value("relay_reports_next_poll_timestamp_seconds")

    await until(lambda: next_poll() == clock.now + 30)
    with history_failing(relay), structlog.testing.capture_logs() as logs:
        clock.advance(30)
        await until(lambda: registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "history"}) == 1)
        assert not reports.reports.waiting  # handed out: only the relay has the report now
        await until(lambda: next_poll() == clock.now + 60)  # the next round waits twice as long
        assert await statuses(relay, infobip_id) == {"a@example.org": "sent"}
    [failed] = [e for e in logs if e["event"] == "reports_poll_failed"]
    assert failed["reason"] == "history" and failed["unstored"] == 1 and "disk I/O error" in failed["error"]
    clock.advance(60)
    await until_status(relay, infobip_id, {"a@example.org": "delivered"})
    assert registry.get_sample_value("relay_reports_total", {"result": "delivered"}) == 1
    await until(lambda: next_poll() == clock.now + 30)  # back to the interval once the history works


async def test_a_page_not_stored_when_the_relay_stops_is_named_in_the_log(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """Stopped while holding a page it could not store (Infobip will not hand it out again): the operator is
    told whose reports are lost."""
    clock = FakeClock()
    relay = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30))
    infobip_id = (await send_one(relay.port, SENDER, ["a@example.org"], message())).rsplit(" ", 1)[1]
    await until_status(relay, infobip_id, {"a@example.org": "sent"})
    registry = relay.metrics.registry
    with history_failing(relay), structlog.testing.capture_logs() as logs:
        clock.advance(30)
        await until(lambda: registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "history"}) == 1)
        await relay.stop()
    [lost] = [e for e in logs if e["event"] == "reports_not_stored"]
    assert lost["reports"] == 1 and lost["infobip_ids"] == [infobip_id]


@pytest.mark.parametrize("history_comes_back", [True, False])
async def test_a_stop_while_a_fetched_page_waits_for_the_history_stores_it_or_names_it(
    reports: InfobipStandIn, monkeypatch: pytest.MonkeyPatch, history_comes_back: bool
) -> None:
    """Stopped while a page Infobip handed out waits for a held-up history (the cancel lands in the wait):
    one last try stores it if the history takes it within LAST_TRY; else the log names whose reports they
    were. Both used to end silently, the page lost."""
    monkeypatch.setattr(relay.outcomes.reports, "LAST_TRY", 5.0 if history_comes_back else 0.05)
    bulk = bulk_id("test", FakeClock().time())
    reports.reports.sent("ib-1", f"X-IB-Bulk-Id: {bulk}\r\n\r\n".encode(), ["a@example.org"])
    settings = ReportsSettings(enabled=True, base_url=reports.reports.base_url, ca_file=reports.ca_file)
    client, clock, released = ReportsClient(settings), FakeClock(), asyncio.Event()
    calls: list[list[Report]] = []
    stored: list[Report] = []

    async def apply(page: list[Report], source: str) -> None:  # the history: held up until `released`
        calls.append(page)
        await released.wait()
        stored.extend(page)

    async def pending(since: float) -> list[str]:
        return [bulk]

    key, registry = SecretStr(reports.reports.api_key), CollectorRegistry()
    poller = Poller(client, 30, clock, OutcomeMetrics(registry), pending, apply, lambda _: key)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(poller.run())
        await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 30)
        clock.advance(30)
        await until(lambda: len(calls) == 1)  # fetched (handed out) and waiting for the history
        task.cancel()
        if history_comes_back:
            await until(lambda: len(calls) == 2)  # the last try
            released.set()
        await asyncio.gather(task, return_exceptions=True)
    await client.close()
    assert not reports.reports.waiting
    lost = [e for e in logs if e["event"] == "reports_not_stored"]
    if history_comes_back:
        assert [r.message_id for r in stored] == ["ib-1"] and lost == []
    else:
        assert stored == [] and [e["infobip_ids"] for e in lost] == [["ib-1"]]


async def test_a_report_with_text_no_history_could_store_is_stored_and_the_next_ones_too(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """A lone surrogate and a NUL in Infobip's words: stored (cleaned), not kept and refused again each round."""
    clock = FakeClock()
    relay = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30))
    reply = await send_one(relay.port, SENDER, ["a@example.org", "b@example.org"], message())
    await until_status(relay, reply.rsplit(" ", 1)[1], {"a@example.org": "sent", "b@example.org": "sent"})
    odd = reports.reports.waiting[0].report
    odd["status"] = {**odd["status"], "description": "delivered \ud800 to\x00 handset"}
    clock.advance(30)
    statuses = {"a@example.org": "delivered", "b@example.org": "delivered"}
    await until_status(relay, reply.rsplit(" ", 1)[1], statuses)
    assert relay.metrics.registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "history"}) == 0


async def test_a_page_with_a_byte_that_is_not_utf8_is_stored(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """A server writing Latin-1: the page is handed out once, so one odd byte must not make it a poll error
    (bad_response) and lose it whole; the byte reads as U+FFFD."""
    clock = FakeClock()
    relay = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30))
    infobip_id = (await send_one(relay.port, SENDER, ["a@example.org"], message())).rsplit(" ", 1)[1]
    await until_status(relay, infobip_id, {"a@example.org": "sent"})
    odd = reports.reports.waiting[0].report
    odd["status"] = {**odd["status"], "description": "Message d\u00e9livr\u00e9"}
    reports.reports.behaviour.charset = "latin-1"
    clock.advance(30)
    await until_status(relay, infobip_id, {"a@example.org": "delivered"})
    [found] = await messages(relay, infobip_id)
    assert "Message d\ufffdlivr\ufffd" in found["recipients"][0]["detail"]
    assert relay.metrics.registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "bad_response"}) == 0


async def test_a_wrong_api_key_is_a_poll_error_and_the_key_is_never_logged(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    relay = await start_relay(**reports_on(reports, tmp_path, api_key="wrong-key-123"))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await reports.reports.wait_for_requests(1)
    registry = relay.metrics.registry
    await until(
        lambda: (registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "http_error"}) or 0) >= 1
    )
    assert not reports.reports.requests[0].authorized
    assert "wrong-key-123" not in capsys.readouterr().err


async def test_trace_finds_a_message_by_each_kind_of_query(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from relay.cli import main

    relay = await start_relay(**reports_on(reports, tmp_path))
    data = message(Message_ID="<inv-42@erp.example.com>")
    reply = await send_one(relay.port, SENDER, ["a@example.org", "gone@bounce.example"], data)
    infobip_id = reply.rsplit(" ", 1)[1]
    await until_status(relay, infobip_id, {"a@example.org": "delivered", "gone@bounce.example": "bounced"})
    [found] = await messages(relay, infobip_id)
    queue_id = found["queue_id"]
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{tmp_path}"\n')
    for query in (queue_id, infobip_id, "<inv-42@erp.example.com>", "gone@bounce.example", "A@EXAMPLE.ORG"):
        assert main(["trace", "--config", str(config), "--json", query]) == 0
        [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]  # not log lines
        traced = json.loads(line)
        assert traced["queue_id"] == queue_id and traced["message_id"] == "<inv-42@erp.example.com>"
        assert {r["address"]: r["status"] for r in traced["recipients"]} == {
            "a@example.org": "delivered",
            "gone@bounce.example": "bounced",
        }
        assert set(traced["recipients"][0]) >= {"address", "status", "infobip_id", "detail", "at"}
        assert set(traced) >= {"queue_id", "message_id", "sender", "received_at", "recipients"}
        assert (await messages(relay, query))[0]["queue_id"] == queue_id
    assert main(["trace", "--config", str(config), "<inv-42@erp.example.com>"]) == 0
    words = capsys.readouterr().out
    assert f"message {queue_id}" in words and "received from 127.0.0.1" in words
    assert f"attempt 1: Infobip took 2 recipient(s) as {infobip_id}" in words
    assert "gone@bounce.example: pulled: UNDELIVERABLE" in words and "a@example.org: pulled: DELIVERED" in words
    assert main(["trace", "--config", str(config), "nothing@example.net"]) == 1
    assert "no message matches" in capsys.readouterr().err


async def test_trace_and_get_messages_say_when_they_show_only_the_newest(
    reports: InfobipStandIn,
    start_relay: StartRelay,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """They show the SHOWN newest matches: they used to stop there without a word."""
    from relay.cli import main

    for module in (relay.outcomes.trace, relay.outcomes.service):
        monkeypatch.setattr(module, "SHOWN", 2)
    started = await start_relay(**reports_on(reports, tmp_path))
    for _ in range(3):
        await send_one(started.port, SENDER, ["many@example.org"], message())
    await until(lambda: len(reports.reports.requests) > 0)
    await until_status(started, "many@example.org", {"many@example.org": "delivered"})
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{started.http.port}/messages", params={"q": "many@example.org"}) as response,
    ):
        body = await response.json()
    assert len(body["messages"]) == 2 and body["truncated"] is True
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{tmp_path}"\n')
    assert main(["trace", "--config", str(config), "--json", "many@example.org"]) == 0
    out, err = capsys.readouterr()
    assert len([line for line in out.splitlines() if line.startswith("{")]) == 2
    assert "more than 2 messages match; the 2 newest are shown" in err
    assert (await messages(started, body["messages"][0]["queue_id"]))[0]["queue_id"] == body["messages"][0]["queue_id"]


async def test_messages_without_history_or_query(standin: InfobipStandIn, start_relay: StartRelay) -> None:
    relay = await start_relay()
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{relay.http.port}/messages"
        async with session.get(url, params={"q": "x"}) as response:
            assert response.status == 404 and "enable [reports] or [bounces]" in (await response.json())["error"]


async def test_trace_without_a_history(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from relay.cli import main

    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{tmp_path}"\n')
    assert main(["trace", "--config", str(config), "x"]) == 1
    assert "no message history at" in capsys.readouterr().err


async def test_an_unreachable_or_garbled_reports_endpoint_is_a_poll_error(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    closed = f"https://localhost:{free_port()}"  # nothing listens there
    relay = await start_relay(**reports_on(reports, tmp_path, base_url=closed))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    registry = relay.metrics.registry
    await until(
        lambda: (registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "connection"}) or 0) >= 1
    )
    await until_status(relay, "a@example.org", {"a@example.org": "sent"})  # still waiting for its report


HR_SENDER, OPS_SENDER = "payroll@hr.example.com", "ops@ops.example.com"


def two_accounts(reports: InfobipStandIn, hr_reports_key: str = "hr-reports-key") -> list[dict[str, str]]:
    """hr is an Infobip account of its own (its SMTP user, its reports key); ops shares the main account
    and has no reports key of its own."""
    reports.accounts["hr"] = "hr-secret"
    reports.reports.account_keys["hr"] = "hr-reports-key"
    hr = {"name": "hr", "sender_domain": "hr.example.com", "username": "hr", "password": "hr-secret"}
    return [{**hr, "reports_api_key": hr_reports_key}, {"name": "ops", "sender_domain": "ops.example.com"}]


async def test_each_profiles_reports_are_fetched_with_its_own_accounts_key(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = await start_relay(**reports_on(reports, tmp_path), profiles=two_accounts(reports))
    ids = {}
    for sender in (HR_SENDER, SENDER, OPS_SENDER):
        ids[sender] = (await send_one(relay.port, sender, ["a@example.org"], message(sender=sender))).rsplit(" ", 1)[1]
    for infobip_id in ids.values():  # hr's reports are in hr's account only: the main key would never see them
        await until_status(relay, infobip_id, {"a@example.org": "delivered"})
    bulks = {m.mail_from: relay_bulk(m.data) for m in await reports.wait_for_messages(3)}
    assert bulks[HR_SENDER] == bulks[SENDER] + "-hr" and bulks[OPS_SENDER] == bulks[SENDER] + "-ops"
    assert {m.mail_from: m.auth_user for m in reports.messages}[HR_SENDER] == "hr"
    used = {(r.query["bulkId"], r.api_key) for r in reports.reports.requests}
    main_key = reports.reports.api_key
    assert used == {(bulks[HR_SENDER], "hr-reports-key"), (bulks[SENDER], main_key), (bulks[OPS_SENDER], main_key)}
    assert all(r.authorized for r in reports.reports.requests)


async def test_one_profiles_wrong_reports_key_backs_off_alone(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clock = FakeClock()
    profiles = two_accounts(reports, hr_reports_key="wrong-hr-key-123")
    relay = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30), profiles=profiles)
    hr_reply = await send_one(relay.port, HR_SENDER, ["h@example.org"], message(sender=HR_SENDER))
    hr_id = hr_reply.rsplit(" ", 1)[1]
    first = await send_one(relay.port, SENDER, ["a@example.org"], message())
    registry = relay.metrics.registry
    await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 30)
    clock.advance(30)
    await until_status(relay, first.rsplit(" ", 1)[1], {"a@example.org": "delivered"})
    await until(lambda: registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "http_error"}) == 1)
    # The main account's key works: the next poll is at the interval, and hr's key sits it out.
    assert registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 30
    second = await send_one(relay.port, SENDER, ["b@example.org"], message())
    clock.advance(30)
    await until_status(relay, second.rsplit(" ", 1)[1], {"b@example.org": "delivered"})
    hr_requests = [r for r in reports.reports.requests if r.query["bulkId"].endswith("-hr")]
    assert len(hr_requests) == 1 and not hr_requests[0].authorized  # not again before its doubled interval
    clock.advance(30)  # 60 s after its failure: hr's key is tried again
    await reports.reports.wait_for_requests(len(reports.reports.requests) + 1)
    assert reports.reports.requests[-1].query["bulkId"].endswith("-hr")
    await until(lambda: registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "http_error"}) == 2)
    assert "wrong-hr-key-123" not in capsys.readouterr().err
    # A SIGHUP with the right key: the next try (its interval doubled again, to 120 s) fetches hr's report.
    fixed = relay_settings(reports, **reports_on(reports, tmp_path, poll_interval=30), profiles=two_accounts(reports))
    await relay.reload(fixed)
    clock.advance(120)
    await until_status(relay, hr_id, {"h@example.org": "delivered"})
    assert reports.reports.requests[-1].api_key == "hr-reports-key"


async def page_handed_out_answer_held(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, clock: FakeClock
) -> tuple[Relay, str, asyncio.Event]:
    """A relay (polling every 30 s on `clock`) that sent one message to a@; its first poll has taken the page
    from the stand-in (Infobip's side is done), whose answer waits for the returned event. Returns the relay
    and the message's Infobip id too."""
    started = await start_relay(clock=clock, **reports_on(reports, tmp_path, poll_interval=30))
    infobip_id = (await send_one(started.port, SENDER, ["a@example.org"], message())).rsplit(" ", 1)[1]
    await until_status(started, infobip_id, {"a@example.org": "sent"})
    registry = started.metrics.registry
    await until(lambda: registry.get_sample_value("relay_reports_next_poll_timestamp_seconds") == clock.now + 30)
    reports.reports.behaviour.answer = answer = asyncio.Event()
    clock.advance(30)
    await until(lambda: not reports.reports.waiting)  # handed out; the answer waits
    return started, infobip_id, answer


async def test_a_reload_that_changes_the_reports_url_does_not_cut_a_page_being_fetched(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """The old client was closed at the reload, under the fetch: the page Infobip had handed out was lost.
    Now it finishes, and the next round uses the new URL."""
    clock = FakeClock()
    relay, infobip_id, answer = await page_handed_out_answer_held(reports, start_relay, tmp_path, clock)
    registry = relay.metrics.registry
    moved = reports_on(reports, tmp_path, poll_interval=30, base_url=f"https://127.0.0.1:{reports.reports.port}")
    await relay.reload(relay_settings(reports, **moved))
    answer.set()
    await until_status(relay, infobip_id, {"a@example.org": "delivered"})
    second = (await send_one(relay.port, SENDER, ["b@example.org"], message())).rsplit(" ", 1)[1]
    clock.advance(30)
    await until_status(relay, second, {"b@example.org": "delivered"})
    assert registry.get_sample_value("relay_reports_poll_errors_total", {"reason": "connection"}) == 0


async def test_a_stop_while_a_page_is_being_fetched_lets_it_be_stored(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """Infobip has handed the page out and its answer is on the way when the relay stops: the stop waits for
    it (reports_stop_waiting) and stores it. It used to cancel the fetch: the page was lost, without a word."""
    started, infobip_id, answer = await page_handed_out_answer_held(reports, start_relay, tmp_path, FakeClock())
    with structlog.testing.capture_logs() as logs:
        stopping = asyncio.create_task(started.stop())
        await until(lambda: any(e["event"] == "reports_stop_waiting" for e in logs))
        answer.set()
        await stopping
    assert not any(e["event"] in ("reports_fetch_cut", "reports_not_stored") for e in logs)
    stored = SqliteHistory(history_path(started.settings), readonly=True)
    [trace] = stored.lookup(infobip_id, 5)
    stored.close()
    assert [(r.address, r.status) for r in trace.recipients] == [("a@example.org", "delivered")]


async def test_a_page_whose_answer_outlasts_the_stop_is_named_in_the_log(
    reports: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The answer never comes within the stop's wait: the fetch is cut, and the operator is told whose
    page Infobip may have handed out (reports_fetch_cut, with the bulk id)."""
    monkeypatch.setattr(relay.outcomes.service, "STOP_WAIT", 0.1)
    started, _, answer = await page_handed_out_answer_held(reports, start_relay, tmp_path, FakeClock())
    with structlog.testing.capture_logs() as logs:
        await started.stop(grace=0)
    answer.set()  # the stand-in's handler may end (its own stop would wait for it)
    [cut] = [e for e in logs if e["event"] == "reports_fetch_cut"]
    assert cut["bulk_id"] == reports.reports.requests[-1].query["bulkId"]


def test_the_bulk_id_names_its_profile() -> None:
    at = 1795870800.0  # 2026-11-28T13:00:00Z
    assert bulk_id("ab12cd34", at) == "relay-ab12cd34-2026112813"
    assert bulk_id("ab12cd34", at, "hr") == "relay-ab12cd34-2026112813-hr"
    for profile in ("default", "hr", "ops.eu-1", "a_b"):
        assert bulk_profile(bulk_id("ab12cd34", at, profile)) == profile
    for foreign in ("crm-2026", "relay-xyz-2026112813-hr", "relay-ab12cd34-20261128-hr", ""):
        assert bulk_profile(foreign) == "default"
