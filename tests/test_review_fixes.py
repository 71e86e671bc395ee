"""Failure paths found in review: each test fails on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import structlog.testing

from relay.config import UpstreamSettings
from relay.core.message import Envelope
from relay.core.prepare import Prepared
from relay.store.spool import EntryState, Spool
from relay.testing.standin import InfobipStandIn
from relay.upstream.connection import UpstreamConnection
from relay.upstream.errors import UpstreamError
from relay.upstream.tls import make_tls_context
from tests.conftest import Dialog, StartRelay, message
from tests.helpers import queue_files, send_one, small_tmpfs, spooled, until

SENDER = "billing@erp.example.com"


async def test_a_client_hanging_up_in_pass_through_never_gets_another_message_a_false_250(
    standin: InfobipStandIn, start_relay: StartRelay
) -> None:
    relay = await start_relay(upstream={"pool_size": 1})
    assert (await send_one(relay.port, SENDER, ["warm@example.org"], message())).startswith("250 2.6.0 ")
    standin.behaviour.data_delay = 0.5
    quitter = await Dialog.open(relay.port)
    await quitter.hello()
    for line in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<first@example.org>", "DATA"):
        await quitter.send(line)
    quitter.writer.write(message(Message_ID="<first@x>") + b".\r\n")
    await until(lambda: sum(c.commands.count("DATA") for c in standin.connections) == 2)  # waiting on "first"
    await quitter.close()
    standin.behaviour.data_delay = 0.0
    reply = await send_one(relay.port, SENDER, ["second@example.org"], message(Message_ID="<second@x>"))
    await until(lambda: any(m.rcpt_tos == ["second@example.org"] for m in standin.messages))
    [second] = [m for m in standin.messages if m.rcpt_tos == ["second@example.org"]]
    assert reply == f"250 2.6.0 Message queued as {second.infobip_id}"


async def test_a_failed_spool_write_is_not_sent_later_behind_the_clients_back(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    with small_tmpfs(tmp_path / "small") as spool_path:
        standin.behaviour.data_delay = 1.0  # keeps the only worker busy with the first message
        relay = await start_relay(spool=spooled(spool_path, sync_wait=0.3), upstream={"pool_size": 1})
        first = asyncio.ensure_future(send_one(relay.port, SENDER, ["first@example.org"], message()))
        await until(lambda: any("DATA" in c.commands for c in standin.connections))
        big = message(body=(b"y" * 998 + b"\r\n") * 200)  # does not fit in 64 KB
        reply = await send_one(relay.port, SENDER, ["second@example.org"], big)
        assert reply.startswith("452 4.3.1 ")
        await first
        standin.behaviour.data_delay = 0.0
        # A wrongly kept job would go out before a later message (the only worker takes them in order).
        assert (await send_one(relay.port, SENDER, ["third@example.org"], message())).startswith("250 ")
        await until(lambda: any(m.rcpt_tos == ["third@example.org"] for m in standin.messages))
        assert [m.rcpt_tos for m in standin.messages] == [["first@example.org"], ["third@example.org"]]


def test_requeue_keeps_the_recipients_still_pending(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.create()
    data = message()
    recipients = ("a@example.org", "b@example.org")
    prepared = Prepared("0000000000000000001", SENDER, recipients, "<m@x>", b"", data)
    spool.commit(prepared, Envelope(prepared.queue_id, SENDER, recipients, "<m@x>", "127.0.0.1", 0.0, len(data)))
    spool.write_state(prepared.queue_id, EntryState(attempts=1, recipients=["a@example.org"], last_reply="451"))
    spool.dead_letter(prepared.queue_id, {"b@example.org": "550 5.7.1 no"}, "550 5.7.1 no")
    spool.requeue(prepared.queue_id)
    assert spool.read_state(prepared.queue_id).recipients == ["a@example.org", "b@example.org"]
    assert spool.dead_ids() == []


def test_a_state_file_from_a_newer_version_is_read(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.create()
    (spool.queue / "0000000000000000002.state").write_text(json.dumps({"attempts": 3, "priority": "high"}))
    assert spool.read_state("0000000000000000002").attempts == 3


async def test_the_janitor_survives_an_io_error(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay = await start_relay(spool=spooled(tmp_path))
    real = Spool.remove_many
    failures = [OSError(5, "Input/output error")]

    def flaky(self: Spool, queue_ids: list[str]) -> None:
        if failures:
            raise failures.pop()
        real(self, queue_ids)

    monkeypatch.setattr(Spool, "remove_many", flaky)
    standin.behaviour.data_replies.append("451 4.3.0 Try later")  # so it goes to queue/, then is retried
    with structlog.testing.capture_logs() as logs:
        assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.0.0 ")
        await until(lambda: not failures)
        await until(lambda: queue_files(tmp_path) == [], timeout=5)
    assert any(e["event"] == "spool_remove_failed" for e in logs)
    assert (await send_one(relay.port, SENDER, ["b@example.org"], message())).startswith("250 2.6.0 ")
    await until(lambda: queue_files(tmp_path) == [])


async def test_an_overlong_reply_line_is_a_failure_not_a_leak() -> None:
    async def babble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 " + b"x" * 100_000 + b"\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    server = await asyncio.start_server(babble, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    settings = UpstreamSettings(host="127.0.0.1", port=port, username="u", password="p", command_timeout=2)
    before = len(os.listdir("/proc/self/fd"))
    try:
        for _ in range(5):
            with pytest.raises(UpstreamError, match="reply line too long"):
                await UpstreamConnection.open(settings, make_tls_context(settings), "relay.test", 1)
        await until(lambda: len(os.listdir("/proc/self/fd")) <= before + 1, timeout=2.0)
    finally:
        server.close()
        await server.wait_closed()


def test_check_config_warns_about_empty_credentials(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[listen]\nport = 2525\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0
    assert "upstream.username/password are empty here" in result.stderr


def test_start_up_recovery_ignores_a_directory_in_tmp(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.create()
    (spool.tmp / "someone-elses").mkdir()
    (spool.tmp / "half.msg").write_bytes(b"{")
    spool.recover()
    assert sorted(p.name for p in spool.tmp.iterdir()) == ["someone-elses"]
