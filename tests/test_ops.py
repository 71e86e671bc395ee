"""The ops commands and signals as ops use them: real processes, real sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.testing.standin import InfobipStandIn
from tests import helpers
from tests.conftest import Dialog, free_port, message

pytestmark = pytest.mark.slow  # real relay processes and CLI runs: seconds each; .ci/run runs them

SENDER = "billing@erp.example.com"
PASSWORD = "demo-password"


def write_config(path: Path, standin: InfobipStandIn, port: int, extra: str = "") -> Path:
    """Pass-through, debug logs; `extra` is TOML appended as it is (a test's own tables)."""
    helpers.write_config(path, standin, port=port, log={"level": "debug"})
    path.write_text(path.read_text() + extra)
    return path


async def run_cli(*args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def wait_listening(port: int, process: asyncio.subprocess.Process) -> None:
    for _ in range(500):
        assert process.returncode is None, "relay exited"
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.02)
            continue
        writer.close()
        return
    raise AssertionError("relay did not start listening")


class RelayProcess:
    def __init__(self, process: asyncio.subprocess.Process, port: int) -> None:
        self.process = process
        self.port = port
        self.log_lines: list[str] = []
        self._reader = asyncio.ensure_future(self._read_logs())

    async def _read_logs(self) -> None:
        assert self.process.stderr is not None
        async for line in self.process.stderr:
            self.log_lines.append(line.decode().rstrip("\n"))

    async def wait_for_log(self, event: str) -> dict[str, object]:
        for _ in range(1000):
            for line in self.log_lines:
                if f'"event": "{event}"' in line:
                    return dict(json.loads(line))
            await asyncio.sleep(0.01)
        raise AssertionError(f"no {event} in logs:\n" + "\n".join(self.log_lines))

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await self._reader
        return code


@pytest.fixture
async def relay_process(standin: InfobipStandIn, tmp_path: Path) -> AsyncIterator[tuple[RelayProcess, Path]]:
    port = free_port()
    config = write_config(tmp_path / "config.toml", standin, port)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    await wait_listening(port, process)
    relay = RelayProcess(process, port)
    yield relay, config
    if process.returncode is None:
        process.kill()
        await process.wait()


async def send(port: int, recipient: str = "a@example.org", body: bytes = b"Hello.\r\n") -> str:
    dialog = await Dialog.open(port)
    try:
        await dialog.hello()
        return await dialog.mail(SENDER, [recipient], message(body=body))
    finally:
        await dialog.close()


async def test_sighup_applies_a_valid_config_and_keeps_the_old_one_when_invalid(
    standin: InfobipStandIn, relay_process: tuple[RelayProcess, Path]
) -> None:
    relay, config = relay_process
    held_open = await Dialog.open(relay.port)  # a session that lives through both reloads
    await held_open.hello()
    assert (await send(relay.port)).startswith("250 2.6.0 ")
    assert b"X-IB-Bulk-Id" not in standin.messages[0].data

    config.write_text(config.read_text() + '[[policy.rules]]\nheaders = { "X-IB-Bulk-Id" = "reloaded" }\n')
    relay.process.send_signal(signal.SIGHUP)
    await relay.wait_for_log("config_reloaded")
    assert (await send(relay.port)).startswith("250 2.6.0 ")
    assert b"\r\nX-IB-Bulk-Id: reloaded\r\n" in standin.messages[1].data

    config.write_text(config.read_text() + "[listen]\nnonsense = 1\n")
    relay.process.send_signal(signal.SIGHUP)
    failure = await relay.wait_for_log("config_reload_failed")
    assert "listen" in str(failure["error"])
    reply = await held_open.mail(SENDER, ["b@example.org"], message())
    assert reply.startswith("250 2.6.0 ")
    assert b"\r\nX-IB-Bulk-Id: reloaded\r\n" in standin.messages[2].data
    await held_open.close()
    assert await relay.stop() == 0


async def test_logs_are_json_events_with_the_same_keys_and_no_secrets_or_bodies(
    standin: InfobipStandIn, relay_process: tuple[RelayProcess, Path]
) -> None:
    relay, _ = relay_process
    assert (await send(relay.port, body=b"Diagnosis: very private\r\n")).startswith("250 2.6.0 ")
    event = await relay.wait_for_log("message_relayed")
    assert await relay.stop() == 0
    for key in ("queue_id", "client_ip", "sender", "recipients", "size", "infobip_id", "outcome", "reply"):
        assert key in event, key
    assert event["infobip_id"] == standin.messages[0].infobip_id
    text = "\n".join(relay.log_lines)
    plain = f"\0{standin.username}\0{PASSWORD}".encode()
    for secret in (PASSWORD, base64.b64encode(plain).decode(), base64.b64encode(PASSWORD.encode()).decode()):
        assert secret not in text
    assert "very private" not in text and "a@example.org" not in text  # recipients are counted, not listed
    assert all(line.startswith("{") for line in relay.log_lines if line.strip()), relay.log_lines


async def test_check_config_masks_secrets_and_warns_about_open_relays(standin: InfobipStandIn, tmp_path: Path) -> None:
    extra = '[policy]\nalignment = "off"\n[[policy.rules]]\nheaders = { "X-IB-Tracking-Url" = "https://x" }\n'
    extra += "replace_existing = true\n"
    config = write_config(tmp_path / "c.toml", standin, 2525, extra)
    config.write_text(config.read_text().replace('hostname = "relay.test"', 'allowed_networks = ["0.0.0.0/0"]'))
    code, out, err = await run_cli("check-config", "--config", str(config))
    assert code == 0, err
    assert json.loads(out)["upstream"]["password"] == "**********"
    assert PASSWORD not in out + err
    assert "0.0.0.0/0 includes public address space" in err and "open relay" in err
    assert "policy.alignment = off" in err
    assert "overrides the app's own tracking headers (X-IB-Tracking-Url)" in err


async def test_check_config_rejects_an_invalid_config_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[listen]\nallowed_networks = ["10.0.0.1/8"]\n')
    code, out, err = await run_cli("check-config", "--config", str(config))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "listen.allowed_networks" in err and "Traceback" not in err


async def test_doctor_walks_every_step_and_sends_a_test(standin: InfobipStandIn, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", standin, 2525)
    code, out, _ = await run_cli("doctor", "--config", str(config), "--from", SENDER, "--send-test", "x@example.org")
    assert code == 0, out
    for step in ("dns", "tcp", "greeting", "ehlo", "tls", "auth", "mail", "send"):
        assert f"  ok    {step}" in out, step
    assert f"Infobip message id {standin.messages[0].infobip_id}" in out
    assert "expires" in out


async def test_doctor_names_the_failing_step_and_what_to_check(standin: InfobipStandIn, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", standin, 2525)
    config.write_text(config.read_text().replace(f'password = "{PASSWORD}"', 'password = "wrong"'))
    code, out, _ = await run_cli("doctor", "--config", str(config))
    assert code == 1
    assert "  FAIL  auth" in out and "what to check: Infobip refused the credentials" in out
    assert standin.messages == []
