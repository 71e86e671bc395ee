"""python -m bench.outcomes: LAN throughput with delivery reports on against off, in the same run, and
the message history's size per message.

Two relay processes on the same spool settings, one with `[reports]` on (its history written for every
message, the stand-in's HTTPS reports endpoint polled every second, so reports are applied during the
load) and one without. Rounds alternate between them (off, on, off, on, ...) so that the shared
machine's noise falls on both alike. Figures: messages per second per round and in all, the ratio, and
the history file's size divided by the messages in it (after the relay stopped and SQLite folded its WAL).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import tempfile
from pathlib import Path
from typing import Any

from bench.common import log, run_loop
from bench.load import Load, run_load
from bench.relayproc import RelayProcess
from relay.testing.standin import InfobipStandIn


async def measure(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    standin = InfobipStandIn()
    await standin.start()
    await standin.reports.start()
    upstream = {"username": standin.username, "password": standin.password, "ca_file": str(standin.ca_file)}
    reports = {
        "reports": {
            "enabled": True,
            "base_url": standin.reports.base_url,
            "api_key": standin.reports.api_key,
            "ca_file": str(standin.ca_file),
            "poll_interval": 1.0,
        }
    }
    relays = {
        "reports_off": RelayProcess(workdir, "off", upstream_port=standin.port, upstream=upstream, spool=True,
                                    pool_size=args.pool_size),
        "reports_on": RelayProcess(workdir, "on", upstream_port=standin.port, upstream=upstream, spool=True,
                                   pool_size=args.pool_size, overrides=reports),
    }  # fmt: skip
    rates: dict[str, list[float]] = {name: [] for name in relays}
    cpu: dict[str, float] = dict.fromkeys(relays, 0.0)
    sent: dict[str, int] = dict.fromkeys(relays, 0)
    try:
        for relay in relays.values():
            await relay.start()
        per_client = args.messages // args.rounds // args.clients
        for round_ in range(args.rounds):
            for name, relay in relays.items():
                before = cpu_seconds(relay.pid)
                result = await run_load(Load("127.0.0.1", relay.port, args.clients, per_client, warmup=2))
                cpu[name] += cpu_seconds(relay.pid) - before
                rate = result.accepted / (result.finished - result.started)
                rates[name].append(rate)
                sent[name] += result.accepted
                log(f"round {round_ + 1} {name}: {result.accepted} accepted, {rate:.0f} msg/s, {result.failed} failed")
        await asyncio.sleep(2 * 1.0)  # one more poll or two, so the last reports land too
    finally:
        for relay in relays.values():
            await relay.stop()
        await standin.stop()
    figures = summary(rates, sent, relays["reports_on"].spool_path / "history.sqlite3")
    figures["relay_cpu_ms_per_message"] = {name: round(1000 * cpu[name] / max(1, sent[name]), 3) for name in relays}
    return figures


def cpu_seconds(pid: int) -> float:
    """User + system CPU of a process so far (all its threads), from /proc: robust on a shared machine
    where wall-clock rates swing with the neighbours' load."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summary(rates: dict[str, list[float]], sent: dict[str, int], history: Path) -> dict[str, Any]:
    db = sqlite3.connect(f"file:{history}?mode=ro", uri=True)
    messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
    final = db.execute("SELECT count(*) FROM recipients WHERE status = 'delivered'").fetchone()[0]
    db.close()
    size = sum(p.stat().st_size for p in history.parent.glob(history.name + "*"))
    off, on = statistics.median(rates["reports_off"]), statistics.median(rates["reports_on"])
    return {
        "messages": sent,
        "msg_per_s_by_round": {k: [round(r) for r in v] for k, v in rates.items()},
        "median_msg_per_s": {"reports_off": round(off), "reports_on": round(on)},
        "on_over_off": round(on / off, 3),
        "history_messages": messages,
        "history_delivered_recipients": final,
        "history_bytes": size,
        "history_bytes_per_message": round(size / max(1, messages)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.outcomes", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=10000, help="messages per config in all (default 10000)")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds per config (default 4)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent client connections (default 10)")
    parser.add_argument("--pool-size", type=int, default=10, help="relay upstream.pool_size (default 10)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="relay-bench-outcomes-") as tmp:
        figures = run_loop(lambda: measure(args, Path(tmp)), use_uvloop=False)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
