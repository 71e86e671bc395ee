"""`relay queue` as ops and scripts use it (issue 13): --json and filters, flushing one id, deleting every
dead letter, requeue of a message that is not dead, TRIES of dead letters, and the audit log.

The spool is laid out through Spool's own API (commit, write_state, dead_letter), as the relay leaves it;
the verbs run through the real command line (`relay.cli.main`, or a subprocess beside a running relay).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from relay.cli import main as relay_main
from relay.core.message import Envelope, Prepared
from relay.store.spool import EntryState, Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import free_port, message
from tests.test_processes import (
    _QUEUED_AS,
    SpawnRelay,
    arrived_ids,
    new_message_id,
    queue_cli,
    send_one,
    spawn,  # noqa: F401  # the fixture
    wait_until,
    write_config,
)

NOW = time.time()


def add(
    spool: Spool, queue_id: str, sender: str, *, age: float, recipients: tuple[str, ...] = ("a@example.org",)
) -> None:
    data = message(sender=sender, Message_ID=f"<{queue_id}@example.com>")
    prepared = Prepared(queue_id, sender, recipients, f"<{queue_id}@example.com>", b"", data)
    envelope = Envelope(queue_id, sender, recipients, prepared.message_id, "10.1.2.3", NOW - age, len(data))
    spool.commit(prepared, envelope)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    """Three waiting (two from erp.example.com, one an hour old), one dead, one partly dead."""
    global NOW
    NOW = time.time()  # now, not at collection: the suite may run for minutes before this test
    spool = Spool(tmp_path / "spool")
    spool.create()
    add(spool, "1a0000000000000000001", "billing@erp.example.com", age=7200)
    spool.write_state("1a0000000000000000001", EntryState(2, NOW + 300, ["a@example.org"], "451 4.3.0 later"))
    add(spool, "1a0000000000000000002", "hr@erp.example.com", age=60)
    add(spool, "1a0000000000000000003", "crm@example.net", age=30)
    add(spool, "1a0000000000000000004", "billing@erp.example.com", age=600)  # dead on its first retry
    spool.dead_letter("1a0000000000000000004", {"a@example.org": "550 5.1.1 no such user"}, "550 5.1.1 no such user")
    spool.remove("1a0000000000000000004")
    add(spool, "1a0000000000000000005", "crm@example.net", age=900, recipients=("a@example.org", "b@example.org"))
    spool.write_state("1a0000000000000000005", EntryState(3, NOW + 600, ["a@example.org"], "451 4.3.0 later"))
    spool.dead_letter("1a0000000000000000005", {"b@example.org": "550 5.1.1 gone"}, "550 5.1.1 gone")
    return spool


def queue(spool: Spool, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    config = spool.path.parent / "relay.toml"
    config.write_text(f'[spool]\npath = "{spool.path}"\n')
    capsys.readouterr()
    code = relay_main(["queue", "--config", str(config), *args])
    out, err = capsys.readouterr()
    return code, out, err


def audit_lines(spool: Spool) -> list[dict[str, object]]:
    return [json.loads(line) for line in (spool.path / "audit.log").read_text().splitlines()]


def test_list_json_is_one_array_with_the_documented_fields(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = queue(spool, capsys, "list", "--json")
    assert code == 0
    entries = json.loads(out)
    assert [e["queue_id"] for e in entries] == [f"1a000000000000000000{n}" for n in (1, 2, 3, 5)]
    first = entries[0]
    assert first["sender"] == "billing@erp.example.com" and first["recipients"] == ["a@example.org"]
    assert first["attempts"] == 2 and first["dead"] is False and first["last_reply"] == "451 4.3.0 later"
    assert first["next_attempt"].endswith("+00:00") and 7190 < first["age_seconds"] < 7300
    assert entries[1]["attempts"] == 0 and entries[1]["last_reply"] is None  # not tried yet
    code, out, _ = queue(spool, capsys, "list", "--dead", "--json")
    dead = {e["queue_id"]: e for e in json.loads(out)}
    assert set(dead) == {"1a0000000000000000004", "1a0000000000000000005"}
    assert dead["1a0000000000000000004"]["dead"] is True and dead["1a0000000000000000004"]["next_attempt"] is None
    assert dead["1a0000000000000000005"]["reasons"] == {"b@example.org": "550 5.1.1 gone"}


def test_dead_letters_show_how_often_they_were_tried(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = queue(spool, capsys, "list", "--dead")
    assert code == 0
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:] if not line.startswith("--")}
    assert rows["1a0000000000000000004"][2] == "1"  # TRIES: once, though dead/ does not count
    assert rows["1a0000000000000000005"][2] == "3"  # its queue/ entry says 3


def test_list_filters_by_sender_address_domain_and_age(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    def ids(*args: str) -> list[str]:
        code, out, _ = queue(spool, capsys, "list", "--json", *args)
        assert code == 0
        return [e["queue_id"][-1] for e in json.loads(out)]

    assert ids("--sender", "BILLING@erp.example.com") == ["1"]
    assert ids("--sender", "@erp.example.com") == ["1", "2"]
    assert ids("--older-than", "10m") == ["1", "5"]
    assert ids("--older-than", "1h", "--sender", "@example.net") == []
    _, out, _ = queue(spool, capsys, "list", "--sender", "@example.net")
    assert "-- 4 message(s) in queue/ of" in out and "(2 shown)" in out


def test_older_than_must_be_an_age(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = queue(spool, capsys, "list", "--older-than", "yesterday")
    assert code == 2 and "--older-than: 'yesterday' is not an age" in err


def test_requeue_of_a_message_that_is_not_dead_is_refused(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    state = (spool.queue / "1a0000000000000000001.state").read_bytes()
    code, out, err = queue(spool, capsys, "requeue", "1a0000000000000000001", "1a00000000000000000ff")
    assert code == 1 and "requeued" not in out
    assert "1a0000000000000000001: not in dead/ (it is waiting in queue/" in err
    assert "1a00000000000000000ff: not found" in err
    assert (spool.queue / "1a0000000000000000001.state").read_bytes() == state  # its schedule kept
    assert not (spool.path / "flush.request").exists()
    assert audit_lines(spool)[-1]["ids"] == {
        "1a0000000000000000001": "not in dead/",
        "1a00000000000000000ff": "not found",
    }


def test_delete_all_dead_removes_dead_letters_only(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = queue(spool, capsys, "delete", "--all-dead")
    assert code == 0 and "-- 2 dead letter(s) deleted" in out
    assert spool.dead_ids() == []
    assert "1a0000000000000000005" in spool.queued_ids()  # its other recipient still waits
    record = audit_lines(spool)[-1]
    assert record["verb"] == "delete" and record["all_dead"] is True
    assert record["ids"] == {
        "1a0000000000000000004": "deleted from dead/",
        "1a0000000000000000005": "deleted from dead/",
    }
    code, _, err = queue(spool, capsys, "delete")
    assert code == 2 and "give queue ids, or --all-dead" in err


def test_flush_one_id_on_a_stopped_relay_makes_only_it_due(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    other = (spool.queue / "1a0000000000000000005.state").read_bytes()
    code, out, _ = queue(spool, capsys, "flush", "1a0000000000000000001")
    assert code == 0 and "1a0000000000000000001: due now" in out
    state = spool.read_state("1a0000000000000000001")
    assert state.next_attempt == 0.0 and state.attempts == 2 and state.recipients == ["a@example.org"]
    assert (spool.queue / "1a0000000000000000005.state").read_bytes() == other
    assert not (spool.path / "flush.request").exists()  # not a flush of everything
    code, _, err = queue(spool, capsys, "flush", "1a0000000000000000004")  # dead: nothing to flush
    assert code == 1 and "1a0000000000000000004: not in queue/" in err


def test_every_verb_that_changes_something_is_audited(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    queue(spool, capsys, "list")
    assert not (spool.path / "audit.log").exists()  # reading is not audited
    queue(spool, capsys, "delete", "1a0000000000000000002")
    queue(spool, capsys, "requeue", "1a0000000000000000004")
    queue(spool, capsys, "flush")
    records = audit_lines(spool)
    assert [r["verb"] for r in records] == ["delete", "requeue", "flush"]
    assert records[0]["ids"] == {"1a0000000000000000002": "deleted"}
    assert records[1]["ids"] == {"1a0000000000000000004": "requeued"}
    assert records[2]["messages"] == 4
    for record in records:
        assert record["event"] == "queue_command" and record["uid"] == os.geteuid() and record["user"]
        assert record["relay_running"] is False and str(record["timestamp"]).endswith("+00:00")
    assert oct((spool.path / "audit.log").stat().st_mode & 0o777) == "0o600"


def test_an_audit_log_that_cannot_be_written_is_reported(spool: Spool, capsys: pytest.CaptureFixture[str]) -> None:
    (spool.path / "audit.log").mkdir()
    code, out, err = queue(spool, capsys, "delete", "1a0000000000000000002")
    assert code == 0 and "1a0000000000000000002: deleted" in out  # done, and said so
    assert f"relay: audit log {spool.path / 'audit.log'} not written: Is a directory" in err


@pytest.mark.slow  # relay processes
async def test_flush_one_id_on_a_running_relay_sends_only_it_now_and_is_audited(
    standin: InfobipStandIn,
    spawn: SpawnRelay,  # noqa: F811  # the fixture imported above
    tmp_path: Path,
) -> None:
    port = free_port()
    spool = tmp_path / "spool"
    config = write_config(
        tmp_path / "relay.toml", standin, port=port, spool=spool, sync_wait=0, retry_initial=60, retry_max=120
    )
    standin.behaviour.data_replies.extend(["451 4.3.0 Try later"] * 2)
    relay = await spawn(config, port).start()
    ids = []
    for tag in ("flush-one", "left-alone"):
        message_id = new_message_id(tag)
        match = _QUEUED_AS.search(await send_one(port, message(Message_ID=message_id)))
        assert match is not None
        ids.append((match.group(1), message_id))
        state = spool / "queue" / f"{match.group(1)}.state"
        await wait_until(state.exists, 10, "the first (failed) attempt", relay.log)
    (queue_id, message_id), (_, other_id) = ids

    code, out, err = await queue_cli(config, "flush", queue_id)
    assert code == 0, err
    assert f"{queue_id}: flush requested" in out
    await wait_until(lambda: arrived_ids(standin) == [message_id], 5, "the flushed message upstream", relay.log)
    assert other_id not in arrived_ids(standin)  # its retry is 45 s or more away: only the one named went
    assert await relay.stop() == 0
    record = json.loads((spool / "audit.log").read_text().splitlines()[-1])
    assert record["verb"] == "flush" and record["relay_running"] is True
    assert record["ids"] == {queue_id: "flush requested"}
