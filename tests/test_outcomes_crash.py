"""kill -9 between taking a report from Infobip and sending its bounce: a real `relay serve` process,
the stand-in's HTTPS reports endpoint and a real SMTP server for the bounce."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path

import pytest

from relay.cli import main as relay_main
from relay.testing.sink import MailSink
from relay.testing.standin import InfobipStandIn
from tests.conftest import free_port, message
from tests.helpers import SENDER, send_one, write_config

pytestmark = pytest.mark.slow  # a real relay process killed with kill -9: seconds each; .ci/run runs them

ROOT = Path(__file__).resolve().parent.parent


async def serve(config: Path, port: int, log: Path, crash_at: str | None = None) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env |= {"PYTHONUNBUFFERED": "1", **({"RELAY_CRASH_AT": crash_at} if crash_at else {})}
    with open(log, "ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--config", str(config), cwd=ROOT, env=env,
            stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
        )  # fmt: skip
    deadline = time.monotonic() + 15
    while True:  # listening: a TCP connect succeeds
        assert proc.returncode is None, log.read_text()
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            assert time.monotonic() < deadline, log.read_text()
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return proc


async def test_kill_9_between_the_report_and_the_bounce_loses_nothing_and_sends_nothing_twice(
    standin: InfobipStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await standin.reports.start()
    sink = MailSink()
    await sink.start()
    port = free_port()
    spool = tmp_path / "spool"
    config = write_config(
        tmp_path / "relay.toml",
        standin,
        port=port,
        spool={"enabled": True, "path": str(spool), "sync_wait": 2.0},
        reports={
            "enabled": True,
            "base_url": standin.reports.base_url,
            "api_key": standin.reports.api_key,
            "ca_file": str(standin.ca_file),
            "poll_interval": 0.1,
        },
        bounces={"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": sink.port},
        log={"format": "json"},
    )
    log = tmp_path / "relay.log"
    first = await serve(config, port, log, crash_at="after_report_stored")
    second: asyncio.subprocess.Process | None = None
    try:
        reply = await send_one(port, SENDER, ["a@example.org", "nobody@bounce.example"], message())
        assert reply.startswith("250 2.6.0")
        assert await asyncio.wait_for(first.wait(), 15) == -signal.SIGKILL  # killed right after storing it
        assert standin.reports.waiting == []  # Infobip handed the reports out: only our history has them now
        assert sink.messages == []
        second = await serve(config, port, log)
        [bounce] = await sink.wait_for(1)
        assert b"Final-Recipient: rfc822; nobody@bounce.example" in bounce.data
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 15) == 0
        events = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{")]
        assert [e["event"] for e in events].count("bounce_sent") == 1
        assert len(sink.messages) == 1
        assert relay_main(["trace", "--config", str(config), "--json", "nobody@bounce.example"]) == 0
        traced = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert [r["status"] for r in traced["recipients"]] == ["delivered", "bounced"]
        assert [e["detail"] for e in traced["events"] if e["kind"] == "bounce"] == [
            "failed report sent: to <billing@erp.example.com>: 2.0.0 Accepted"
        ]
    finally:
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await sink.stop()


async def test_kill_9_before_the_history_is_written_the_recovered_message_is_noted_again(
    standin: InfobipStandIn, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The app heard 250 (on disk, `sync_wait = 0`) while the first attempt hung on a silent upstream, and the
    relay died before the history's first write (held back by the test's lock on the file, so the order is
    exact whatever the disk's speed): started again, it delivers the message from the journal and the history
    knows it, as received and as delivered, with its own bulk id's report."""
    silent = await asyncio.start_server(lambda reader, writer: None, "127.0.0.1", 0)  # accepts, never greets
    await standin.reports.start()
    port = free_port()
    sections = {
        "spool": {"enabled": True, "path": str(tmp_path / "spool"), "sync_wait": 0},
        "reports": {
            "enabled": True,
            "base_url": standin.reports.base_url,
            "api_key": standin.reports.api_key,
            "ca_file": str(standin.ca_file),
            "poll_interval": 0.1,
        },
        "log": {"format": "json"},
    }
    first_config = write_config(  # the first relay's upstream: the silent server
        tmp_path / "first.toml", standin, port=port, upstream={"port": silent.sockets[0].getsockname()[1]}, **sections
    )
    config = write_config(tmp_path / "relay.toml", standin, port=port, **sections)
    log = tmp_path / "relay.log"
    first = await serve(first_config, port, log)
    second: asyncio.subprocess.Process | None = None
    lock = sqlite3.connect(tmp_path / "spool" / "history.sqlite3", isolation_level=None, timeout=10)
    try:
        lock.execute("BEGIN EXCLUSIVE")  # the relay's history writes wait (busy_timeout) for the test's lock
        data = message(Message_ID="<crash-1@erp.example.com>")
        assert (await send_one(port, SENDER, ["a@example.org"], data)).startswith("250 2.0.0")
        first.kill()
        assert await asyncio.wait_for(first.wait(), 15) == -signal.SIGKILL  # before any note was written
        lock.execute("ROLLBACK")
        second = await serve(config, port, log)
        [sent] = await standin.wait_for_messages(1)
        assert b"X-IB-Bulk-Id: relay-" in sent.data
        async with asyncio.timeout(10):  # the report, polled every 0.1 s, applied to the recipient
            while '"message_outcome"' not in log.read_text():
                await asyncio.sleep(0.05)
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 15) == 0
        assert relay_main(["trace", "--config", str(config), "--json", "<crash-1@erp.example.com>"]) == 0
        traced = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert [(r["address"], r["status"]) for r in traced["recipients"]] == [("a@example.org", "delivered")]
        assert traced["sender"] == SENDER and traced["recipients"][0]["infobip_id"] == sent.infobip_id
    finally:
        lock.close()
        silent.close()
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


