"""One relay per spool: a second one stops before it touches anything, and says why."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import pytest

from relay.app import Relay
from relay.store.spool import SpoolLocked
from relay.testing.clock import FakeClock
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, free_port, message, relay_settings
from tests.helpers import SENDER, journal_quiet, send_one, spooled, until
from tests.test_processes import write_config


def everything_under(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


async def test_a_second_relay_on_the_same_spool_stops_and_touches_nothing(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    standin.behaviour.down = True  # the first relay keeps its message in the spool
    first = await start_relay(clock=FakeClock(), spool=spooled(tmp_path, sync_wait=0.2))  # no retry while we look
    assert (await send_one(first.port, SENDER, ["a@example.org"], message())).startswith("250 2.0.0 ")
    await until(lambda: journal_quiet(tmp_path / "journal"))  # in queue/, its done mark written: all quiet
    before = everything_under(tmp_path)
    second = Relay(relay_settings(standin, spool=spooled(tmp_path)))
    with pytest.raises(SpoolLocked, match=f"in use by another relay \\(pid {os.getpid()}\\)"):
        await second.start()
    assert everything_under(tmp_path) == before


@pytest.mark.slow  # relay processes
async def test_relay_serve_on_a_spool_in_use_exits_2_and_queue_verbs_still_work(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    await start_relay(spool=spooled(spool))
    config = write_config(tmp_path / "relay.toml", standin, port=free_port(), spool=spool)
    serve = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(serve.communicate(), 20)
    assert serve.returncode == 2
    assert f"spool {spool} is in use by another relay" in err.decode()
    listing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "queue", "--config", str(config), "list", stdout=asyncio.subprocess.PIPE
    )
    await asyncio.wait_for(listing.communicate(), 20)
    assert listing.returncode == 0
