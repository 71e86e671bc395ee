"""The command line where a new user found it wanting (a new-user review): a demo relay's SIGHUP, what
`check-config` and `serve` refuse alike, listen addresses, `hash-password` input, an empty `trace` query."""

from __future__ import annotations

import asyncio
import json
import signal
import stat
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.cli import main as relay_main
from tests.conftest import free_port, message
from tests.helpers import SENDER, clear_relay_env, env_without_relay, send_one, until

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_relay_env(monkeypatch)


@pytest.fixture
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_UPSTREAM__USERNAME", "user")
    monkeypatch.setenv("RELAY_UPSTREAM__PASSWORD", "pw")


def run(tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, *command: str) -> tuple[int, str]:
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    capsys.readouterr()
    code = relay_main([*command, "--config", str(config)])
    return code, capsys.readouterr().err


# --- serve --demo and SIGHUP ---------------------------------------------------------------------


class DemoProcess:
    """`relay serve --demo` as a user starts it, its stdout (what the stand-in accepted) and stderr (logs)."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.out: list[str] = []
        self.err: list[str] = []
        assert process.stdout is not None and process.stderr is not None
        self._readers = [asyncio.ensure_future(self._read(process.stdout, self.out))]
        self._readers.append(asyncio.ensure_future(self._read(process.stderr, self.err)))

    @staticmethod
    async def _read(stream: asyncio.StreamReader, lines: list[str]) -> None:
        async for line in stream:
            lines.append(line.decode().rstrip("\n"))

    def events(self) -> list[str]:
        return [str(json.loads(line).get("event")) for line in self.err if line.startswith("{")]

    async def stop(self) -> int:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 30)
        await asyncio.gather(*self._readers)
        return code


@pytest.fixture
async def demo(tmp_path: Path) -> AsyncIterator[tuple[DemoProcess, Path, int]]:
    """A demo relay on a port of its own, with no Infobip credentials anywhere (as a newcomer runs it)."""
    port = free_port()
    config = tmp_path / "demo.toml"
    config.write_text(f"[listen]\nport = {port}\n")
    env = env_without_relay()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", "serve", "--demo", "--config", str(config)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=ROOT,
    )
    relay = DemoProcess(process)
    try:
        yield relay, config, port
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_a_demo_relay_reloaded_still_delivers_to_the_local_stand_in(
    demo: tuple[DemoProcess, Path, int],
) -> None:
    relay, config, port = demo
    await until(lambda: "relay_listening" in relay.events(), timeout=30)
    config.write_text(config.read_text() + '[[policy.rules]]\nheaders = { "X-IB-Callback-Data" = "reloaded" }\n')
    relay.process.send_signal(signal.SIGHUP)
    await until(lambda: {"config_reloaded", "config_reload_failed"} & set(relay.events()))
    assert "config_reload_failed" not in relay.events(), "\n".join(relay.err)
    reply = await send_one(port, SENDER, ["someone@example.org"], message())
    assert reply.startswith("250 2.6.0 Message queued as "), reply  # the stand-in's id: it took the message
    await until(lambda: any("X-IB-Callback-Data: reloaded" in line for line in relay.out))
    accepted = [line for line in relay.out if line.startswith("=== [demo stand-in for Infobip] accepted message")]
    assert len(accepted) == 1 and "(TLS, AUTH as demo)" in accepted[0]
    assert await relay.stop() == 0


# --- what serve refuses, check-config reports ----------------------------------------------------


def test_check_config_strict_fails_where_serve_refuses_reports_without_an_api_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], credentials: None
) -> None:
    toml = f'[spool]\npath = "{tmp_path / "spool"}"\n[reports]\nenabled = true\n'
    refusal = "reports.api_key: missing; set RELAY_REPORTS__API_KEY or reports.api_key_file (an Infobip API key)"
    code, err = run(tmp_path, capsys, toml, "serve")
    assert (code, err) == (2, f"relay: config error: {refusal}\n")
    code, err = run(tmp_path, capsys, toml, "check-config", "--strict")
    assert code == 1
    assert f"WARNING: `relay serve` refuses this config here: {refusal}\n" in err
    assert "config NOT OK with --strict" in err and "config OK" not in err.replace("config NOT OK", "")
    code, err = run(tmp_path, capsys, toml, "check-config")  # the key may come from the service's environment
    assert code == 0 and f"WARNING: `relay serve` refuses this config here: {refusal}\n" in err


def test_an_empty_spool_path_stops_serve_and_check_config_and_leaves_the_current_directory_alone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, credentials: None
) -> None:
    workdir = tmp_path / "cwd"
    workdir.mkdir(mode=0o755)
    monkeypatch.chdir(workdir)
    for command in (["check-config"], ["check-config", "--strict"], ["serve"]):
        code, err = run(tmp_path, capsys, '[spool]\npath = ""\n', *command)
        assert (code, err) == (
            2,
            "relay: config error: spool.path: empty: set the spool directory, e.g. /var/spool/relay\n",
        )
    assert stat.S_IMODE(workdir.stat().st_mode) == 0o755 and not list(workdir.iterdir())


@pytest.mark.parametrize(
    ("host", "why"),
    [("not-an-ip.invalid", "Name or service not known"), ("192.0.2.1", "Cannot assign requested address")],
)
def test_a_listen_host_serve_cannot_bind_is_a_config_error_naming_the_key_and_the_address(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], credentials: None, host: str, why: str
) -> None:
    toml = f'[listen]\nhost = "{host}"\nport = {free_port()}\n[spool]\npath = "{tmp_path / "spool"}"\n'
    code, err = run(tmp_path, capsys, toml, "serve")
    assert (code, err) == (2, f"relay: config error: listen.host: cannot listen on '{host}': {why}\n")
    assert not (tmp_path / "spool").exists()  # refused before anything was made
    code, err = run(tmp_path, capsys, toml, "check-config", "--strict")
    assert code == 1 and f"listen.host: cannot listen on '{host}': {why}" in err


def test_a_syntactically_impossible_host_stops_serve_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], credentials: None
) -> None:
    listen = f'[listen]\nhost = "127.0.0.1"\nport = {free_port()}\n[spool]\npath = "{tmp_path / "spool"}"\n'
    refusal = (
        "relay: config error: upstream.host: 'bad host' is neither an IP address nor a host name"
        " (letters, digits, '-', '.')\n"
    )
    for command in ("check-config", "serve"):  # check-config first: no relay left serving if this regresses
        assert run(tmp_path, capsys, f'{listen}[upstream]\nhost = "bad host"\n', command) == (2, refusal)


# --- hash-password and trace ----------------------------------------------------------------------


def test_hash_password_with_input_that_is_not_utf8_says_so_in_one_line() -> None:
    env = env_without_relay()
    done = subprocess.run(
        [sys.executable, "-m", "relay", "hash-password"],
        input=b"\xff\xfe\n",
        capture_output=True,
        env=env | {"LC_ALL": "C.UTF-8"},
        cwd=ROOT,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == b""
    assert done.stderr.decode() == "relay: hash-password: the password is not valid UTF-8 text; type it again\n"


@pytest.mark.parametrize("query", ["", "   "])
def test_an_empty_trace_query_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], query: str) -> None:
    history = tmp_path / "history.sqlite3"
    config = tmp_path / "relay.toml"
    config.write_text(f'[reports]\nhistory_path = "{history}"\n')
    capsys.readouterr()
    assert relay_main(["trace", "--config", str(config), query]) == 2
    assert capsys.readouterr().err == (
        "relay trace: the query is empty; give a queue id, an Infobip id, a <Message-ID> or an address\n"
    )
