"""The relay on uvloop (issue 18): `relay serve` runs on uvloop unless RELAY_EVENT_LOOP=asyncio, and says which.

aiosmtpd builds inbound STARTTLS on `asyncio.sslproto.SSLProtocol` directly, over whatever transport the loop
made, rather than through `loop.start_tls`; on uvloop that is uvloop's own TCP transport under asyncio's TLS
protocol. The load test below runs that mix on a uvloop loop of its own (whatever RELAY_TEST_LOOP says): twenty
clients at once, each STARTTLS, AUTH inside TLS, and messages from one line to 256 KiB, every byte checked where
it arrives upstream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import signal
import ssl
import sys
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import uvloop

from relay.app import Relay
from relay.cli import loop_factory, main
from relay.testing.standin import InfobipStandIn
from tests.conftest import TEST_LOOP, Dialog, free_port, relay_settings
from tests.helpers import SENDER, spooled, write_config
from tests.inbound_helpers import closed_after, inbound_tls, plain

CLIENTS = 20
SIZES = (10, 1_000, 20_000, 100_000, 256_000)  # one message of each size per client
PASSWORD = "load-test-4711"
ROOT = Path(__file__).resolve().parent.parent


async def test_the_tests_run_on_the_loop_relay_test_loop_names() -> None:
    """RELAY_TEST_LOOP is honoured, or the uvloop and asyncio passes would both run the same loop."""
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop) == (TEST_LOOP == "uvloop")


def a_message(client: int, number: int) -> bytes:
    """Headers the relay would not add to (Date and Message-ID present), and a body of `SIZES[number]` bytes
    or so in 76-character lines, every seventh starting with a dot (stuffed on the wire both ways)."""
    head = (
        f"From: ERP <{SENDER}>\r\nTo: <c{client}@example.org>\r\nSubject: load {client}.{number}\r\n"
        f"Date: Mon, 02 Mar 2026 10:00:00 +0000\r\nMessage-ID: <c{client}.m{number}@erp.example.com>\r\n\r\n"
    ).encode()
    noise = base64.b64encode(random.Random(client * 100 + number).randbytes(SIZES[number] * 3 // 4 + 3))
    lines = [noise[i : i + 76] for i in range(0, len(noise), 76)]
    return head + b"".join(b"." + line + b"\r\n" if i % 7 == 3 else line + b"\r\n" for i, line in enumerate(lines))


async def one_client(port: int, context: ssl.SSLContext, client: int, *, auth: bool = True) -> list[bytes]:
    """Greeting, EHLO, STARTTLS, EHLO again, AUTH PLAIN inside TLS, one message of each size, QUIT."""
    dialog = await Dialog.open(port)
    await dialog.hello()
    assert (await dialog.send("STARTTLS")).startswith("220 ")
    await dialog.writer.start_tls(context, server_hostname="localhost")
    ehlo = await dialog.send("EHLO app.test")
    assert "STARTTLS" not in ehlo and ("AUTH PLAIN" in ehlo) == auth, ehlo
    if auth:
        assert (await dialog.send(f"AUTH PLAIN {plain('erp', PASSWORD)}")).startswith("235 ")
    sent = []
    for number in range(len(SIZES)):
        data = a_message(client, number)
        assert (await dialog.mail(SENDER, [f"c{client}@example.org"], data)).startswith("250 ")
        sent.append(data)
    assert (await dialog.send("QUIT")).startswith("221 ")
    await dialog.close()
    return sent


def on_uvloop(scenario: Callable[[Path], Awaitable[None]], tmp_path: Path) -> None:
    """Run `scenario` on a uvloop loop of its own; anything that reaches the loop's exception handler (an error
    in a callback or a transport, a task's exception nobody retrieved) fails the test."""
    unhandled: list[dict[str, Any]] = []
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.get_loop().set_exception_handler(lambda _, context: unhandled.append(context))
        runner.run(scenario(tmp_path))
    assert unhandled == []


