"""Reports pushed by the stand-in to the relay's own notify listener, beside the pulled ones."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog.testing

from relay.app import Relay
from relay.outcomes import push
from relay.testing.clock import FakeClock
from relay.testing.sink import MailSink
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, free_port, message
from tests.helpers import SENDER, send_one, until
from tests.outcomes import history_failing, notify_url, reports_on, statuses, until_status


@pytest.fixture
async def sink() -> AsyncIterator[MailSink]:
    server = MailSink()
    await server.start()
    yield server
    await server.stop()


def pushing(standin: InfobipStandIn, tmp_path: Path, port: int, **extra: Any) -> dict[str, Any]:
    sections = reports_on(standin, tmp_path, notify_url=f"http://127.0.0.1:{port}/infobip", **extra)
    sections["reports"]["notify_listen"] = f"127.0.0.1:{port}"
    return sections


def reports_total(relay: Relay, result: str) -> float:
    return relay.metrics.registry.get_sample_value("relay_reports_total", {"result": result}) or 0.0


async def test_a_push_the_history_cannot_store_gets_503_and_is_taken_when_sent_again(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    await standin.reports.start()
    port = free_port()
    relay = await start_relay(clock=FakeClock(), **pushing(standin, tmp_path, port, poll_interval=30))
    infobip_id = (await send_one(relay.port, SENDER, ["a@example.org"], message())).rsplit(" ", 1)[1]
    [sent] = await standin.wait_for_messages(1)
    await until_status(relay, infobip_id, {"a@example.org": "sent"})
    [waiting] = standin.reports.waiting
    body = {"results": [waiting.report]}
    async with aiohttp.ClientSession() as session:
        with history_failing(relay), structlog.testing.capture_logs() as logs:
            async with session.post(notify_url(sent.data), json=body) as response:
                assert response.status == 503  # not stored: Infobip must send it again
        [failed] = [e for e in logs if e["event"] == "push_not_stored"]
        assert failed["kind"] == "reports" and "disk I/O error" in failed["error"]
        assert await statuses(relay, infobip_id) == {"a@example.org": "sent"}
        async with session.post(notify_url(sent.data), json=body) as response:
            assert response.status == 200
    await until_status(relay, infobip_id, {"a@example.org": "delivered"})
    assert reports_total(relay, "delivered") == 1


async def test_a_report_pushed_and_pulled_counts_once(
    standin: InfobipStandIn, start_relay: StartRelay, sink: MailSink, tmp_path: Path
) -> None:
    await standin.reports.start()
    clock = FakeClock()
    port = free_port()
    bounces = {"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": sink.port}
    relay = await start_relay(clock=clock, **pushing(standin, tmp_path, port, poll_interval=30), bounces=bounces)
    reply = await send_one(relay.port, SENDER, ["a@example.org", "x@bounce.example"], message())
    infobip_id = reply.rsplit(" ", 1)[1]
    [sent] = await standin.wait_for_messages(1)
    url = notify_url(sent.data)
    assert url.startswith(f"http://127.0.0.1:{port}/infobip/") and len(url.rsplit("/", 1)[1]) >= 32
    assert await standin.reports.push(keep=True, to="x@bounce.example") == 1  # pushed, and still there to pull
    await until_status(relay, infobip_id, {"a@example.org": "sent", "x@bounce.example": "bounced"})
    await sink.wait_for(1)
    clock.advance(30)  # the poll takes both waiting reports: a@ is new, x@ was pushed already
    await until_status(relay, infobip_id, {"a@example.org": "delivered", "x@bounce.example": "bounced"})
    await until(lambda: reports_total(relay, "duplicate") == 1)
    assert (reports_total(relay, "bounced"), reports_total(relay, "delivered")) == (1, 1)
    assert len(sink.messages) == 1  # one bounce, however often Infobip told us
    assert standin.reports.waiting == []


async def test_only_a_post_with_the_token_is_taken(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    await standin.reports.start()
    port = free_port()
    relay = await start_relay(**pushing(standin, tmp_path, port, poll_interval=3600))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    [sent] = await standin.wait_for_messages(1)
    url = notify_url(sent.data)
    secret_body = {"results": [{"messageId": "x", "to": "secret-recipient@example.org"}]}
    with structlog.testing.capture_logs() as logs:
        async with aiohttp.ClientSession() as session:
            for method, target in [
                ("POST", f"http://127.0.0.1:{port}/infobip/wrong-token"),
                ("GET", url),
                ("POST", f"http://127.0.0.1:{port}/"),
            ]:
                async with session.request(method, target, json=secret_body) as response:
                    assert response.status == 404
            async with session.post(url, data=b"not json") as response:
                assert response.status == 400
            async with session.post(url, json={"results": []}) as response:
                assert response.status == 200
    refused = [e for e in logs if e["event"] == "push_refused"]
    assert [e["method"] for e in refused] == ["POST", "GET", "POST"]
    assert "secret-recipient" not in repr(logs)  # never the body
    assert url.rsplit("/", 1)[1] not in repr(refused)  # nor the token a caller got right


async def test_a_push_with_a_byte_that_is_not_utf8_is_taken_and_one_nested_too_deep_is_refused(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """Latin-1 words in a pushed report: taken (a 400 is never sent again); JSON nested past the parser's
    depth is not Infobip's JSON: 400, not a 500 from the parser's RecursionError."""
    await standin.reports.start()
    port = free_port()
    relay = await start_relay(**pushing(standin, tmp_path, port, poll_interval=3600))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    [sent] = await standin.wait_for_messages(1)
    report = standin.reports.waiting[0].report
    report["status"] = {**report["status"], "description": "d\u00e9livr\u00e9"}
    body = json.dumps({"results": [report]}, ensure_ascii=False).encode("latin-1")
    async with aiohttp.ClientSession() as session:
        async with session.post(notify_url(sent.data), data=b"[" * 100_000) as response:
            assert response.status == 400
        async with session.post(notify_url(sent.data), data=body) as response:
            assert response.status == 200 and await response.json() == {"accepted": 1}
    await until_status(relay, "a@example.org", {"a@example.org": "delivered"})


async def test_a_notify_url_set_by_a_policy_rule_is_kept_and_its_reports_are_not_ours(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    await standin.reports.start()
    port = free_port()
    rule = {"headers": {"X-IB-Notify-Url": "https://crm.example.com/ib"}}
    relay = await start_relay(**pushing(standin, tmp_path, port), policy={"rules": [rule]})
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    [sent] = await standin.wait_for_messages(1)
    assert notify_url(sent.data) == "https://crm.example.com/ib"
    assert b"X-IB-Bulk-Id" not in sent.data
    assert relay.outcomes is not None
    [traced] = await relay.outcomes.lookup("a@example.org")
    assert traced.bulk_id is None


async def test_silent_slow_and_surplus_connections_to_the_push_listener_are_closed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It faces the internet: a client that connects and says nothing, one that never finishes its headers,
    and those past MAX_CONNECTIONS are closed (they used to stay open for ever); a stop does not wait the
    60 s aiohttp would for a push whose body never comes."""
    monkeypatch.setattr(push, "CONNECTION_DEADLINE", 0.3)
    monkeypatch.setattr(push, "REAP_EVERY", 0.05)
    monkeypatch.setattr(push, "MAX_CONNECTIONS", 3)
    monkeypatch.setattr(push, "STOP_WAIT", 0.2)

    async def nothing(*_: Any) -> None:
        return None

    listener = push.PushListener(f"127.0.0.1:{free_port()}", "tok" * 8, nothing, nothing, lambda: 0.0)
    await listener.start()
    try:
        opened = [await asyncio.open_connection("127.0.0.1", listener.port) for _ in range(4)]
        half = opened[1]  # the first: silent
        half[1].write(b"POST /ib/" + b"tok" * 8 + b" HTTP/1.1\r\nHost: x\r\n")  # the headers never end
        async with asyncio.timeout(5):
            for reader, _ in opened:  # each one closed by the listener: end of file
                assert await reader.read() == b""
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"POST /ib/" + b"tok" * 8 + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{")
        await writer.drain()
        monkeypatch.setattr(push, "CONNECTION_DEADLINE", 3600.0)  # only the stop may end this one now
    finally:
        async with asyncio.timeout(push.STOP_WAIT + 2):
            await listener.stop()
    for _, w in [*opened, (reader, writer)]:
        w.close()
