"""The spool at its edges: a failed write, requeue, a newer state file, a failing janitor, a stray directory."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import structlog.testing

from relay.core.message import Envelope, Prepared
from relay.store.spool import EntryState, Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, message
from tests.helpers import queue_files, send_one, small_tmpfs, spooled, until

SENDER = "billing@erp.example.com"


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


def test_start_up_recovery_ignores_a_directory_in_tmp(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.create()
    (spool.tmp / "someone-elses").mkdir()
    (spool.tmp / "half.msg").write_bytes(b"{")
    spool.recover()
    assert sorted(p.name for p in spool.tmp.iterdir()) == ["someone-elses"]
