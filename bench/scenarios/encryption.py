"""Spool encryption at rest (issue 15): LAN throughput with `spool.encryption_key_file` set against the same
relay without it, in the same run. Target: at least 0.9x.

    python -m bench --only encryption [--quick]

Two relay processes (spool on, the bench's usual config) against the harness's stand-in at 0 ms RTT; rounds
alternate between them (off, on, then on, off, ...) so the shared machine's noise falls on both alike. Each
round's ratio is on/off of messages accepted per second; the figure is the median of those ratios. The
relay's own CPU per message (user + system, all threads, from /proc) is reported beside it: on a busy
machine it is the steadier measure. Two body sizes: the usual 600-byte message and a 100 KB one (sealing
costs more per byte than a CRC).
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

from bench.common import log
from bench.harness import Harness, Results, Scenario, Verdict, verdict
from bench.load import Load, run_load
from bench.relayproc import RelayProcess
from relay.store.sealing import new_key

TARGET = 0.9


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _case(harness: Harness, relays: dict[str, RelayProcess], body_size: int) -> dict[str, Any]:
    args = harness.args
    rounds = 2 if args.quick else 6
    per_client = 50 if args.quick else 150
    rates: dict[str, list[float]] = {name: [] for name in relays}
    cpu = dict.fromkeys(relays, 0.0)
    sent = dict.fromkeys(relays, 0)
    for index in range(rounds):
        order = list(relays) if index % 2 == 0 else list(reversed(relays))
        for name in order:
            relay = relays[name]
            before = cpu_seconds(relay.pid)
            load = Load("127.0.0.1", relay.port, args.clients, per_client, warmup=2, body_size=body_size)
            result = await run_load(load)
            cpu[name] += cpu_seconds(relay.pid) - before
            rate = result.accepted / max(1e-9, result.finished - result.started)
            rates[name].append(rate)
            sent[name] += result.accepted
            log(f"   round {index + 1} {name} ({body_size} B): {result.accepted} accepted, {rate:.0f} msg/s")
    ratios = [on / off for on, off in zip(rates["encrypted"], rates["plain"], strict=True) if off]
    return {
        "body_bytes": body_size,
        "rounds": rounds,
        "messages_per_round": args.clients * per_client,
        "per_s": {name: round(statistics.median(values), 1) for name, values in rates.items()},
        "ratio_per_round": [round(r, 3) for r in ratios],
        "ratio": round(statistics.median(ratios), 3),
        "cpu_ms_per_message": {name: round(1000 * cpu[name] / max(1, sent[name]), 3) for name in relays},
    }


async def run(harness: Harness, results: Results) -> None:
    key = harness.workdir / "spool.key"
    key.write_text(new_key() + "\n")
    common = {
        "upstream_port": harness.upstream["port"],
        "upstream": harness.upstream,
        "spool": True,
        "pool_size": harness.args.pool_size,
        "log_level": "warning",
    }
    relays = {
        "plain": RelayProcess(harness.workdir, "encryption-off", **common),
        "encrypted": RelayProcess(
            harness.workdir, "encryption-on", **common, overrides={"spool": {"encryption_key_file": str(key)}}
        ),
    }
    log(f"== encryption at rest: {harness.args.clients} clients, spool on, plain against encrypted")
    try:
        for relay in relays.values():
            await relay.start()
        cases = [await _case(harness, relays, size) for size in (600, 100_000)]
    finally:
        for relay in relays.values():
            await relay.stop()
    results["encryption"] = {"target_ratio": TARGET, "cases": cases}


def summary(results: Results) -> list[str]:
    r = results.get("encryption")
    if not r:
        return []
    lines = [f"Spool encryption at rest, LAN (0 ms RTT), encrypted against plain (target at least {TARGET}x):"]
    for c in r["cases"]:
        lines.append(
            f"  {c['body_bytes']:>7} B body: {c['per_s']['encrypted']} vs {c['per_s']['plain']} msg/s, "
            f"ratio {c['ratio']} (rounds {c['ratio_per_round']}); relay CPU {c['cpu_ms_per_message']['encrypted']} "
            f"vs {c['cpu_ms_per_message']['plain']} ms/message"
        )
    return lines


def targets(results: Results, args: Any) -> list[Verdict]:
    r = results.get("encryption")
    if not r:
        return []
    return [
        verdict(
            f"encrypted spool at least {TARGET}x the plain one's throughput ({c['body_bytes']} B body)",
            c["ratio"] >= TARGET,
            f"{c['ratio']}x ({c['per_s']['encrypted']} vs {c['per_s']['plain']} msg/s)",
        )
        for c in r["cases"]
    ]


SCENARIO = Scenario("encryption", run, "Spool encryption at rest", summary=summary, targets=targets)