async def test_kill_9_once_a_message_is_dead_lettered_its_bounce_is_sent_once(
    standin: InfobipStandIn, tmp_path: Path
) -> None:
    """Deferred at first (the app heard 250), refused at the retry: the relay dies once the message is in
    dead/ and gone from queue/ (nothing reads dead/ at a start). The bounce's note was on disk before the
    move, so the next relay sends it, once (it used to be noted after, and lost)."""
    standin.behaviour.refuse_recipients["nosuch@example.org"] = "450 4.2.0 try later"
    sink = MailSink()
    await sink.start()
    port = free_port()
    config = write_config(
        tmp_path / "relay.toml", standin, port=port,
        spool={"enabled": True, "path": str(tmp_path / "spool"), "retry_initial": 0.5},
        bounces={"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": sink.port, "timeout": 5},
        log={"format": "json"},
    )  # fmt: skip
    log = tmp_path / "relay.log"
    first = await serve(config, port, log, crash_at="after_spool_removed")
    second: asyncio.subprocess.Process | None = None
    try:
        reply = await send_one(port, SENDER, ["a@example.org", "nosuch@example.org"], message())
        assert reply.startswith("250 2.0.0")
        standin.behaviour.refuse_recipients["nosuch@example.org"] = "550 5.1.1 Recipient unknown"
        assert await asyncio.wait_for(first.wait(), 15) == -signal.SIGKILL
        assert list((tmp_path / "spool" / "dead").glob("*.msg")) and not list((tmp_path / "spool" / "queue").iterdir())
        second = await serve(config, port, log)
        [bounce] = await sink.wait_for(1, timeout=10)
        assert bounce.mail_from == "" and b"Final-Recipient: rfc822; nosuch@example.org" in bounce.data
        second.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(second.wait(), 15) == 0
        assert len(sink.messages) == 1
    finally:
        await sink.stop()
        for proc in (first, second):
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
