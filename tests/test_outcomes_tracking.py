"""Tracking events (issue 14: opened, clicked, ...): the relay's X-IB-Tracking-Url on its own messages, the
push listener's tracking path, the pure parser, and the stand-in pushing events end to end into the history,
`relay trace` and GET /messages. Payloads are seed 000's ("Tracking notifications"), with example addresses
in place of the seed's obfuscated ones."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing

from relay.cli import main
from relay.core.message import Prepared
from relay.ops import privacy
from relay.ops.logs import redact
from relay.outcomes.decide import claim_reports, parse_tracking
from relay.outcomes.history import Tracked
from relay.store.sealing import new_key
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, free_port, message
from tests.helpers import SENDER, send_one
from tests.outcomes import messages, reports_on, until_status

OPENED: dict[str, Any] = {
    "notificationType": "OPENED",
    "eventId": "8d2f8781-91fc-4473-9b0a-b12b51fafbe6",
    "domain": "some-domain.com",
    "recipient": "someone@example.org",
    "sendDateTime": 1704106800000,
    "messageId": "14b734recsf69n8zkao5",
    "bulkId": "ikzzmbhu6223bxkhmyrj",
    "callbackData": "Callback data",
    "recipientInfo": {"deviceType": "Phone", "os": "iOS 12", "deviceName": "Apple"},
    "geoLocation": {"countryName": "Los Angeles", "city": "United States"},
    "entityId": "promotional-traffic-entity",
    "applicationId": "marketing-automation-application",
    "campaignReferenceId": "campaign-reference-123",
}


def event(kind: str, **extra: Any) -> dict[str, Any]:
    return {**OPENED, "notificationType": kind, **extra}


# the parser, with plain values


def test_each_of_the_seeds_notifications_is_one_event() -> None:
    for kind in ("OPENED", "UNSUBSCRIBED", "COMPLAINED", "LATE_BOUNCE"):
        assert parse_tracking(event(kind, sender="app@example.com"), 7.0) == (
            [
                Tracked(
                    "8d2f8781-91fc-4473-9b0a-b12b51fafbe6", "14b734recsf69n8zkao5", "someone@example.org", kind, 7.0, ""
                )
            ],
            0,
        )
    [clicked], bad = parse_tracking(event("CLICKED", url="https://www.somelink.com"), 7.0)
    assert (clicked.kind, clicked.detail, bad) == ("CLICKED", "https://www.somelink.com", 0)


def test_lists_and_a_results_wrapper_are_taken_and_unusable_items_counted() -> None:
    no_event_id = {k: v for k, v in OPENED.items() if k != "eventId"}
    events, bad = parse_tracking([OPENED, no_event_id, "x", event("opened"), event("OPENED; DROP")], 1.0)
    assert [e.kind for e in events] == ["OPENED", "OPENED"] and bad == 3
    assert parse_tracking({"results": [event("CLICKED", url="u")]}, 1.0)[0][0].detail == "u"
    assert parse_tracking("OPENED", 1.0) == ([], 1)
    assert parse_tracking({"recipient": "a@example.org"}, 1.0) == ([], 1)
    assert parse_tracking(event("OPENED", messageId=17), 1.0) == ([], 1)


def prepared(original: bytes, prefix: bytes = b"") -> Prepared:
    return Prepared("q1", "app@example.com", ("a@example.org",), "<m@x>", prefix, original)


def test_the_tracking_url_is_added_unless_the_app_or_a_rule_set_one() -> None:
    plain = prepared(b"From: a@example.com\r\n\r\nX-IB-Tracking-Url: only in the body\r\n")
    claimed, owned = claim_reports(plain, "relay-1-2026112213", "https://r/ib/tok", "https://r/ib/tok/tracking")
    assert owned and claimed.prefix == (
        b"X-IB-Bulk-Id: relay-1-2026112213\r\nX-IB-Notify-Url: https://r/ib/tok\r\n"
        b"X-IB-Tracking-Url: https://r/ib/tok/tracking\r\n"
    )
    by_rule = prepared(b"From: a@example.com\r\n\r\n", b"X-IB-Tracking-Url: https://crm/track\r\n")
    claimed, owned = claim_reports(by_rule, "relay-1-2026112213", "https://r/ib/tok", "https://r/ib/tok/tracking")
    assert owned and claimed.prefix.count(b"X-IB-Tracking-Url") == 1 and b"X-IB-Bulk-Id" in claimed.prefix
    # The app's own bulk id: its reports are the app's, but nobody asked for its tracking events: ours.
    apps = prepared(b"From: a@example.com\r\nX-IB-Bulk-Id: app-7\r\n\r\n")
    claimed, owned = claim_reports(apps, "relay-1-2026112213", "https://r/ib/tok", "https://r/ib/tok/tracking")
    assert not owned and claimed.prefix == b"X-IB-Tracking-Url: https://r/ib/tok/tracking\r\n"
    both = prepared(b"From: a@example.com\r\nX-IB-Bulk-Id: app-7\r\nx-ib-tracking-url: https://app/t\r\n\r\n")
    assert claim_reports(both, "relay-1-2026112213", None, "https://r/ib/tok/tracking") == (both, False)


# over real sockets


def pushing(standin: InfobipStandIn, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    port = free_port()
    sections = reports_on(standin, tmp_path, notify_url=f"http://127.0.0.1:{port}/infobip", **extra)
    sections["reports"]["notify_listen"] = f"127.0.0.1:{port}"
    return sections


def header(data: bytes, name: bytes) -> list[str]:
    return [
        line.split(b": ", 1)[1].decode() for line in data.split(b"\r\n\r\n")[0].split(b"\r\n") if line.startswith(name)
    ]


async def test_opened_and_clicked_pushed_by_the_standin_show_in_trace(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await standin.reports.start()
    relay = await start_relay(**pushing(standin, tmp_path))
    infobip_id = (await send_one(relay.port, SENDER, ["a@example.org"], message())).rsplit(" ", 1)[1]
    [sent] = await standin.wait_for_messages(1)
    [notify] = header(sent.data, b"X-IB-Notify-Url: ")
    assert header(sent.data, b"X-IB-Tracking-Url: ") == [f"{notify}/tracking"]  # same listener, same token
    await until_status(relay, infobip_id, {"a@example.org": "delivered"})
    with structlog.testing.capture_logs() as logs:
        assert await standin.reports.track(infobip_id, "a@example.org", "OPENED", event_id="e-1") == 200
        assert await standin.reports.track(infobip_id, "a@example.org", "OPENED", event_id="e-1") == 200  # again
        assert await standin.reports.track(infobip_id, "a@example.org", "CLICKED", url="https://example.com/inv") == 200
    [found] = await messages(relay, infobip_id)
    tracked = [(e["recipient"], e["detail"]) for e in found["events"] if e["kind"] == "tracking"]
    assert len(tracked) == 2, found["events"]  # the same event pushed twice is one
    assert "OPENED" in tracked[0][1] and "CLICKED" in tracked[1][1] and "https://example.com/inv" in tracked[1][1]
    assert found["recipients"][0]["status"] == "delivered"  # an event is not a status
    lines = [e for e in logs if e["event"] in ("message_tracking", "tracking_ignored")]
    assert [(e["event"], e.get("queue_id"), e["infobip_id"], e["kind"]) for e in lines] == [
        ("message_tracking", found["queue_id"], infobip_id, "OPENED"),
        ("tracking_ignored", None, infobip_id, "OPENED"),  # the repeat
        ("message_tracking", found["queue_id"], infobip_id, "CLICKED"),
    ]
    registry = relay.metrics.registry
    assert registry.get_sample_value("relay_tracking_events_total", {"kind": "opened"}) == 1
    assert registry.get_sample_value("relay_tracking_events_total", {"kind": "clicked"}) == 1
    config = tmp_path / "relay.toml"
    config.write_text(f'[spool]\npath = "{tmp_path}"\n')
    capsys.readouterr()
    assert main(["trace", "--config", str(config), "--json", infobip_id]) == 0
    [line] = [line for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [e["kind"] for e in json.loads(line)["events"]].count("tracking") == 2
    assert main(["trace", "--config", str(config), infobip_id]) == 0
    words = capsys.readouterr().out
    assert "tracking a@example.org:" in words and "CLICKED" in words


async def test_a_late_bounce_is_recorded_and_sends_no_bounce(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    await standin.reports.start()
    bounces = {"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": free_port()}  # nothing listens: never used
    relay = await start_relay(**pushing(standin, tmp_path), bounces=bounces)
    infobip_id = (await send_one(relay.port, SENDER, ["a@example.org"], message())).rsplit(" ", 1)[1]
    await until_status(relay, infobip_id, {"a@example.org": "delivered"})
    assert await standin.reports.track(infobip_id, "a@example.org", "LATE_BOUNCE") == 200
    [found] = await messages(relay, infobip_id)
    assert [e["kind"] for e in found["events"]].count("tracking") == 1
    assert "bounce" not in [e["kind"] for e in found["events"]]
    assert found["recipients"][0]["status"] == "delivered"


async def test_the_tracking_path_takes_only_a_post_with_the_token_and_never_logs_the_body(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    await standin.reports.start()
    relay = await start_relay(**pushing(standin, tmp_path, poll_interval=3600))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    [sent] = await standin.wait_for_messages(1)
    [url] = header(sent.data, b"X-IB-Tracking-Url: ")
    token = url.rsplit("/", 2)[1]
    base = url.rsplit("/", 2)[0]
    secret = event("OPENED", recipient="secret-recipient@example.org")
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            for method, target in [
                ("POST", f"{base}/wrong-token/tracking"),
                ("GET", url),
                ("POST", f"{base}/tracking"),
            ]:
                async with session.request(method, target, json=secret) as response:
                    assert response.status == 404
            async with session.post(url, data=b"not json") as response:
                assert response.status == 400
            async with session.post(url, json={"notificationType": "OPENED", "recipient": "x@example.org"}) as response:
                assert response.status == 400
            async with session.post(url, json=OPENED) as response:  # well formed, but no message of ours
                assert response.status == 200
    refused = [e for e in logs if e["event"] == "push_refused"]
    assert [e["method"] for e in refused] == ["POST", "GET", "POST"]
    assert next(e["reason"] for e in logs if e["event"] == "push_unreadable") == "not JSON"
    assert "secret-recipient" not in repr(logs) and token not in repr(logs)
    [ignored] = [e for e in logs if e["event"] == "tracking_ignored"]
    assert ignored["infobip_id"] == OPENED["messageId"] and not [e for e in logs if e["event"] == "message_tracking"]
    assert relay.metrics.registry.get_sample_value("relay_tracking_events_total", {"kind": "opened"}) == 0


async def test_a_tracking_url_set_by_a_rule_is_kept_and_pull_only_adds_none(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    await standin.reports.start()
    rule = {"sender_domain": "erp.example.com", "headers": {"X-IB-Tracking-Url": "https://crm.example.com/track"}}
    relay = await start_relay(**pushing(standin, tmp_path), policy={"rules": [rule]})
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await send_one(relay.port, "ops@ops.example.com", ["b@example.org"], message(sender="ops@ops.example.com"))
    ruled, ours = await standin.wait_for_messages(2)
    assert header(ruled.data, b"X-IB-Tracking-Url: ") == ["https://crm.example.com/track"]  # the CRM gets its events
    assert header(ruled.data, b"X-IB-Bulk-Id: ")  # its reports are still ours
    assert header(ours.data, b"X-IB-Tracking-Url: ")[0].endswith("/tracking")
    pulling = await start_relay(**reports_on(standin, tmp_path / "pull"))  # no notify_url: no listener
    await send_one(pulling.port, SENDER, ["c@example.org"], message())
    assert not header((await standin.wait_for_messages(3))[2].data, b"X-IB-Tracking-Url")


async def test_the_tracking_log_line_hashes_the_recipient_under_privacy_redact(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    await standin.reports.start()
    key = tmp_path / "redact.key"
    key.write_text(new_key() + "\n")
    relay = await start_relay(**pushing(standin, tmp_path), privacy={"redact": True, "redact_key_file": str(key)})
    infobip_id = (await send_one(relay.port, SENDER, ["patient@example.org"], message())).rsplit(" ", 1)[1]
    hasher = privacy.hasher()
    assert hasher is not None
    await until_status(relay, infobip_id, {hasher.address("patient@example.org"): "delivered"})  # GET /messages too
    with structlog.testing.capture_logs() as logs:
        assert await standin.reports.track(infobip_id, "patient@example.org", "OPENED") == 200
    [line] = [e for e in logs if e["event"] == "message_tracking"]
    written = redact(None, "info", dict(line))  # the processor every line passes before it is written
    assert "patient" not in repr(written) and written["recipient"] == hasher.address("patient@example.org")
    assert written["infobip_id"] == infobip_id and written["kind"] == "OPENED"
