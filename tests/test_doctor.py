"""`relay doctor` when upstream.tls does not fit the port, or nothing answers (issue 13): it names the TLS
step and asks whether upstream.tls is right, and it says what it waits for instead of going silent."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from relay.ops.doctor import doctor
from relay.testing.standin import InfobipStandIn
from tests.conftest import relay_settings

SENDER = "billing@erp.example.com"


@pytest.fixture
async def silent_port() -> AsyncIterator[int]:
    """A port that accepts connections and never says a word (a TLS-first port, as seen by STARTTLS)."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    for writer in held:
        writer.close()
    server.close()
    await server.wait_closed()


async def test_implicit_tls_against_a_starttls_port_fails_as_tls_and_asks_about_upstream_tls(
    standin: InfobipStandIn,
) -> None:
    lines: list[str] = []
    settings = relay_settings(standin, upstream={"tls": "implicit"})
    assert await asyncio.wait_for(doctor(settings, SENDER, None, lines.append), 15) == 1
    out = "\n".join(lines)
    assert "  ok    tcp " in out
    [failed] = [line for line in lines if "FAIL" in line]
    assert failed.startswith("  FAIL  tls      Cannot reach Infobip at localhost:"), out
    assert 'upstream.tls = "implicit" but ' in out and "is upstream.tls right?" in out
    assert "firewall" not in out


async def test_a_silent_port_is_announced_and_named_with_its_likely_cause(
    standin: InfobipStandIn, silent_port: int
) -> None:
    lines: list[str] = []
    settings = relay_settings(standin, upstream={"host": "127.0.0.1", "port": silent_port, "command_timeout": 0.5})
    assert await asyncio.wait_for(doctor(settings, SENDER, None, lines.append), 15) == 1
    assert "  ...   greeting waiting for the 220 greeting (at most 0.5 s)" in lines
    [failed] = [line for line in lines if "FAIL" in line]
    assert failed.startswith("  FAIL  greeting Cannot reach Infobip at 127.0.0.1:") and "timed out" in failed
    assert "sent no SMTP greeting" in lines[-1] and "is upstream.tls right?" in lines[-1]


async def test_the_doctor_waits_at_most_10_s_a_step_and_says_so_first(
    standin: InfobipStandIn, silent_port: int
) -> None:
    """With the relay's 30 s command_timeout: the wait is announced at once, and capped at 10 s."""
    announced = asyncio.Event()
    lines: list[str] = []

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith("  ...   greeting"):
            announced.set()

    settings = relay_settings(standin, upstream={"host": "127.0.0.1", "port": silent_port, "command_timeout": 30})
    task = asyncio.create_task(doctor(settings, SENDER, None, say))
    await asyncio.wait_for(announced.wait(), 5)
    task.cancel()
    assert lines[-1] == "  ...   greeting waiting for the 220 greeting (at most 10 s)"
    with pytest.raises(asyncio.CancelledError):
        await task
