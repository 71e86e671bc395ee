"""What the outcome tests share: reports settings pointing at the stand-in, and GET /messages."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp

from relay.app import Relay
from relay.outcomes.sqlite import history_path
from relay.testing.standin import InfobipStandIn
from tests.helpers import spooled


def reports_on(standin: InfobipStandIn, tmp_path: Path, **extra: Any) -> dict[str, Any]:
    settings = {
        "enabled": True,
        "base_url": standin.reports.base_url,
        "api_key": standin.reports.api_key,
        "ca_file": str(standin.ca_file),
        "poll_interval": 0.05,
    }
    return {"spool": spooled(tmp_path), "reports": {**settings, **extra}}


def notify_url(data: bytes) -> str:
    """The X-IB-Notify-Url the relay put on a message (as the stand-in received it)."""
    line = next(line for line in data.split(b"\r\n") if line.startswith(b"X-IB-Notify-Url: "))
    return line.split(b": ", 1)[1].decode()


async def messages(relay: Relay, query: str) -> list[dict[str, Any]]:
    """GET /messages?q= on the ops port, as a program would."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{relay.http.port}/messages", params={"q": query}) as response,
    ):
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return list(body["messages"])


async def statuses(relay: Relay, query: str) -> dict[str, str]:
    found = await messages(relay, query)
    return {r["address"]: r["status"] for m in found for r in m["recipients"]}


async def until_status(relay: Relay, query: str, expected: dict[str, str], timeout: float = 10.0) -> None:
    """Ask GET /messages until the recipients' statuses are `expected` (fails the test on timeout)."""
    deadline = time.monotonic() + timeout
    while (latest := await statuses(relay, query)) != expected:
        assert time.monotonic() < deadline, f"statuses {latest} never became {expected}"
        await asyncio.sleep(0.02)


@contextlib.contextmanager
def history_failing(relay: Relay, writes: str = "INSERT ON events") -> Iterator[None]:
    """These `writes` to the relay's SQLite history fail (as a failing disk would) until the block ends: a
    trigger put in the file by another connection. Storing a report writes a timeline line (INSERT ON events);
    the bounce sender claims a bounce (UPDATE ON bounces)."""
    db = sqlite3.connect(history_path(relay.settings), isolation_level=None, timeout=10)
    db.execute(f"CREATE TRIGGER failing BEFORE {writes} BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    try:
        yield
    finally:
        db.execute("DROP TRIGGER failing")
        db.close()
