"""Spool start-up (issues 3 and 18): how long a relay takes to listen over a spool of N queued messages,
how long until it has read them all, and its memory.

The spool is built with the relay's own `Spool.commit` and `prepare` (so the files are exactly what a
running relay writes), with fsync turned into a no-op while building and one `os.sync()` at the end:
50,000 fsyncs would only measure the disk. Then, against a closed upstream port so nothing is
delivered:
  - baseline: `os.scandir` of queue/ plus reading each file's first line (what start-up used to do
    before listening, at the least);
  - `Relay(settings).start()` in this process, until it returns (it has logged relay_listening by then),
    the figure issue 18 asks for, and until the queue is read (spool_loaded; before issue 18 that was
    before listening);
  - `python -m relay serve` as a new process, until its port accepts (its RSS then), and until it has
    read the queue (its peak RSS, VmHWM, then), with this spool and with an empty one.
The page cache is warm for all of them (the files were just written); a cold cache adds disk reads.

BENCH_STARTUP_VARIANTS (comma-separated, default "plain"): "plain" is queue/ files; "sealed" the same
under spool encryption; "journal" the messages as live journal records instead (as after a crash with
that many in their first attempt). BENCH_STARTUP_BASELINE_SRC: another checkout (say `git archive` of
an older commit's relay/) whose `relay serve` is measured the same way in the same run, for a before
and after.
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

from bench.common import ROOT, free_port, log
from bench.harness import Harness, Results, Scenario, Verdict, verdict
from bench.load import SENDER, body, message_bytes
from bench.relayproc import RelayProcess

VARIANTS = ("plain", "sealed", "journal")


def build_spool(path: Path, count: int, variant: str = "plain") -> dict[str, Any]:
    from relay.config import PolicySettings
    from relay.core.keys import parse_key
    from relay.core.message import Envelope, Received
    from relay.core.prepare import prepare
    from relay.store.journal import message_record
    from relay.store.sealing import Sealer, new_key
    from relay.store.spool import Spool, make_private_dir

    policy = PolicySettings(rules=[{"headers": {"X-IB-Tracking-Url": "https://hooks.example.com/ib/track"}}])
    sealer = None
    if variant == "sealed":
        key = new_key()
        (path.parent / f"{path.name}.key").write_text(key + "\n")
        sealer = Sealer([parse_key(key)])
    spool = Spool(path, sealer)
    spool.create()
    make_private_dir(spool.journal_dir)
    segment = open(spool.journal_dir / f"{1:012d}.log", "wb")  # noqa: SIM115  (journal variant only)
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
            if variant == "journal":  # what the journal's writer thread appends (one segment: fine to read)
                segment.write(b"".join(message_record(None, envelope, prepared)))
            else:
                spool.commit(prepared, envelope)
    finally:
        os.fsync = real_fsync
        segment.close()
    os.sync()
    if variant != "journal":  # the files are what the relay reads back: check one
        first = spool.queued_ids()[0]
        envelope, data = spool.read(first)
        assert envelope.queue_id == first and data.startswith(b"X-IB-Tracking-Url"), "spool format check failed"
        sizes = [entry.stat().st_size for entry in os.scandir(spool.queue)][:1000]
    else:
        sizes = [os.path.getsize(segment.name) // count]
    return {
        "messages": count,
        "variant": variant,
        "build_seconds": round(time.monotonic() - started, 2),
        "file_bytes_avg": round(sum(sizes) / len(sizes)),
    }


def key_file(spool_path: Path) -> Path | None:
    path = spool_path.parent / f"{spool_path.name}.key"
    return path if path.exists() else None


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

    key = key_file(spool_path)
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
        spool={
            "enabled": True,
            "path": str(spool_path),
            "drain_timeout": 0,
            **({"encryption_key_file": str(key)} if key else {}),
        },
        http={"host": "127.0.0.1", "port": 0},
    )
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        relay = Relay(settings)
        await relay.start()
        seconds = time.monotonic() - started
        depth = relay.delivery.depth if relay.delivery else 0
        while not any(e.get("event") == "spool_loaded" for e in logs) and time.monotonic() - started < 120:
            await asyncio.sleep(0.01)
        loaded = time.monotonic() - started
        with contextlib.suppress(Exception):
            await relay.stop(grace=0)
    recovered = next((e for e in logs if e.get("event") == "spool_recovered"), {})
    return {
        "seconds": round(seconds, 3),
        "loaded_seconds": round(loaded, 3),
        "spool_recovered_seconds": recovered.get("seconds"),
        "recovered_messages": recovered.get("messages"),
        "from_journal": recovered.get("from_journal"),
        "queued_after_start": depth,
    }


def memory_mb(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (the peak so far) of a process, in MB."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                found[name] = round(int(value.split()[0]) / 1024, 1)
    return found


async def subprocess_start(workdir: Path, name: str, spool_path: Path | None, source: Path = ROOT) -> dict[str, Any]:
    """`relay serve` from `source`: seconds to listening and RSS then; seconds until the queue is read
    (a relay that reads it before listening: the same) and the peak RSS by then."""
    key = key_file(spool_path) if spool_path is not None else None
    relay = RelayProcess(
        workdir,
        name,
        upstream_port=free_port(),
        upstream={"username": "bench", "password": "bench", "ca_file": ""},
        spool=True,
        pool_size=10,
        log_level="info",
        overrides={"spool": {"encryption_key_file": str(key)}} if key else None,
        source=source,
    )
    if spool_path is not None:
        relay.spool_path.symlink_to(spool_path, target_is_directory=True)
    await relay.start()
    at_listening = memory_mb(relay.pid)
    loads_later = "spool_loaded" in (source / "relay" / "delivery" / "recovery.py").read_text()
    waited = time.monotonic()
    while loads_later and not relay.log_events("spool_loaded") and time.monotonic() - waited < 120:
        await asyncio.sleep(0.02)
    loaded = relay.startup_seconds + (time.monotonic() - waited if loads_later else 0.0)
    at_loaded = memory_mb(relay.pid)
    await relay.stop()
    return {
        "seconds": round(relay.startup_seconds, 3),
        "rss_listening_mb": at_listening["VmRSS"],
        "loaded_seconds": round(loaded, 3),
        "rss_loaded_mb": at_loaded["VmRSS"],
        "rss_peak_mb": at_loaded["VmHWM"],
    }


async def measure_startup(workdir: Path, count: int, variant: str, baseline_src: Path | None) -> dict[str, Any]:
    spool_path = workdir / f"startup-spool-{variant}"
    result: dict[str, Any] = {"build": await asyncio.to_thread(build_spool, spool_path, count, variant)}
    scan_seconds, files = await asyncio.to_thread(scan_baseline, spool_path / "queue")
    result["baseline_scan_seconds"] = round(scan_seconds, 3)
    result["baseline_files"] = files
    if baseline_src is not None:  # first, while the journal variant's records are all still live
        before = await subprocess_start(workdir, f"startup-before-{variant}", spool_path, baseline_src)
        result["process_before"] = before | {"src": str(baseline_src)}
    # On a standard asyncio loop of its own (the bench's loop may be uvloop; the relay's is not).
    result["relay_start"] = await asyncio.to_thread(asyncio.run, in_process_start(spool_path))
    # in_process_start ran for a moment against a closed upstream; the queue is intact (nothing sent).
    result["process"] = await subprocess_start(workdir, f"startup-proc-{variant}", spool_path)
    result["process_empty"] = await subprocess_start(workdir, f"startup-empty-{variant}", None)
    result["ratio_to_baseline"] = round(result["relay_start"]["seconds"] / max(scan_seconds, 1e-9), 2)
    return result


async def run(harness: Harness, results: Results) -> None:
    count = harness.args.spool_messages
    variants = [v for v in os.environ.get("BENCH_STARTUP_VARIANTS", "plain").split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise ValueError(f"BENCH_STARTUP_VARIANTS: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    src = os.environ.get("BENCH_STARTUP_BASELINE_SRC")
    baseline_src = Path(src).resolve() if src else None
    out: dict[str, Any] = {}
    for variant in variants:
        log(f"== spool start-up with {count} queued messages, {variant} (building the spool first)")
        out[variant] = st = await measure_startup(harness.workdir, count, variant, baseline_src)
        for line in lines(st):
            log("   " + line)
    results["startup"] = out


def lines(st: dict[str, Any]) -> list[str]:
    rs, proc, empty = st["relay_start"], st["process"], st["process_empty"]
    said = [
        f"{st['build']['messages']} messages, {st['build']['variant']} (built in {st['build']['build_seconds']} s); "
        f"baseline scandir + first lines: {st['baseline_scan_seconds']} s",
        f"Relay.start() to listening: {rs['seconds']} s = {st['ratio_to_baseline']}x baseline "
        f"(spool_recovered {rs['spool_recovered_seconds']} s, {rs['recovered_messages']} listed, "
        f"{rs['from_journal']} from the journal); queue read after {rs['loaded_seconds']} s",
        f"`relay serve` to listening: {proc['seconds']} s, RSS {proc['rss_listening_mb']} MB; queue read after "
        f"{proc['loaded_seconds']} s, RSS {proc['rss_loaded_mb']} MB (peak {proc['rss_peak_mb']} MB); "
        f"empty spool: {empty['seconds']} s, RSS {empty['rss_listening_mb']} MB",
    ]
    before = st.get("process_before")
    if before:
        said.append(
            f"before ({before['src']}): `relay serve` to listening {before['seconds']} s, RSS "
            f"{before['rss_listening_mb']} MB (peak {before['rss_peak_mb']} MB)"
        )
    return said


def summary(results: Results) -> list[str]:
    out = results.get("startup")
    if not out:
        return []
    found = ["\nSpool start-up:"]
    for st in out.values():
        found += ["  " + line for line in lines(st)]
    return found


def markdown(results: Results) -> list[str]:
    out = results.get("startup")
    if not out:
        return []
    rows = []
    for variant, st in out.items():
        rs, proc, empty = st["relay_start"], st["process"], st["process_empty"]
        rows.append(
            f"| {variant} | {st['baseline_scan_seconds']} | **{rs['seconds']}** | {rs['loaded_seconds']} "
            f"| {proc['seconds']} | {proc['rss_listening_mb']} | {proc['loaded_seconds']} | {proc['rss_peak_mb']} "
            f"| {empty['seconds']} / {empty['rss_listening_mb']} |"
        )
        before = st.get("process_before")
        if before:
            rows.append(
                f"| {variant}, before | | | | {before['seconds']} | {before['rss_listening_mb']} "
                f"| {before['loaded_seconds']} | {before['rss_peak_mb']} | |"
            )
    first = next(iter(out.values()))
    return [
        f"Spool of {first['build']['messages']} queued messages ({first['build']['file_bytes_avg']} bytes a message "
        "on average), warm page cache; seconds, and MB of RSS:",
        "",
        "| spool | baseline scandir + first lines | `Relay.start()` to listening | … queue read "
        "| `relay serve` to listening | RSS then | … queue read | peak RSS | empty spool: s / RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
    ]


def targets(results: Results, args: argparse.Namespace) -> list[Verdict]:
    out = results.get("startup")
    if not out:
        return []
    found = []
    for variant, st in out.items():
        rs, proc = st["relay_start"], st["process"]
        found.append(
            verdict(
                f"issue 18: {st['build']['messages']} queued messages ({variant}): listening in under 1 s, "
                "under 150 MB",
                rs["seconds"] < 1 and proc["rss_peak_mb"] < 150,
                f"Relay.start() {rs['seconds']} s (baseline scan {st['baseline_scan_seconds']} s); "
                f"`relay serve` peak RSS {proc['rss_peak_mb']} MB, to listening {proc['seconds']} s "
                f"(empty spool {st['process_empty']['seconds']} s)",
            )
        )
    return found


SCENARIO = Scenario("startup", run, title="Spool start-up", summary=summary, markdown=markdown, targets=targets)
