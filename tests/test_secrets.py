"""Secrets and privacy (issue 5): a relay process at DEBUG never shows the upstream password, its base64 forms
from the AUTH exchange, or a message body line, in any log line, metric, health text, SMTP reply, or the output
of `relay check-config` and `relay queue list`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from relay.testing.standin import InfobipStandIn
from tests import helpers
from tests.conftest import Dialog, free_port, message, record_wire

pytestmark = pytest.mark.slow  # real relay processes at debug level, scanned for secrets; .ci/run runs them

USERNAME = "ib-user-K7q"
PASSWORD = "S3cr3t-P@ss-Z9"
MARKER = "Patient-7731 diagnosis: confidential-marker-Q8Zx"
SENDER = "billing@erp.example.com"


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# Every form the password takes on the wire: as is, AUTH LOGIN's token, AUTH PLAIN's token.
SECRETS = {
    "password": PASSWORD,
    "base64 password": b64(PASSWORD),
    "base64 plain": b64(f"\0{USERNAME}\0{PASSWORD}"),
    "base64 plain without authzid": b64(f"{USERNAME}\0{PASSWORD}"),
}


def leaks(text: str, *, body: bool = True) -> list[str]:
    """Which secrets (and the body marker) appear in `text`."""
    found = [name for name, secret in SECRETS.items() if secret in text]
    return found + (["body marker"] if body and (MARKER in text or "confidential-marker" in text) else [])


async def run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode() + err.decode()


def write_config(
    path: Path, standin: InfobipStandIn, *, port: int, http_port: int, spool: bool, password: str | None
) -> Path:
    """Debug logs, the ops port on `http_port`; `password` None leaves the key out (env or file gives it)."""
    return helpers.write_config(
        path,
        standin,
        port=port,
        upstream={"username": USERNAME, "password": password},
        spool={"enabled": spool, "path": str(path.parent / "spool"), "sync_wait": 5, "drain_timeout": 2},
        http={"enabled": True, "port": http_port},
        log={"level": "debug"},
    )


class RelayRun:
    """`relay serve` as a process; every line it writes on stdout and stderr is kept."""

    def __init__(self, process: asyncio.subprocess.Process, port: int, http_port: int) -> None:
        self.process = process
        self.port = port
        self.http_port = http_port
        self.output: list[str] = []
        assert process.stdout is not None and process.stderr is not None
        self._readers = [asyncio.ensure_future(self._read(stream)) for stream in (process.stdout, process.stderr)]

    async def _read(self, stream: asyncio.StreamReader) -> None:
        async for line in stream:
            self.output.append(line.decode(errors="replace").rstrip("\n"))

    @classmethod
    async def start(cls, config: Path, port: int, http_port: int) -> RelayRun:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--config",
            str(config),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        run = cls(process, port, http_port)
        deadline = asyncio.get_running_loop().time() + 15
        while True:
            assert process.returncode is None, "relay exited:\n" + "\n".join(run.output)
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                assert asyncio.get_running_loop().time() < deadline, "relay did not listen"
                await asyncio.sleep(0.02)
                continue
            writer.close()
            return run

    async def http(self, path: str) -> str:
        async with aiohttp.ClientSession() as client, client.get(f"http://127.0.0.1:{self.http_port}{path}") as got:
            return await got.text()

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await asyncio.gather(*self._readers)
        return code

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()


class RecordingDialog(Dialog):
    """Dialog that keeps every reply the client saw."""

    seen: list[str]

    async def reply(self) -> str:
        text = await super().reply()
        self.seen.append(text)
        return text


async def open_recording(port: int, seen: list[str]) -> RecordingDialog:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    dialog = RecordingDialog(reader, writer)
    dialog.seen = seen
    return dialog


@pytest.fixture
async def standin_with_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[InfobipStandIn, dict[int, bytearray]]]:
    """A stand-in that expects USERNAME/PASSWORD, and the bytes the relay sends it."""
    wire = record_wire(monkeypatch)
    server = InfobipStandIn(username=USERNAME, password=PASSWORD)
    await server.start()
    yield server, wire
    await server.stop()


@pytest.fixture
async def relay_run() -> AsyncIterator[list[RelayRun]]:
    started: list[RelayRun] = []
    yield started
    for run in started:
        run.kill()
        with contextlib.suppress(Exception):
            await run.process.wait()


async def check_outputs(config: Path, *, queued: int | None) -> str:
    """`check-config` and `queue list` outputs (both streams); `queued` None: the spool is disabled."""
    code, checked = await run_cli("check-config", "--config", str(config))
    assert code == 0, checked
    assert '"password": "**********"' in checked
    code, listed = await run_cli("queue", "--config", str(config), "list")
    if queued is None:
        assert code == 1 and "no spool at" in listed, listed
    else:
        assert code == 0, listed
        assert f"-- {queued} message(s) in queue/" in listed
    return checked + "\n" + listed


@pytest.mark.parametrize("mechanism", ["LOGIN", "PLAIN"])
async def test_a_full_session_at_debug_leaks_no_secret_and_no_body(
    standin_with_secret: tuple[InfobipStandIn, dict[int, bytearray]],
    relay_run: list[RelayRun],
    tmp_path: Path,
    mechanism: str,
) -> None:
    standin, wire = standin_with_secret
    standin.behaviour.auth_mechanisms = mechanism
    port, http_port = free_port(), free_port()
    config = write_config(tmp_path / "c.toml", standin, port=port, http_port=http_port, spool=True, password=PASSWORD)
    run = await RelayRun.start(config, port, http_port)
    relay_run.append(run)

    seen: list[str] = []
    dialog = await open_recording(port, seen)
    await dialog.hello()
    body = f"Dear customer,\r\n{MARKER}\r\n".encode()
    relayed = await dialog.mail(SENDER, ["customer@example.org"], message(body=body))
    # A refused message with the same body: the rejection path logs too.
    refused = await dialog.mail("bounce@other.example.net", ["customer@example.org"], message(body=body))
    await dialog.send("QUIT")
    await dialog.close()
    [got] = standin.messages
    assert relayed == f"250 2.6.0 Message queued as {got.infobip_id}"
    assert refused.startswith("550 5.7.1 ")
    assert MARKER.encode() in got.data

    # The secrets we look for are exactly what went to Infobip, so their absence below means something.
    sent = b"".join(wire.values())
    if mechanism == "LOGIN":
        assert b"AUTH LOGIN\r\n" in sent and f"\r\n{SECRETS['base64 password']}\r\n".encode() in sent
    else:
        assert f"AUTH PLAIN {SECRETS['base64 plain']}\r\n".encode() in sent

    scraped = "\n".join([await run.http("/metrics"), await run.http("/healthz"), await run.http("/readyz")])
    assert "relay_messages_relayed_total 1.0" in scraped
    assert await run.stop() == 0
    logs = "\n".join(run.output)
    assert got.infobip_id in logs and "other.example.net" in logs, logs  # the logs do follow both messages

    outputs = await check_outputs(config, queued=0)
    for where, text in (("logs", logs), ("metrics and health", scraped), ("replies", "\n".join(seen))):
        assert leaks(text) == [], f"{where}: {leaks(text)}"
    assert leaks(outputs) == [], outputs


@pytest.mark.parametrize("spool", [False, True], ids=["pass-through", "spooled"])
async def test_refused_upstream_auth_leaks_no_password(
    relay_run: list[RelayRun], tmp_path: Path, spool: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    wire = record_wire(monkeypatch)
    standin = InfobipStandIn(username=USERNAME, password="the-right-one")  # ours (PASSWORD) is wrong
    await standin.start()
    try:
        port, http_port = free_port(), free_port()
        config = write_config(
            tmp_path / "c.toml", standin, port=port, http_port=http_port, spool=spool, password=PASSWORD
        )
        run = await RelayRun.start(config, port, http_port)
        relay_run.append(run)
        seen: list[str] = []
        dialog = await open_recording(port, seen)
        await dialog.hello()
        reply = await dialog.mail(SENDER, ["customer@example.org"], message(body=f"{MARKER}\r\n".encode()))
        await dialog.close()
        assert standin.messages == []
        assert f"AUTH PLAIN {SECRETS['base64 plain']}\r\n".encode() in b"".join(wire.values())
        if spool:
            assert reply.startswith("250 2.0.0 Queued as ") and "Infobip deferred it" in reply, reply
        else:
            assert reply.startswith("451 4.4.1 Cannot reach Infobip at localhost:"), reply
            assert "refused our credentials" in reply
        scraped = "\n".join([await run.http("/metrics"), await run.http("/readyz")])
        assert "refused our credentials" in scraped  # /readyz says why
        assert await run.stop() == 0
        outputs = await check_outputs(config, queued=1 if spool else None)
    finally:
        await standin.stop()
    logs = "\n".join(run.output)
    assert "upstream_connect_failed" in logs
    if spool:
        assert "refused our credentials" in outputs  # queue list shows the last reply, not the password
    for where, text in (("logs", logs), ("metrics", scraped), ("replies", "\n".join(seen)), ("cli", outputs)):
        assert leaks(text) == [], f"{where}: {leaks(text)}"


async def test_check_config_masks_passwords_from_env_and_files(tmp_path: Path) -> None:
    standin = InfobipStandIn(username=USERNAME, password=PASSWORD)  # for its port and CA file
    await standin.start()
    try:
        config = write_config(tmp_path / "c.toml", standin, port=2525, http_port=9090, spool=False, password=None)
        code, from_env = await run_cli(
            "check-config", "--config", str(config), env={"RELAY_UPSTREAM__PASSWORD": PASSWORD}
        )
        assert code == 0, from_env
        secret_file = tmp_path / "password"
        secret_file.write_text(PASSWORD + "\n")
        config.write_text(config.read_text().replace("[spool]", f'password_file = "{secret_file}"\n[spool]'))
        code, from_file = await run_cli("check-config", "--config", str(config))
        assert code == 0, from_file
    finally:
        await standin.stop()
    for text in (from_env, from_file):
        assert '"password": "**********"' in text
        assert leaks(text, body=False) == [], text
