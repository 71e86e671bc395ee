"""Spool start-up (issue 3): how long a relay takes to come up over a spool of N queued messages.

The spool is built with the relay's own `Spool.commit` and `prepare` (so the files are exactly what a
running relay writes), with fsync turned into a no-op while building and one `os.sync()` at the end:
50,000 fsyncs would only measure the disk. Then, against a closed upstream port so nothing is
delivered:
  - baseline: `os.scandir` of queue/ plus reading each file's first line (the least any recovery does);
  - `Relay(settings).start()` in this process, until it returns (it has logged spool_recovered and
    relay_listening by then), the figure issue 3 asks for;
  - `python -m relay serve` as a new process, until its port accepts, with this spool and with an
    empty one (the difference is the spool's share).
The page cache is warm for all of them (the files were just written); a cold cache adds disk reads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import free_port, log
from bench.harness import Harness, Results, Scenario, Verdict, verdict
from bench.load import SENDER, body, message_bytes
from bench.relayproc import RelayProcess


def build_spool(path: Path, count: int) -> dict[str, Any]:
    from relay.config import PolicySettings
    from relay.core.message import Envelope, Received
    from relay.core.prepare import prepare
    from relay.store.spool import Spool

    policy = PolicySettings(rules=[{"headers": {"X-IB-Tracking-Url": "https://hooks.example.com/ib/track"}}])
    spool = Spool(path)
    spool.create()
    payload = body(600)
    real_fsync = os.fsync
    started = time.monotonic()
    base_ms = int(time.time() * 1000) - count  # queue ids sort by arrival, as the relay makes them
    os.fsync = lambda fd: None  # building only; the relay's own commits are untouched
    try:
        for i in range(count):
            queue_id = f"{base_ms + i:011x}{secrets.token_hex(5)}"
            recipients = (f"customer{i}@example.org",)
            received = Received(
                queue_id=queue_id,
                client_ip="127.0.0.1",
                mail_from=SENDER,
                recipients=recipients,
                data=message_bytes(f"s{i}", list(recipients), payload, ib_headers=False),
                received_at=datetime.now(UTC),
                hostname="relay.bench.test",
            )
            prepared = prepare(received, policy)
            envelope = Envelope(
                queue_id=queue_id,
                mail_from=prepared.mail_from,
                recipients=prepared.recipients,
                message_id=prepared.message_id,
                client_ip="127.0.0.1",
                received_at=time.time(),
                size=prepared.size,
            )
            spool.commit(prepared, envelope)
    finally:
        os.fsync = real_fsync
    os.sync()
    # The files are what the relay reads back: check one.
    first = spool.queued_ids()[0]
    envelope, data = spool.read(first)
    assert envelope.queue_id == first and data.startswith(b"X-IB-Tracking-Url"), "spool format check failed"
    sizes = [entry.stat().st_size for entry in os.scandir(spool.queue)][:1000]
    return {
        "messages": count,
        "build_seconds": round(time.monotonic() - started, 2),
        "file_bytes_avg": round(sum(sizes) / len(sizes)),
    }


def scan_baseline(queue_dir: Path) -> tuple[float, int]:
    started = time.monotonic()
    lines = 0
    for entry in os.scandir(queue_dir):
        if entry.name.endswith(".msg"):
            with open(entry.path, "rb") as handle:
                handle.readline()
            lines += 1
    return time.monotonic() - started, lines


async def in_process_start(spool_path: Path) -> dict[str, Any]:
    import structlog.testing

    from relay.app import Relay
    from relay.config import Settings

    settings = Settings(
        listen={"host": "127.0.0.1", "port": 0, "hostname": "relay.bench.test"},
        upstream={
            "host": "127.0.0.1",
            "port": free_port(),  # nothing listens there: nothing is delivered
            "username": "bench",
            "password": "bench",
            "pool_size": 10,
            "connect_timeout": 1,
        },
        spool={"enabled": True, "path": str(spool_path), "drain_timeout": 0},
        http={"host": "127.0.0.1", "port": 0},
    )
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        relay = Relay(settings)
        await relay.start()
        seconds = time.monotonic() - started
        depth = relay.delivery.queue.depth if relay.delivery else 0
        with contextlib.suppress(Exception):
            await relay.stop(grace=0)
    recovered = next((e for e in logs if e.get("event") == "spool_recovered"), {})
    return {
        "seconds": round(seconds, 3),
        "spool_recovered_seconds": recovered.get("seconds"),
        "recovered_messages": recovered.get("messages"),
        "queued_after_start": depth,
    }


async def subprocess_start(workdir: Path, name: str, spool_path: Path | None) -> float:
    relay = RelayProcess(
        workdir,
        name,
        upstream_port=free_port(),
        upstream={"username": "bench", "password": "bench", "ca_file": ""},
        spool=True,
        pool_size=10,
        log_level="warning",
    )
    if spool_path is not None:
        relay.spool_path.symlink_to(spool_path, target_is_directory=True)
    await relay.start()
    seconds = relay.startup_seconds
    await relay.stop()
    return seconds


async def measure_startup(workdir: Path, count: int) -> dict[str, Any]:
    spool_path = workdir / "startup-spool"
    result: dict[str, Any] = {"build": await asyncio.to_thread(build_spool, spool_path, count)}
    scan_seconds, files = await asyncio.to_thread(scan_baseline, spool_path / "queue")
    result["baseline_scan_seconds"] = round(scan_seconds, 3)
    result["baseline_files"] = files
    # On a standard asyncio loop of its own (the bench's loop may be uvloop; the relay's is not).
    result["relay_start"] = await asyncio.to_thread(asyncio.run, in_process_start(spool_path))
    # in_process_start ran for a moment against a closed upstream; the queue is intact (nothing sent).
    result["process_start_seconds"] = round(await subprocess_start(workdir, "startup-proc", spool_path), 3)
    result["process_start_empty_seconds"] = round(await subprocess_start(workdir, "startup-empty", None), 3)
    result["ratio_to_baseline"] = round(result["relay_start"]["seconds"] / max(scan_seconds, 1e-9), 1)
    return result


async def run(harness: Harness, results: Results) -> None:
    count = harness.args.spool_messages
    log(f"== spool start-up with {count} queued messages (building the spool first)")
    out = await measure_startup(harness.workdir, count)
    log(
        f"   built in {out['build']['build_seconds']} s; baseline scandir + first lines: "
        f"{out['baseline_scan_seconds']} s; Relay.start(): {out['relay_start']['seconds']} s "
        f"(spool_recovered says {out['relay_start']['spool_recovered_seconds']} s for "
        f"{out['relay_start']['recovered_messages']} messages) = {out['ratio_to_baseline']}x baseline; "
        f"`relay serve` process to listening: {out['process_start_seconds']} s "
        f"(empty spool {out['process_start_empty_seconds']} s)"
    )
    results["startup"] = out


def summary(results: Results) -> list[str]:
    st = results.get("startup")
    if not st:
        return []
    return [
        f"\nSpool start-up, {st['build']['messages']} queued messages: Relay.start() "
        f"{st['relay_start']['seconds']} s; baseline scandir+first lines {st['baseline_scan_seconds']} s "
        f"({st['ratio_to_baseline']}x); `relay serve` to listening {st['process_start_seconds']} s "
        f"(empty spool {st['process_start_empty_seconds']} s)"
    ]


def markdown(results: Results) -> list[str]:
    st = results.get("startup")
    if not st:
        return []
    rs = st["relay_start"]
    return [
        f"Spool of {st['build']['messages']} queued messages ({st['build']['file_bytes_avg']} bytes a file on "
        f"average), warm page cache:",
        "",
        "| what | seconds |",
        "|---|---:|",
        f"| baseline: `os.scandir` + first line of each of {st['baseline_files']} files "
        f"| {st['baseline_scan_seconds']} |",
        f"| `Relay(settings).start()` until listening (in-process) | **{rs['seconds']}** |",
        f"| … of which `spool_recovered` (recover + load {rs['recovered_messages']} messages) | "
        f"{rs['spool_recovered_seconds']} |",
        f"| `python -m relay serve` process, spawn to port accepting | {st['process_start_seconds']} |",
        f"| the same with an empty spool | {st['process_start_empty_seconds']} |",
        f"| ratio Relay.start() / baseline | {st['ratio_to_baseline']}x |",
        "",
    ]


def targets(results: Results, args: argparse.Namespace) -> list[Verdict]:
    st = results.get("startup")
    if not st:
        return []
    return [
        verdict(
            f"issue 3: a spool with {st['build']['messages']} queued messages starts up in seconds",
            st["relay_start"]["seconds"] < 10,
            f"Relay.start() {st['relay_start']['seconds']} s (baseline scan {st['baseline_scan_seconds']} s, "
            f"{st['ratio_to_baseline']}x); process to listening {st['process_start_seconds']} s",
        )
    ]


SCENARIO = Scenario("startup", run, title="Spool start-up", summary=summary, markdown=markdown, targets=targets)
