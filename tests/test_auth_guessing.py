"""AUTH guessing made slow and short, and passwords stored as hashes (issue 12, item 4).

7eaaba9 took 224,700 wrong AUTH PLAIN attempts on one connection in 10 s, then the right one, and logged each.
Now each failure waits longer, a connection is closed after a few, an address is locked out for a while (454
4.7.0, even with the right password), the log line is rate-limited, and listen.users takes scrypt hashes from
`relay hash-password`. Real sockets, STARTTLS then AUTH; delays and the lockout are short settings here.
"""

from __future__ import annotations

import io
import ssl
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import structlog.testing

from relay.app import Relay
from relay.cli import main as relay_main
from relay.config import ConfigError, Settings, load_settings
from relay.core.passwords import hash_password, parse_password_hash
from relay.ops.config_warnings import config_warnings
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay
from tests.inbound_helpers import closed_after, inbound_tls, plain

PASSWORD = "right-password-4711"
HASH = hash_password(PASSWORD, b"0123456789abcdef", n=2**14)
INVALID = "535 5.7.8 Authentication credentials invalid"
FAST = {"auth_failure_delay": 0.0, "auth_failures_per_connection": 3, "auth_failures_per_client": 100}


async def logged_in_dialog(port: int, context: ssl.SSLContext, local_addr: str = "127.0.0.1") -> Dialog:
    """Connected, STARTTLS done, EHLO said: ready for AUTH."""
    dialog = await Dialog.open(port, local_addr=local_addr)
    await dialog.hello()
    assert (await dialog.send("STARTTLS")).startswith("220 ")
    await dialog.writer.start_tls(context, server_hostname="localhost")
    assert "250-AUTH PLAIN LOGIN" in await dialog.send("EHLO app.test")
    return dialog


async def relay_with(
    start_relay: StartRelay, tmp_path: Path, users: list[dict[str, Any]] | None = None, **auth: Any
) -> tuple[Relay, ssl.SSLContext]:
    listen, context = inbound_tls(tmp_path, users or [{"username": "erp", "password_hash": HASH}])
    return await start_relay(listen={**listen, **auth}), context


def counted(relay: Relay, reason: str) -> float:
    return relay.metrics.registry.get_sample_value("relay_messages_rejected_total", {"reason": reason}) or 0.0


async def timed(dialog: Dialog, line: str) -> tuple[str, float]:
    started = time.monotonic()
    reply = await dialog.send(line)
    return reply, time.monotonic() - started


