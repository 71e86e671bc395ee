"""What many test modules share: sending one message, spool settings, waiting for a condition, reading
the ops port. (Fixtures and the raw SMTP `Dialog` are in conftest.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from relay.store.journal import live_index
from relay.store.sealing import Sealer
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog


async def send_one(port: int, sender: str, recipients: list[str], data: bytes) -> str:
    dialog = await Dialog.open(port)
    try:
        await dialog.hello()
        return await dialog.mail(sender, recipients, data)
    finally:
        await dialog.close()


SENDER = "billing@erp.example.com"


def spooled(path: Path, **extra: Any) -> dict[str, Any]:
    return {"enabled": True, "path": str(path), "sync_wait": 2.0, "retry_initial": 0.05, "retry_max": 0.2, **extra}


async def until(condition: Any, timeout: float = 10.0) -> None:
    """Poll a cheap condition (file system state, counters) until true; fails the test on timeout."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def journal_quiet(directory: Path, sealer: Sealer | None = None) -> bool:
    """Nothing live in a running relay's journal. A segment the relay retires while it is being read is a
    relay still at work: not quiet yet (the caller looks again)."""
    try:
        return not live_index(directory, sealer=sealer)
    except FileNotFoundError:
        return False


def queue_files(path: Path) -> list[str]:
    return sorted(os.listdir(path / "queue"))


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "64k") -> Iterator[Path]:
    """A file system that fills up at once, mounted at `path` for the test (needs root)."""
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def get(port: int, path: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as response:
        return response.status, await response.text()


def sample(metrics: str, name: str) -> float:
    """The value of one sample line such as `relay_messages_relayed_total 3.0`."""
    for line in metrics.splitlines():
        if line.startswith(name + " ") or (line.startswith(name + "{") and line.split(" ")[0] == name):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in metrics")


def toml_text(sections: dict[str, dict[str, Any]]) -> str:
    """The one TOML writer of the tests: a table per section, values as TOML scalars or arrays (a string
    is written as a JSON string, which TOML reads the same)."""

    def value(item: Any) -> str:
        if isinstance(item, bool):
            return "true" if item else "false"
        if isinstance(item, int | float):
            return str(item)
        if isinstance(item, list | tuple):
            return "[" + ", ".join(value(x) for x in item) + "]"
        return json.dumps(str(item))

    lines: list[str] = []
    for name, table in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {value(item)}" for key, item in table.items() if item is not None]
        lines.append("")
    return "\n".join(lines)


def write_config(path: Path, standin: InfobipStandIn, *, port: int, **sections: dict[str, Any]) -> Path:
    """A relay config pointing at the stand-in, listening on `port`, no spool and no HTTP unless a section
    says otherwise; `sections` update the defaults key by key (a value of None leaves a key out)."""
    base: dict[str, dict[str, Any]] = {
        "listen": {"host": "127.0.0.1", "port": port, "hostname": "relay.test", "timeout": 10},
        "upstream": {
            "host": "localhost",
            "port": standin.port,
            "username": standin.username,
            "password": standin.password,
            "ca_file": str(standin.ca_file),
            "connect_timeout": 5,
            "command_timeout": 5,
        },
        "spool": {"enabled": False},
        "http": {"enabled": False, "host": "127.0.0.1", "port": 0},
        "log": {"level": "info"},
    }
    for name, table in sections.items():
        base.setdefault(name, {}).update(table)
    path.write_text(toml_text(base))
    return path


def env_without_relay() -> dict[str, str]:
    """This process's environment less RELAY_* variables: a developer's own must not leak into a test."""
    return {name: value for name, value in os.environ.items() if not name.upper().startswith("RELAY_")}


def clear_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same for this process (RELAY_* variables are config), for the test's length."""
    for name in list(os.environ):
        if name.upper().startswith("RELAY_"):
            monkeypatch.delenv(name)
