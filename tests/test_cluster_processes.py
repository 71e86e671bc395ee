"""Three `relay serve` processes and a real Redis (started here): the cluster-wide messages_per_minute
holds under a load spread over the three, and when Redis is killed mid-load each replica keeps admitting
mail at its share; when Redis is back the shared bucket is used again. Slow (about 20 s): -m slow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from relay.testing.standin import InfobipStandIn
from tests.cluster_services import RedisServer, redis_server
from tests.conftest import Dialog, free_port, message
from tests.test_processes import SpawnRelay, spawn, write_config

__all__ = ["redis_server", "spawn"]  # fixtures, imported for pytest
pytestmark = pytest.mark.slow

BUDGET = 600  # a minute: 10 a second for the cluster, 200 a minute (3.3 a second) for each of 3 alone
SENDER = "billing@erp.example.com"


def cluster_config(path: Path, standin: InfobipStandIn, redis: RedisServer, n: int, port: int) -> Path:
    write_config(path, standin, port=port, spool=path.parent / f"spool-{n}")
    with path.open("a") as config:
        config.write(f'\n[limits]\nmessages_per_minute = {BUDGET}\n\n[cluster]\nredis_url = "{redis.url}"\n')
        config.write(f'node_name = "replica-{n}"\nheartbeat = 0.3\ntimeout = 0.3\n')
    return path


async def mail_load(port: int, accepted: list[float], refused: list[float], stop: asyncio.Event) -> None:
    """MAIL FROM then RSET, about 50 a second: the token is taken at MAIL, so this is the admitted rate."""
    dialog = await Dialog.open(port)
    try:
        await dialog.hello()
        while not stop.is_set():
            reply = await dialog.send(f"MAIL FROM:<{SENDER}>")
            (accepted if reply.startswith("250") else refused).append(time.monotonic())
            if reply.startswith("250"):
                await dialog.send("RSET")
            await asyncio.sleep(0.02)
    finally:
        with contextlib.suppress(OSError):
            await dialog.close()


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def count(times: list[float], start: float, end: float) -> int:
    return sum(start <= t < end for t in times)


async def send_until_accepted(port: int, to: str) -> None:
    """A whole message, tried again while the budget says 451 (as a legacy app's queue would)."""
    deadline = time.monotonic() + 15
    while True:
        dialog = await Dialog.open(port)
        try:
            await dialog.hello()
            reply = await dialog.send(f"MAIL FROM:<{SENDER}>")  # the budget is taken (and may say 451) here
            if reply.startswith("250"):
                assert (await dialog.send(f"RCPT TO:<{to}>")).startswith("250")
                assert (await dialog.send("DATA")).startswith("354")
                reply = await dialog.send(message(to=to) + b".\r\n")
        finally:
            with contextlib.suppress(OSError):
                await dialog.close()
        if reply.startswith("250"):
            return
        assert reply.startswith("451") and time.monotonic() < deadline, reply
        await asyncio.sleep(0.1)


async def test_three_replicas_hold_the_budget_and_fall_back_to_their_share_without_redis(
    standin: InfobipStandIn, redis_server: RedisServer, spawn: SpawnRelay, tmp_path: Path
) -> None:
    ports = [free_port() for _ in range(3)]
    relays = [
        await spawn(cluster_config(tmp_path / f"relay-{n}.toml", standin, redis_server, n, port), port).start()
        for n, port in enumerate(ports)
    ]
    members = redis_server.client()
    await until(lambda: members.zcard("relay:members") == 3)
    accepted: list[list[float]] = [[] for _ in ports]
    refused: list[list[float]] = [[] for _ in ports]
    stop = asyncio.Event()
    loads = [
        asyncio.create_task(mail_load(port, accepted[n], refused[n], stop))
        for n, port in enumerate(ports)
        for _ in "ab"
    ]
    try:
        # The bucket starts full (a burst of BUDGET); from the first refusal on it admits at its rate.
        await until(lambda: all(refused))
        start = max(times[0] for times in refused)
        await asyncio.sleep(6.0)  # the load runs; this is the measurement window, not an assertion
        end = time.monotonic()
        shared = sum(count(times, start, end) for times in accepted)
        assert shared == pytest.approx(BUDGET / 60 * (end - start), rel=0.10)
        assert all(count(times, start, end) for times in accepted)  # all three take from the one bucket

        redis_server.kill()
        killed = time.monotonic()
        await asyncio.sleep(6.0)
        end = time.monotonic()
        share = BUDGET / 3 / 60 * (end - killed)
        alone = [count(times, killed, end) for times in accepted]
        assert alone == [pytest.approx(share, rel=0.25)] * 3, alone  # each its share: mail keeps flowing
        stop.set()
        await asyncio.gather(*loads)
        for n, port in enumerate(ports):  # and whole messages get through, Redis or not
            await send_until_accepted(port, f"fallback-{n}@example.org")
        await standin.wait_for_messages(3, timeout=15)

        redis_server.start()  # the same port, empty: the heartbeats come back, the shared bucket resumes
        await until(lambda: members.zcard("relay:members") == 3)
        await send_until_accepted(ports[0], "back@example.org")
        assert members.exists("relay:budget:messages")
    finally:
        stop.set()
        await asyncio.gather(*loads, return_exceptions=True)
    for relay in relays:
        events = [json.loads(line)["event"] for line in relay.log().splitlines() if line.startswith("{")]
        assert "cluster_redis_unreachable" in events and events.count("cluster_redis_reachable") >= 2
        assert await relay.stop() == 0