async def test_each_failure_waits_longer_and_the_third_closes_the_connection(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    relay, context = await relay_with(start_relay, tmp_path, **{**FAST, "auth_failure_delay": 0.1})
    dialog = await logged_in_dialog(relay.port, context)
    first, first_wait = await timed(dialog, f"AUTH PLAIN {plain('erp', 'guess-1')}")
    second, second_wait = await timed(dialog, f"AUTH PLAIN {plain('nobody', 'guess-2')}")  # unknown users too
    assert first == second == INVALID
    assert first_wait >= 0.1 and second_wait >= 0.2
    third = await dialog.send(f"AUTH PLAIN {plain('erp', 'guess-3')}")
    assert third == "421 4.7.0 Too many failed logins on this connection; closing it"
    assert await closed_after(dialog.reader) == b""
    await dialog.close()
    assert counted(relay, "auth_failed") == 3


async def test_an_address_with_too_many_failures_is_locked_out_even_with_the_right_password(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    limits = {**FAST, "auth_failures_per_client": 4, "auth_lockout": 0.5}
    relay, context = await relay_with(start_relay, tmp_path, **limits)
    for _ in range(2):  # two connections, two failures each: the address's fourth failure locks it out
        dialog = await logged_in_dialog(relay.port, context)
        for _ in range(2):
            assert await dialog.send(f"AUTH PLAIN {plain('erp', 'wrong')}") == INVALID
        await dialog.close()
    dialog = await logged_in_dialog(relay.port, context)
    locked = await dialog.send(f"AUTH PLAIN {plain('erp', PASSWORD)}")
    assert locked == "454 4.7.0 Too many failed logins from 127.0.0.1; try again in 1 s"
    assert (await dialog.send("AUTH LOGIN")).startswith("454 4.7.0 ")  # before any password is asked for
    other = await logged_in_dialog(relay.port, context, local_addr="127.0.0.2")  # other addresses are not
    assert await other.send(f"AUTH PLAIN {plain('erp', PASSWORD)}") == "235 2.7.0 Authentication successful"
    deadline = time.monotonic() + 5
    while (reply := await dialog.send(f"AUTH PLAIN {plain('erp', PASSWORD)}")).startswith("454 "):
        assert time.monotonic() < deadline, "still locked out"
        await other.send("NOOP")  # the lockout runs out on its own: wait for it with a round trip
    assert reply == "235 2.7.0 Authentication successful"
    await dialog.close()
    await other.close()
    assert counted(relay, "auth_locked_out") >= 2


async def test_the_failure_log_line_is_rate_limited(start_relay: StartRelay, tmp_path: Path) -> None:
    relay, context = await relay_with(start_relay, tmp_path, **{**FAST, "auth_failures_per_client": 6})
    with structlog.testing.capture_logs() as logs:
        for _ in range(2):
            dialog = await logged_in_dialog(relay.port, context)
            for _ in range(3):
                await dialog.send(f"AUTH PLAIN {plain('erp', 'wrong')}")
            await closed_after(dialog.reader)
            await dialog.close()
    lines = [e for e in logs if e["event"] == "client_auth_failed"]
    # The first failure, then the one that locks the address out, standing for the five in between.
    assert [(e["failures"], e["locked_out_for"]) for e in lines] == [(1, None), (5, 300)]
    assert counted(relay, "auth_failed") == 6


async def test_a_hashed_password_is_preferred_and_a_plain_text_one_still_works(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    users = [
        {"username": "erp", "password_hash": HASH, "password": "the-old-plain-one"},
        {"username": "legacy", "password": "plain-text-4711"},
    ]
    relay, context = await relay_with(start_relay, tmp_path, users, **FAST)
    dialog = await logged_in_dialog(relay.port, context)
    assert await dialog.send(f"AUTH PLAIN {plain('erp', 'the-old-plain-one')}") == INVALID
    assert await dialog.send(f"AUTH PLAIN {plain('erp', PASSWORD)}") == "235 2.7.0 Authentication successful"
    await dialog.close()
    legacy = await logged_in_dialog(relay.port, context)
    assert (await legacy.send("AUTH LOGIN")).startswith("334 ")
    assert (await legacy.send("bGVnYWN5")).startswith("334 ")  # legacy
    assert await legacy.send("cGxhaW4tdGV4dC00NzEx") == "235 2.7.0 Authentication successful"
    await legacy.close()


def test_relay_hash_password_prints_a_hash_the_config_takes_and_check_config_warns_about_plain_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("s3cret password\n"))  # a pipe, not a terminal
    assert relay_main(["hash-password"]) == 0
    printed = capsys.readouterr().out
    [line] = printed.splitlines()
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n"))
    assert relay_main(["hash-password"]) == 1  # an empty password is refused
    assert capsys.readouterr().err == "relay: an empty password cannot be hashed\n"
    assert parse_password_hash(line).n == 2**15 and "s3cret" not in line
    listen, _ = inbound_tls(
        tmp_path, [{"username": "erp", "password_hash": line}, {"username": "old", "password": "x"}]
    )
    warnings = config_warnings(Settings(listen=listen))
    about_users = [w for w in warnings if w.startswith("listen.users")]
    assert about_users == [
        "listen.users 'old': its password is in plain text here; put what `relay hash-password` prints in "
        "password_hash instead (and remove password), so a leaked config gives away no password"
    ]


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("s3cret", "not a password hash from `relay hash-password`"),
        ("scrypt$1024$8$1$MDEyMzQ1Njc4OWFiY2RlZg==$MDEyMzQ1Njc4OWFiY2RlZg==", "scrypt parameters too weak"),
        ("scrypt$32768$8$1$not base64!$MDEyMzQ1Njc4OWFiY2RlZg==", "a malformed scrypt hash"),
    ],
)
def test_a_password_hash_that_is_not_one_is_a_config_error_that_does_not_echo_it(
    tmp_path: Path, value: str, why: str
) -> None:
    listen, _ = inbound_tls(tmp_path)
    config = tmp_path / "relay.toml"
    config.write_text(
        f'[listen]\ntls_cert_file = "{listen["tls_cert_file"]}"\ntls_key_file = "{listen["tls_key_file"]}"\n'
        f'[[listen.users]]\nusername = "erp"\npassword_hash = "{value}"\n'
    )
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert why in str(caught.value) and value not in str(caught.value)