async def starttls_under_load(tmp_path: Path) -> None:
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)
    standin = InfobipStandIn()
    await standin.start()
    listen, context = inbound_tls(tmp_path, [{"username": "erp", "password": PASSWORD}])
    relay = Relay(relay_settings(standin, listen=listen, spool=spooled(tmp_path / "spool")))
    await relay.start()
    try:
        sent = await asyncio.gather(*(one_client(relay.port, context, client) for client in range(CLIENTS)))
        arrived = await standin.wait_for_messages(CLIENTS * len(SIZES), timeout=60)
    finally:
        await relay.stop()
        await standin.stop()
    assert len(arrived) == CLIENTS * len(SIZES)
    assert sorted(m.data for m in arrived) == sorted(data for one in sent for data in one)  # byte for byte
    assert all(m.tls and m.mail_from == SENDER for m in arrived)


def test_inbound_starttls_under_load_on_uvloop(tmp_path: Path) -> None:
    on_uvloop(starttls_under_load, tmp_path)


async def broken_handshakes(tmp_path: Path) -> None:
    standin = InfobipStandIn()
    await standin.start()
    listen, context = inbound_tls(tmp_path)
    relay = Relay(relay_settings(standin, listen=listen))
    await relay.start()
    try:
        not_tls = await Dialog.open(relay.port)  # answers the 220 with plain text: the relay hangs up
        await not_tls.hello()
        assert (await not_tls.send("STARTTLS")).startswith("220 ")
        not_tls.writer.write(b"EHLO this is not a TLS ClientHello\r\n")
        await closed_after(not_tls.reader)
        await not_tls.close()
        gone = await Dialog.open(relay.port)  # hangs up where its ClientHello should be
        await gone.hello()
        assert (await gone.send("STARTTLS")).startswith("220 ")
        await gone.close()
        assert await one_client(relay.port, context, 0, auth=False)  # and the next client is served
        assert len(await standin.wait_for_messages(len(SIZES))) == len(SIZES)
    finally:
        await relay.stop()
        await standin.stop()


def test_a_broken_tls_handshake_on_uvloop_closes_that_connection_only(tmp_path: Path) -> None:
    on_uvloop(broken_handshakes, tmp_path)


# RELAY_EVENT_LOOP


def test_relay_serve_runs_on_uvloop_unless_told_asyncio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_EVENT_LOOP", raising=False)
    assert loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("RELAY_EVENT_LOOP", "uvloop")
    assert loop_factory() is uvloop.new_event_loop
    monkeypatch.setenv("RELAY_EVENT_LOOP", "asyncio")
    assert loop_factory() is None  # asyncio.Runner's own


async def test_an_unknown_event_loop_is_a_config_error(
    standin: InfobipStandIn, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "relay.toml", standin, port=free_port())
    monkeypatch.setenv("RELAY_EVENT_LOOP", "trio")
    assert main(["serve", "--config", str(config)]) == 2  # before anything starts
    assert capsys.readouterr().err == (
        "relay: config error: RELAY_EVENT_LOOP: 'trio' is not an event loop (uvloop, the default, or asyncio)\n"
    )


async def started_loop_line(config: Path, port: int, env: dict[str, str]) -> dict[str, str]:
    """Start `relay serve`, read its log up to relay_listening, stop it with SIGTERM: the relay_event_loop line."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), cwd=ROOT, env=env,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    events: dict[str, dict[str, str]] = {}
    try:
        while "relay_listening" not in events:
            line = await asyncio.wait_for(proc.stderr.readline(), 30)
            assert line, f"relay exited before listening: {events}"
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                events[event["event"]] = event
        proc.send_signal(signal.SIGTERM)
        await proc.stderr.read()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert list(events).index("relay_event_loop") < list(events).index("relay_listening")
    return events["relay_event_loop"]


@pytest.mark.slow
async def test_relay_serve_logs_the_loop_it_runs_on(standin: InfobipStandIn, tmp_path: Path) -> None:
    port = free_port()
    config = write_config(tmp_path / "relay.toml", standin, port=port, log={"format": "json"})
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    on_uvloop = await started_loop_line(config, port, env)
    assert on_uvloop["loop"] == "uvloop" and on_uvloop["version"] == metadata.version("uvloop")
    on_asyncio = await started_loop_line(config, port, {**env, "RELAY_EVENT_LOOP": "asyncio"})
    assert on_asyncio["loop"] == "asyncio" and on_asyncio["version"] == sys.version.split()[0]
