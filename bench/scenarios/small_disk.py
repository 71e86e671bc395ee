"""A small spool volume (a sidecar's emptyDir with a size limit): 20,000 small messages through a relay
whose spool is a 2 MiB tmpfs (needs root to mount). Printed: replies by code (no 452 may appear while the
queue is empty), and the most disk the spool used, sampled after every message."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import Harness, Results, Scenario, Verdict, verdict

SENDER = "billing@erp.example.com"


def _disk_used(path: Path) -> int:
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(FileNotFoundError):
                total += os.stat(os.path.join(directory, name)).st_blocks * 512
    return total


async def _client(port: int, count: int, first: int, replies: Counter[str], most: list[int], spool: Path) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def ask(line: str) -> bytes:
        writer.write(line.encode() + b"\r\n")
        while (reply := await reader.readline())[3:4] == b"-":
            pass
        return reply

    await reader.readline()
    await ask("EHLO bench")
    body = "x" * 76 + "\r\n"
    for n in range(first, first + count):
        await ask(f"MAIL FROM:<{SENDER}>")
        await ask("RCPT TO:<customer@example.org>")
        await ask("DATA")
        data = (
            f"From: ERP <{SENDER}>\r\nTo: <customer@example.org>\r\nMessage-ID: <small-{n}@bench>\r\n"
            f"Subject: small disk\r\n\r\n{body * 24}"
        )
        reply = await ask(data + ".")
        replies[reply[:3].decode()] += 1
        most[0] = max(most[0], _disk_used(spool))
    await ask("QUIT")
    writer.close()


async def run(harness: Harness, results: Results) -> None:
    from relay.app import Relay
    from relay.config import Settings
    from relay.testing.standin import InfobipStandIn

    total = 2000 if harness.args.quick else 20_000
    with tempfile.TemporaryDirectory(prefix="bench-small-disk-") as tmp:
        spool = Path(tmp) / "spool"
        spool.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(spool)]).returncode != 0:
            results["small_disk"] = {"skipped": "needs root to mount a 2 MiB tmpfs"}
            return
        standin = InfobipStandIn()
        await standin.start()
        relay = Relay(
            Settings(
                listen={"host": "127.0.0.1", "port": 0, "hostname": "relay.bench.test"},
                upstream={
                    "host": "localhost",
                    "port": standin.port,
                    "username": standin.username,
                    "password": standin.password,
                    "ca_file": str(standin.ca_file),
                },
                spool={"path": str(spool)},
                http={"enabled": False},
            )
        )
        try:
            await relay.start()
            replies: Counter[str] = Counter()
            most = [0]
            clients = 4
            await asyncio.gather(
                *(_client(relay.port, total // clients, i * total, replies, most, spool) for i in range(clients))
            )
            await relay.stop()
        finally:
            await standin.stop()
            subprocess.run(["umount", "-l", str(spool)], check=False)
        results["small_disk"] = {"messages": total, "replies": dict(replies), "most_disk_bytes": most[0]}


def summary(results: Results) -> list[str]:
    r = results.get("small_disk")
    if not r:
        return []
    if "skipped" in r:
        return [f"small disk: skipped ({r['skipped']})"]
    return [
        f"small disk (2 MiB tmpfs): {r['messages']} messages, replies {r['replies']}, "
        f"most disk the spool used {r['most_disk_bytes'] / 1024:.0f} KiB"
    ]


def targets(results: Results, args: Any) -> list[Verdict]:
    r = results.get("small_disk")
    if not r or "skipped" in r:
        return []
    no_452 = r["replies"].get("452", 0) == 0
    return [verdict("2 MiB spool: no 452 while the queue is empty", no_452, f"replies {r['replies']}")]


SCENARIO = Scenario("small_disk", run, "A 2 MiB spool", summary=summary, targets=targets)
