"""Encryption at rest (issue 15): what the spool writes carries no message data in the clear, reads back
byte for byte, refuses to open anywhere but as itself, and a missing key stops start-up before the spool
is touched. Real files, real relays, the Infobip stand-in; nothing is mocked."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import secrets
import signal
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import structlog

from relay.cli import main as relay_main
from relay.config import ConfigError, load_settings
from relay.core.keys import key_id, parse_key
from relay.core.message import Envelope, Prepared
from relay.core.redaction import AddressHasher
from relay.outcomes.history import MessageReceived
from relay.outcomes.sqlite import SqliteHistory
from relay.store.journal import Journal, read_records, segment_paths
from relay.store.rekey import key_census
from relay.store.sealing import BODY, ENVELOPE, STATE, Sealer, SealError, UnknownKeyError, new_key
from relay.store.spool import EntryState, Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, free_port, message
from tests.helpers import SENDER, journal_quiet, send_one, spooled, until, write_config
from tests.test_processes import relay_cli

ROOT = Path(__file__).resolve().parent.parent


def make_key(path: Path) -> Path:
    path.write_text(new_key() + "\n")
    return path


def key_of(path: Path) -> str:
    return key_id(parse_key(path.read_text()))


def sealed(spool: Path, key: Path, **extra: object) -> dict[str, object]:
    return spooled(spool, encryption_key_file=str(key), sync_wait=0.0, **extra)


def every_byte(root: Path) -> bytes:
    """Everything under `root`: file contents and names."""
    found = bytearray()
    for path in sorted(root.rglob("*")):
        found += str(path.relative_to(root)).encode() + b"\0"
        if path.is_file():
            found += path.read_bytes()
    return bytes(found)


def snapshot(root: Path) -> dict[str, tuple[int, int, int, str]]:
    """Every path under `root` with its mode, size, mtime and content hash: what "untouched" means."""
    state = {}
    for path in [root, *sorted(root.rglob("*"))]:
        info = path.lstat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        state[str(path.relative_to(root))] = (info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return state


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def messages_in(spool: Path) -> list[str]:
    return sorted(name[:-4] for name in os.listdir(spool / "queue") if name.endswith(".msg"))


@contextlib.asynccontextmanager
async def relay_process(config: Path, port: int, log: Path) -> AsyncIterator[asyncio.subprocess.Process]:
    """`relay serve` as its own process (stdout and stderr to `log`), listening when this yields;
    SIGTERM at the end (exit status 0 expected)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")} | {"PYTHONUNBUFFERED": "1"}
    with open(log, "ab") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "relay", "serve", "--config", str(config), cwd=ROOT, env=env, stdout=sink, stderr=sink
        )
        try:
            for _ in range(1500):
                if proc.returncode is not None:
                    pytest.fail(f"relay exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.01)
                    continue
                writer.close()
                break
            yield proc
            proc.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(proc.wait(), 15) == 0, log.read_text()[-4000:]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


# the key and the sealed record


def test_keygen_prints_only_a_key_one_line_of_base64_for_32_random_bytes(capsys: pytest.CaptureFixture[str]) -> None:
    assert relay_main(["keygen"]) == 0
    assert relay_main(["keygen"]) == 0
    out = capsys.readouterr().out
    first, second = out.splitlines()
    assert out == f"{first}\n{second}\n"
    assert len(base64.b64decode(first, validate=True)) == 32 and first != second


def test_a_sealed_record_opens_only_as_itself_and_any_flipped_bit_is_found() -> None:
    key = parse_key(new_key())
    sealer = Sealer([key])
    head, body = sealer.seal(BODY, "q1", b"Subject: results\r\n\r\nnegative\r\n")
    blob = head + body
    assert sealer.open(BODY, "q1", blob) == (b"Subject: results\r\n\r\nnegative\r\n", len(blob))
    assert b"negative" not in blob and key_id(key) == sealer.current_id
    for bit in range(len(blob) * 8):  # every single bit, header included
        flipped = bytearray(blob)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(SealError):
            sealer.open(BODY, "q1", bytes(flipped))
    with pytest.raises(SealError):
        sealer.open(BODY, "q2", blob)  # another message's record
    with pytest.raises(SealError):
        sealer.open(ENVELOPE, "q1", blob)  # another kind of record
    with pytest.raises(UnknownKeyError) as unknown:
        Sealer([parse_key(new_key())]).open(BODY, "q1", blob)
    assert unknown.value.key_id == key_id(key)


def test_every_record_gets_a_fresh_nonce() -> None:
    sealer = Sealer([parse_key(new_key())])
    blobs = {b"".join(sealer.seal(STATE, "q1", b"{}")) for _ in range(100)}
    assert len(blobs) == 100


def test_a_bad_key_file_is_a_config_error_naming_the_key(tmp_path: Path) -> None:
    short = tmp_path / "short.key"
    short.write_text(base64.b64encode(b"x" * 16).decode())
    garbage = tmp_path / "garbage.key"
    garbage.write_text("not a key!")
    good = make_key(tmp_path / "good.key")
    cases = {
        "spool.encryption_key_file": {"encryption_key_file": str(tmp_path / "absent.key")},
        "16 bytes, not 32": {"encryption_key_file": str(short)},
        "is not base64": {"encryption_key_file": str(garbage)},
        "spool.old_key_files": {"encryption_key_file": str(good), "old_key_files": [str(garbage)]},
        "old_key_files needs encryption_key_file": {"old_key_files": [str(good)]},
    }
    for expected, spool in cases.items():
        with pytest.raises(ConfigError) as error:
            load_settings(None, spool=spool)
        assert expected in str(error.value)
        assert good.read_text().strip() not in str(error.value)  # a key is never printed
    assert load_settings(None, spool={"encryption_key_file": str(good)}).spool.encryption_keys == [
        parse_key(good.read_text())
    ]


# the spool's files


def stored(n: int, marker: str = "") -> tuple[Prepared, Envelope]:
    queue_id = f"{n:021d}"
    data = message(to=f"p{marker}@example.org", body=f"lab result {marker}\r\n".encode(), Message_ID=f"<m{n}@x.org>")
    rcpts = (f"p{marker}@example.org",)
    return (
        Prepared(queue_id, SENDER, rcpts, f"<m{n}@x.org>", b"X-Added: 1\r\n", data),
        Envelope(queue_id, SENDER, rcpts, f"<m{n}@x.org>", "127.0.0.1", 1.0, len(data) + 12),
    )


def test_queue_state_and_dead_files_are_sealed_and_read_back_exactly(tmp_path: Path) -> None:
    marker = secrets.token_hex(6)
    spool = Spool(tmp_path / "spool", Sealer([parse_key(new_key())]))
    spool.lock()
    prepared, envelope = stored(1, marker)
    spool.commit(prepared, envelope)
    spool.write_state(envelope.queue_id, EntryState(attempts=2, recipients=[f"p{marker}@example.org"], last_reply="4"))
    spool.dead_letter(envelope.queue_id, {f"p{marker}@example.org": f"550 no {marker}"}, "550")
    assert marker.encode() not in every_byte(tmp_path / "spool")
    assert SENDER.encode() not in every_byte(tmp_path / "spool")
    assert spool.read(envelope.queue_id) == (envelope, prepared.as_bytes())
    assert spool.read_envelope(envelope.queue_id, dead=True) == envelope
    assert spool.read_state(envelope.queue_id).recipients == [f"p{marker}@example.org"]
    assert spool.read_state(envelope.queue_id, dead=True).dead == {f"p{marker}@example.org": f"550 no {marker}"}
    spool.unlock()


# the whole relay


@pytest.mark.slow  # relay processes: .ci/run runs them
async def test_phi_marker_is_nowhere_under_the_spool_during_an_outage_and_arrives_byte_identical(
    standin: InfobipStandIn, tmp_path: Path
) -> None:
    """Issue 15's "must show": body, subject and recipients carry a marker; every byte under the spool
    path (journal, queue/, .state, then dead/), the relay's log and `relay queue list` (privacy.redact on)
    are searched while Infobip is down; then Infobip comes back."""
    marker = "phi-" + secrets.token_hex(6)
    key = make_key(tmp_path / "spool.key")
    spool = tmp_path / "spool"
    port = free_port()
    config = write_config(
        tmp_path / "relay.toml",
        standin,
        port=port,
        spool={**sealed(spool, key), "retry_initial": 0.1, "retry_max": 0.2, "breaker_threshold": 1},
        log={"format": "json"},
        privacy={"redact": True},
    )
    hashed_sender = AddressHasher(load_settings(config).address_hash_key() or b"").address(SENDER)
    gone = f"gone.{marker}@example.org"
    standin.behaviour.refuse_recipients[gone] = f"550 5.1.1 <{gone}>: no such user"
    standin.go_down()
    sent = []
    async with relay_process(config, port, tmp_path / "relay.log"):
        for n in range(3):
            to = f"patient.{marker}.{n}@example.org"
            data = (
                f"Date: Mon, 30 Nov 2026 08:00:00 +0000\r\nFrom: Clinic <{SENDER}>\r\nTo: <{to}>\r\n"
                f"Subject: Appointment {marker}\r\n"
                f"Message-ID: <appt-{n}-{marker}@erp.example.com>\r\n\r\n"
                f"Dear patient {marker}, your results are ready.\r\n"
            ).encode()
            reply = await send_one(port, SENDER, [to, gone] if n == 0 else [to], data)
            assert reply.startswith("250 2.0.0 Queued as "), reply
            sent.append(data)
        await until(lambda: len(messages_in(spool)) == 3 and len(os.listdir(spool / "queue")) >= 4)  # and a .state
        on_disk = every_byte(spool)
        for needle in (marker, "Appointment", "your results", SENDER, "example.org"):
            assert needle.encode() not in on_disk, needle
        listings = [(await relay_cli("queue", "--config", str(config), "list", *flag))[1] for flag in ((), ("--json",))]
        for shown in listings:
            assert marker not in shown and SENDER not in shown and hashed_sender in shown, shown
        standin.behaviour.down = False
        await standin.wait_for_messages(3, timeout=15)
        await until(lambda: messages_in(spool) == [] and len(os.listdir(spool / "dead")) == 2)
        assert marker.encode() not in every_byte(spool)  # the dead letter too
    assert sorted(m.data for m in standin.messages) == sorted(sent)  # byte for byte
    log = (tmp_path / "relay.log").read_text()
    for needle in (marker, "Appointment", SENDER, "example.org"):
        assert needle not in log, needle
    assert hashed_sender in log  # still one sender to follow across lines


async def test_a_flipped_bit_in_a_queued_message_is_reported_left_in_place_and_never_delivered(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    key = make_key(tmp_path / "spool.key")
    spool = tmp_path / "spool"
    standin.behaviour.down = True
    relay = await start_relay(spool=sealed(spool, key, breaker_threshold=1))
    for target in ("state", "body", "envelope"):  # the first is attempted (a .state); then the breaker holds
        await send_one(relay.port, SENDER, [f"{target}@example.org"], message(to=f"{target}@example.org"))
    await send_one(relay.port, SENDER, ["intact@example.org"], message(to="intact@example.org"))
    await until(lambda: len(messages_in(spool)) == 4 and len(os.listdir(spool / "queue")) >= 5)
    await relay.stop()
    by_recipient = {
        Spool(spool, Sealer([parse_key(key.read_text())])).read(q)[0].recipients[0]: q for q in messages_in(spool)
    }
    body, envelope, state = (by_recipient[f"{t}@example.org"] for t in ("body", "envelope", "state"))
    flip_bit(spool / "queue" / f"{body}.msg", (spool / "queue" / f"{body}.msg").stat().st_size - 1)  # the tag
    flip_bit(spool / "queue" / f"{envelope}.msg", 40)  # inside the envelope's ciphertext
    flip_bit(spool / "queue" / f"{state}.state", 30)
    tampered = snapshot(spool / "queue")

    standin.behaviour.down = False
    with structlog.testing.capture_logs() as logs:
        relay = await start_relay(spool=sealed(spool, key))
        await standin.wait_for_messages(1)
        await until(lambda: any(e["event"] == "spool_record_damaged" for e in logs))
        assert (await send_one(relay.port, SENDER, ["after@example.org"], message())).startswith("250")
        await standin.wait_for_messages(2)
        damaged = {body, envelope, state}
        await until(lambda: {name.split(".")[0] for name in os.listdir(spool / "queue")} == damaged)
        await relay.stop()  # the delivered files are gone before the snapshot reads the directory
    assert [m.rcpt_tos for m in standin.messages] == [["intact@example.org"], ["after@example.org"]]
    unreadable = {e["queue_id"] for e in logs if e["event"] in ("spool_entry_unreadable", "spool_record_damaged")}
    assert unreadable == {body, envelope, state}
    assert {k: v for k, v in snapshot(spool / "queue").items() if k != "."} == {
        k: v for k, v in tampered.items() if k != "." and k.split(".")[0] in damaged
    }


@pytest.mark.parametrize("how", ["bit rot", "tampered with a matching checksum"])
async def test_a_damaged_journal_record_is_reported_copied_aside_and_the_others_recovered(
    how: str, standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    key = make_key(tmp_path / "spool.key")
    spool = tmp_path / "spool"
    journal = Journal(spool / "journal", sealer=Sealer([parse_key(key.read_text())]))
    journal.start(asyncio.get_running_loop())
    messages = [stored(n, "j") for n in range(3)]
    await asyncio.gather(*(journal.append(m, e) for m, e in messages))
    await journal.close()  # all three stay live: as after a crash
    [segment] = segment_paths(spool / "journal")
    with open(segment, "rb") as handle:
        offsets = [(offset, len(payload)) for _, offset, payload in read_records(handle)]
    offset, length = offsets[1]
    data = bytearray(segment.read_bytes())
    data[offset + length - 40] ^= 0x04  # inside the second message's sealed bytes
    if how != "bit rot":  # an attacker fixes the crc32: only the seal can tell
        data[offset - 12 : offset - 8] = zlib.crc32(data[offset : offset + length]).to_bytes(4, "big")
    segment.write_bytes(bytes(data))

    with structlog.testing.capture_logs() as logs:
        await start_relay(spool=sealed(spool, key))
        await standin.wait_for_messages(2)
    assert sorted(m.rcpt_tos[0] for m in standin.messages) == ["pj@example.org", "pj@example.org"]
    [damaged] = [e for e in logs if e["event"] == "spool_record_damaged"]
    assert damaged["queue_id"] == (messages[1][1].queue_id if how != "bit rot" else None)
    assert Path(damaged["kept"]).read_bytes() == bytes(data[offset : offset + length])
    await until(lambda: journal_quiet(spool / "journal", Sealer([parse_key(key.read_text())])))
    assert len(standin.messages) == 2


@pytest.mark.slow  # relay processes: .ci/run runs them
async def test_a_missing_or_wrong_key_at_start_up_exits_2_naming_the_key_id_and_touches_nothing(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    old = make_key(tmp_path / "old.key")
    spool = tmp_path / "spool"
    standin.behaviour.down = True
    relay = await start_relay(spool=sealed(spool, old, breaker_threshold=1))
    await send_one(relay.port, SENDER, ["a@example.org"], message())
    await until(lambda: len(messages_in(spool)) == 1)
    await relay.stop()
    before = snapshot(spool)
    other = make_key(tmp_path / "other.key")
    for name, spool_settings in {
        "wrong": {"encryption_key_file": str(other)},
        "missing": {"encryption_key_file": None},
    }.items():
        config = write_config(
            tmp_path / f"{name}.toml", standin, port=free_port(), spool={**spooled(spool), **spool_settings}
        )
        code, out, err = await relay_cli("serve", "--config", str(config))
        assert code == 2, (name, out, err)
        assert "config error" in err and key_of(old) in err, err
        assert snapshot(spool) == before, name
    assert not (tmp_path / "nowhere").exists()
    config = write_config(
        tmp_path / "nokey.toml",
        standin,
        port=free_port(),
        spool={**spooled(tmp_path / "nowhere"), "encryption_key_file": str(tmp_path / "absent.key")},
    )
    code, _, err = await relay_cli("serve", "--config", str(config))
    assert code == 2 and "spool.encryption_key_file" in err and not (tmp_path / "nowhere").exists()


# rotation


async def test_messages_sealed_under_the_old_key_are_delivered_after_rotation(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    old, new = make_key(tmp_path / "old.key"), make_key(tmp_path / "new.key")
    spool = tmp_path / "spool"
    standin.behaviour.down = True
    relay = await start_relay(spool=sealed(spool, old, breaker_threshold=1))
    for n in range(3):
        await send_one(relay.port, SENDER, [f"r{n}@example.org"], message(Message_ID=f"<rot{n}@erp.example.com>"))
    await until(lambda: len(messages_in(spool)) == 3)
    await relay.stop()
    assert set(key_census(Spool(spool))) == {key_of(old)}

    standin.behaviour.down = False
    with structlog.testing.capture_logs() as logs:
        relay = await start_relay(spool=sealed(spool, new, old_key_files=[str(old)]))
    [said] = [e for e in logs if e["event"] == "spool_encrypted"]  # the ids it holds, never a key
    assert (said["key_id"], said["old_key_ids"]) == (key_of(new), [key_of(old)])
    await standin.wait_for_messages(3)
    await send_one(relay.port, SENDER, ["late@example.org"], message())
    await standin.wait_for_messages(4)
    assert sorted(m.rcpt_tos[0] for m in standin.messages) == [
        "late@example.org",
        "r0@example.org",
        "r1@example.org",
        "r2@example.org",
    ]


def spool_under(path: Path, key: Path | None) -> Spool:
    spool = Spool(path, Sealer([parse_key(key.read_text())]) if key is not None else None)
    spool.create()
    return spool


@pytest.mark.slow  # relay processes: .ci/run runs them
async def test_queue_rekey_leaves_nothing_under_the_old_key_and_the_old_key_can_go(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    """queue/ with a .state, a dead letter hard-linked with its queue entry, a plaintext file from before
    encryption, and live journal records (as after a crash): all under the new key after one rekey."""
    old, new = make_key(tmp_path / "old.key"), make_key(tmp_path / "new.key")
    path = tmp_path / "spool"
    before = spool_under(path, None)
    before.commit(*stored(0, "plain"))
    spool = spool_under(path, old)
    for n in (1, 2):
        spool.commit(*stored(n, "q"))
    spool.write_state(stored(1)[1].queue_id, EntryState(attempts=1, last_reply="451 later"))
    spool.dead_letter(stored(2)[1].queue_id, {"pq@example.org": "550 no"}, "550 no")
    journal = Journal(path / "journal", sealer=spool.sealer)
    journal.start(asyncio.get_running_loop())
    await asyncio.gather(*(journal.append(*stored(n, "j")) for n in (3, 4)))
    await journal.close()
    assert key_census(spool) == {"plain": 1, key_of(old): 7}
    history = SqliteHistory(path / "history.sqlite3", [parse_key(old.read_text())])  # bounces on: a history
    history.write(
        [MessageReceived("hq", "<h@app>", "h@erp.example.com", "10.0.0.9", 1.0, 9, ("hr@x.org",), None, None)], False
    )
    history.close()

    config = write_config(
        tmp_path / "rekey.toml",
        standin,
        port=free_port(),
        spool={**spooled(path), "encryption_key_file": str(new), "old_key_files": [str(old)]},
        bounces={"enabled": True, "smtp_host": "127.0.0.1", "smtp_port": free_port()},
    )
    code, out, err = await relay_cli("queue", "--config", str(config), "rekey")
    assert code == 0, (out, err)
    assert f"rekeyed to key id {key_of(new)}: 6 file(s) rewritten, 2 message(s) moved from journal/" in out
    assert "message history: 2 row(s) sealed again under the current key" in out
    history = SqliteHistory(path / "history.sqlite3", [parse_key(new.read_text())])  # the old key is gone
    [trace] = history.lookup("hr@x.org", 5)
    assert (trace.queue_id, trace.sender, trace.client_ip) == ("hq", "h@erp.example.com", "10.0.0.9")
    history.close()
    census = key_census(spool)
    assert census == {key_of(new): census[key_of(new)]}  # nothing plain, nothing under the old key
    dead_id = stored(2)[1].queue_id
    assert os.path.samefile(path / "queue" / f"{dead_id}.msg", path / "dead" / f"{dead_id}.msg")  # still one file
    code, out, err = await relay_cli("queue", "--config", str(config), "rekey")
    assert code == 0 and "0 file(s) rewritten" in out and "message history: 0 row(s)" in out, (out, err)

    await start_relay(spool=sealed(path, new))  # the old key is gone from the config
    await standin.wait_for_messages(5)
    await until(lambda: messages_in(path) == [])
    assert {m.rcpt_tos[0] for m in standin.messages} == {"pplain@example.org", "pq@example.org", "pj@example.org"}


@pytest.mark.slow  # relay processes: .ci/run runs them
async def test_queue_rekey_refuses_while_a_relay_runs_on_the_spool(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    key = make_key(tmp_path / "spool.key")
    spool = tmp_path / "spool"
    await start_relay(spool=sealed(spool, key))
    config = write_config(tmp_path / "relay.toml", standin, port=free_port(), spool=sealed(spool, key))
    code, _, err = await relay_cli("queue", "--config", str(config), "rekey")
    assert code == 1 and "stop it first" in err


@pytest.mark.slow  # relay processes: .ci/run runs them
async def test_a_new_key_on_reload_waits_for_a_restart_and_says_so(standin: InfobipStandIn, tmp_path: Path) -> None:
    old, new = make_key(tmp_path / "old.key"), make_key(tmp_path / "new.key")
    spool, port, log = tmp_path / "spool", free_port(), tmp_path / "relay.log"
    config = write_config(tmp_path / "relay.toml", standin, port=port, spool=sealed(spool, old), log={"format": "json"})
    async with relay_process(config, port, log) as proc:
        write_config(
            config, standin, port=port, spool=sealed(spool, new, old_key_files=[str(old)]), log={"format": "json"}
        )
        proc.send_signal(signal.SIGHUP)
        await until(lambda: '"config_reloaded"' in log.read_text())
        [reloaded] = [json.loads(line) for line in log.read_text().splitlines() if '"config_reloaded"' in line]
        assert reloaded["restart_needed_for"] == ["spool.encryption_key_file", "spool.old_key_files"]
        standin.behaviour.down = True
        assert (await send_one(port, SENDER, ["a@example.org"], message())).startswith("250")
        await until(lambda: len(messages_in(spool)) == 1)
        assert set(key_census(Spool(spool))) == {key_of(old)}  # still the key it started with
