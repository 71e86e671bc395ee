"""Per-app profiles over real sockets: each sender domain goes out as its own Infobip account, over its
own connections, and one account's refused password holds only its own mail."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from relay.app import Relay
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay, free_port, message, relay_settings
from tests.helpers import get, queue_files, send_one, spooled, until, write_config

HR, BILLING = "payroll@hr.example.com", "billing@erp.example.com"


def hr_profile(password: str = "hr-secret", **extra: Any) -> dict[str, Any]:
    return {"name": "hr", "sender_domain": "hr.example.com", "username": "hr", "password": password, **extra}


def from_(sender: str) -> bytes:
    return message(sender=sender)


async def test_each_profile_sends_as_its_own_account_over_its_own_connections(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.accounts["hr"] = "hr-secret"
    relay = await start_relay(spool=spooled(tmp_path), profiles=[hr_profile(pool_size=1)])
    for n in range(3):
        assert (await send_one(relay.port, HR, [f"h{n}@example.org"], from_(HR))).startswith("250 2.6.0 ")
        assert (await send_one(relay.port, BILLING, [f"b{n}@example.org"], from_(BILLING))).startswith("250 2.6.0 ")
    by_sender: dict[str, set[int]] = {m.mail_from: set() for m in standin.messages}
    for m in standin.messages:
        assert m.auth_user == ("hr" if m.mail_from == HR else standin.username)
        by_sender[m.mail_from].add(m.connection)
    assert len(by_sender[HR]) == 1  # its own pool of one, reused
    assert not by_sender[HR] & by_sender[BILLING]  # never over the other account's connections


async def test_a_refused_password_holds_only_that_profiles_mail_and_a_reload_releases_it(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.accounts["hr"] = "hr-secret"
    relay = await start_relay(
        spool=spooled(tmp_path, sync_wait=1.0, breaker_threshold=1), profiles=[hr_profile(password="wrong")]
    )
    held = await send_one(relay.port, HR, ["h@example.org"], from_(HR))
    assert held.startswith("250 2.0.0 Queued as ")
    queue_id = held.split("Queued as ")[1].split(";")[0]
    await until(lambda: f"{queue_id}.msg" in queue_files(tmp_path))
    envelope = json.loads((tmp_path / "queue" / f"{queue_id}.msg").read_bytes().split(b"\n", 1)[0])
    assert envelope["profile"] == "hr"  # a queued message remembers its profile
    started = time.monotonic()
    for n in range(3):  # the default profile flows, unaffected
        reply = await send_one(relay.port, BILLING, [f"b{n}@example.org"], from_(BILLING))
        assert reply.startswith("250 2.6.0 Message queued as "), reply
    assert time.monotonic() - started < 1.5
    assert [m.mail_from for m in standin.messages] == [BILLING] * 3
    fixed = relay_settings(
        standin, spool=spooled(tmp_path, sync_wait=1.0, breaker_threshold=1), profiles=[hr_profile()]
    )
    reloaded = time.monotonic()
    await relay.reload(fixed)
    await standin.wait_for_messages(4)
    assert time.monotonic() - reloaded < 10
    assert standin.messages[3].mail_from == HR and standin.messages[3].auth_user == "hr"


async def test_a_queued_message_whose_profile_is_gone_goes_out_with_the_default(
    standin: InfobipStandIn, tmp_path: Path
) -> None:
    standin.accounts["hr"] = "hr-secret"
    first = Relay(relay_settings(standin, spool=spooled(tmp_path, sync_wait=0.3), profiles=[hr_profile()]))
    await first.start()
    standin.behaviour.data_replies.append("451 4.3.0 Try later")
    assert "Infobip deferred it" in await send_one(first.port, HR, ["h@example.org"], from_(HR))
    await first.stop()
    second = Relay(relay_settings(standin, spool=spooled(tmp_path, sync_wait=0.3)))  # no profiles any more
    await second.start()
    try:
        assert second.delivery is not None
        second.delivery.flush()
        [got] = await standin.wait_for_messages(1)
        assert got.mail_from == HR and got.auth_user == standin.username
    finally:
        await second.stop()


async def test_a_profile_adds_its_own_rules_and_keeps_its_own_rate(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.accounts["hr"] = "hr-secret"
    rule = {"headers": {"X-IB-Tracking-Url": "https://hooks.example.com/hr"}}
    relay = await start_relay(spool=spooled(tmp_path), profiles=[hr_profile(rules=[rule], messages_per_minute=2)])
    for n in range(2):
        assert (await send_one(relay.port, HR, [f"h{n}@example.org"], from_(HR))).startswith("250 2.6.0 ")
    dialog = await Dialog.open(relay.port)
    await dialog.hello()
    third = await dialog.send(f"MAIL FROM:<{HR}>")
    await dialog.close()
    assert third.startswith("451 4.7.0 Rate limit: profile hr takes at most 2 messages a minute")
    assert (await send_one(relay.port, BILLING, ["b@example.org"], from_(BILLING))).startswith("250 2.6.0 ")
    hr_mail = [m for m in standin.messages if m.mail_from == HR]
    billing_mail = [m for m in standin.messages if m.mail_from == BILLING]
    assert len(hr_mail) == 2 and len(billing_mail) == 1
    assert all(b"\r\nX-IB-Tracking-Url: https://hooks.example.com/hr\r\n" in m.data for m in hr_mail)
    assert b"X-IB-Tracking-Url" not in billing_mail[0].data


async def test_each_profile_shows_in_metrics_and_upstream(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    relay = await start_relay(spool=spooled(tmp_path, sync_wait=0.5), profiles=[hr_profile(password="wrong")])
    assert (await send_one(relay.port, HR, ["h@example.org"], from_(HR))).startswith("250 2.0.0 ")
    assert (await send_one(relay.port, BILLING, ["b@example.org"], from_(BILLING))).startswith("250 2.6.0 ")
    _, metrics = await get(relay.http.port, "/metrics")
    assert 'relay_profile_upstream_up{profile="hr"} 0.0' in metrics
    assert 'relay_profile_upstream_up{profile="default"} 1.0' in metrics
    assert 'relay_profile_messages_relayed_total{profile="default"} 1.0' in metrics
    _, body = await get(relay.http.port, "/upstream")
    profiles = json.loads(body)["profiles"]
    assert profiles["hr"]["status"] == "credentials_refused" and profiles["default"]["status"] == "ok"


@pytest.mark.slow  # relay processes
async def test_doctor_checks_every_profile_or_the_one_named(standin: InfobipStandIn, tmp_path: Path) -> None:
    standin.accounts["hr"] = "hr-secret"
    config = write_config(tmp_path / "relay.toml", standin, port=free_port())
    config.write_text(
        config.read_text()
        + '\n[[profiles]]\nname = "hr"\nsender_domain = "hr.example.com"\nusername = "hr"\npassword = "wrong"\n'
    )

    async def doctor(*args: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "doctor",
            "--config",
            str(config),
            "--from",
            BILLING,
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(process.communicate(), 60)
        assert process.returncode is not None
        return process.returncode, out.decode()

    code, out = await doctor()
    assert code == 1 and "-- profile default" in out and "-- profile hr" in out
    assert out.split("-- profile hr")[0].count("  ok    auth") == 1  # the default account logs in
    assert "FAIL  auth" in out.split("-- profile hr")[1]  # hr's wrong password is named
    code, out = await doctor("--profile", "default")
    assert code == 0 and "-- profile hr" not in out
    code, out = await doctor("--profile", "nope")
    assert code == 2 and "no profile 'nope'" in out
