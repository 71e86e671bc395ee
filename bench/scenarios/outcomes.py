"""Delivery outcomes (issue 14): LAN throughput with `[reports]` on against off, in the same run, and the
message history's size per message. Target: at least 0.9x.

    python -m bench --only outcomes [--outcomes-messages 10000] [--outcomes-rounds 8] [--outcomes-profile py-spy]

Two relay processes, spool on, the bench's usual config, against the harness's stand-in at 0 ms RTT; one
has `[reports]` on (its history written for every message, the stand-in's HTTPS reports endpoint polled every
second, so reports are applied during the load). Rounds alternate (off, on, then on, off, ...) so the shared
machine's noise falls on both alike; each config sends `--outcomes-messages` timed messages in all. A
round's rate is end to end (until the stand-in has the last message), as the throughput phase's; the figure
is the median of the per-round ratios on/off. Relay CPU per message (user + system, all threads, warm-up
messages included) is the steadier measure on a busy machine. The history's size is that of its file (and
WAL) after the relay stopped, divided by the messages in it.

`--outcomes-profile py-spy` runs both relays under py-spy (kept in the workdir with --keep) and prints the
samples per message of each and, in the reports-on relay, those of the outcomes path by hook and by frame
(the ratio of that run is not the figure: the profiler costs both).
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import statistics
from pathlib import Path
from typing import Any

from bench.common import log
from bench.harness import Harness, Results, Scenario, Target, Verdict, verdict
from bench.measure import measure
from bench.relayproc import RelayProcess

TARGET = 0.9
CONFIGS = ("reports_off", "reports_on")
POLL_INTERVAL = 1.0


def relay_pair(harness: Harness, proxy_port: int) -> dict[str, RelayProcess]:
    up = harness.upstream
    reports = {
        "reports": {
            "enabled": True,
            "base_url": up["reports_base_url"],
            "api_key": up["reports_api_key"],
            "ca_file": up["ca_file"],
            "poll_interval": POLL_INTERVAL,
        }
    }
    common: dict[str, Any] = {
        "upstream_port": proxy_port,
        "upstream": up,
        "spool": True,
        "pool_size": harness.args.pool_size,
        "profile": harness.args.outcomes_profile,
    }
    return {
        "reports_off": RelayProcess(harness.workdir, "outcomes-off", **common),
        "reports_on": RelayProcess(harness.workdir, "outcomes-on", overrides=reports, **common),
    }


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    rounds = max(5, args.outcomes_rounds)
    per_client = max(1, args.outcomes_messages // rounds // args.clients)
    port = await harness.proxy(0.0)
    relays = relay_pair(harness, port)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    log(f"== outcomes: reports off against on, {args.clients} clients x {per_client} messages x {rounds} rounds")
    try:
        for relay in relays.values():
            await relay.start()
        targets = {name: Target(name, r.port, pid=r.pid, relay=r, upstream_port=port) for name, r in relays.items()}
        for index in range(rounds):
            for name in CONFIGS if index % 2 == 0 else tuple(reversed(CONFIGS)):
                m = await measure(harness, targets[name], clients=args.clients, messages=per_client, warmup=args.warmup)
                runs[name].append(m)
                log(
                    f"   round {index + 1} {name:>11}: {m['delivered_per_s']:7.1f} msg/s end to end "
                    f"({m['accepted_per_s']:.1f} accepted), {m.get('cpu_ms_per_message')} ms CPU/msg, "
                    f"{m['failed']} failed"
                )
        await asyncio.sleep(3 * POLL_INTERVAL)  # the last reports are polled and applied too
    finally:
        for relay in relays.values():
            await relay.stop()
    figures = _figures(runs)
    figures |= _history(relays["reports_on"].spool_path / "history.sqlite3")
    if args.outcomes_profile == "py-spy":
        figures["profile"] = _outcomes_profile(relays, {n: sum(r["delivered"] for r in runs[n]) for n in runs})
    results["outcomes"] = figures


def _figures(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def per_round(name: str, key: str) -> list[float]:
        return [float(m[key]) for m in runs[name]]

    def ratios(key: str) -> list[float]:
        return [n / f for n, f in zip(per_round("reports_on", key), per_round("reports_off", key), strict=True) if f]

    cpu = {}
    for name in CONFIGS:
        messages = sum(m["delivered"] + m["clients"] * m["warmup"] for m in runs[name])
        cpu[name] = round(1000 * sum(m.get("cpu_seconds", 0.0) for m in runs[name]) / max(1, messages), 3)
    return {
        "target_ratio": TARGET,
        "rounds": len(runs["reports_on"]),
        "messages": {name: sum(m["delivered"] for m in runs[name]) for name in CONFIGS},
        "per_s_rounds": {name: [round(x, 1) for x in per_round(name, "delivered_per_s")] for name in CONFIGS},
        "per_s": {name: round(statistics.median(per_round(name, "delivered_per_s")), 1) for name in CONFIGS},
        "ratio_per_round": [round(r, 3) for r in ratios("delivered_per_s")],
        "ratio": round(statistics.median(ratios("delivered_per_s")), 3),
        "accepted_ratio": round(statistics.median(ratios("accepted_per_s")), 3),
        "cpu_ms_per_message": cpu,
        "cpu_on_over_off": round(cpu["reports_on"] / cpu["reports_off"], 3) if cpu["reports_off"] else None,
        "failed": {name: sum(m["failed"] for m in runs[name]) for name in CONFIGS},
    }


def _history(path: Path) -> dict[str, Any]:
    """The history's messages, recipients a report marked delivered, and bytes (file and WAL, after stop)."""
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        messages = db.execute("SELECT count(*) FROM messages").fetchone()[0]
        delivered = db.execute("SELECT count(*) FROM recipients WHERE status = 'delivered'").fetchone()[0]
    finally:
        db.close()
    size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
    return {
        "history_messages": messages,
        "history_delivered_recipients": delivered,
        "history_bytes": size,
        "history_bytes_per_message": round(size / max(1, messages)),
    }


def _outcomes_profile(relays: dict[str, RelayProcess], messages: dict[str, int]) -> dict[str, Any]:
    """py-spy's samples (wall clock, GIL held) per message in each relay, and in the `reports_on` one those
    of the outcomes path: every stack with a relay/outcomes frame (the history's thread's too). Grouped by
    the first such frame (which hook or task) and by the frame at the top of the stack (what it spends on)."""
    stacks: dict[str, list[tuple[list[str], int]]] = {}
    for name, relay in relays.items():
        path = relay.profile_out
        if path is None or not path.exists():
            return {"error": f"no py-spy output for {name}"}
        stacks[name] = _collapsed(path)
    total = {name: sum(n for _, n in rows) for name, rows in stacks.items()}
    entries: dict[str, int] = {}
    leaves: dict[str, int] = {}
    for frames, count in stacks["reports_on"]:
        first = next((f for f in frames if "relay/outcomes/" in f), None)
        if first is None:
            continue
        first = re.sub(r":\d+\)$", ")", first)  # by function: which hook or task
        entries[first] = entries.get(first, 0) + count
        leaves[frames[-1]] = leaves.get(frames[-1], 0) + count
    attributable = sum(entries.values())
    on_total = max(1, total["reports_on"])

    def top(table: dict[str, int]) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:20]
        return [{"frame": f, "samples": n, "share_of_on": round(n / on_total, 4)} for f, n in rows]

    out: dict[str, Any] = {
        "samples": total,
        "samples_per_message": {name: round(total[name] / max(1, messages[name]), 3) for name in total},
        "outcomes_path_samples": attributable,
        "outcomes_path_share_of_on": round(attributable / on_total, 4),
        "by_entry": top(entries),
        "by_leaf": top(leaves),
    }
    log(
        f"   py-spy samples {total} ({out['samples_per_message']} per message); the outcomes path: "
        f"{attributable} samples, {out['outcomes_path_share_of_on']:.1%} of the reports_on relay's"
    )
    for kind in ("by_entry", "by_leaf"):
        for row in out[kind]:
            log(f"   {kind[3:]:>5} {row['samples']:6d} {row['share_of_on']:6.1%}  {row['frame']}")
    return out


def _collapsed(path: Path) -> list[tuple[list[str], int]]:
    """py-spy's raw output: (frames outermost first, samples) per stack."""
    rows = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            rows.append(([f for f in stack.split(";") if not f.startswith("process ")], int(count)))
    return rows


def summary(results: Results) -> list[str]:
    r = results.get("outcomes")
    if not r:
        return []
    cpu = r["cpu_ms_per_message"]
    return [
        f"Delivery outcomes, LAN (0 ms RTT), reports on against off (target at least {TARGET}x):",
        f"  {r['per_s']['reports_on']} vs {r['per_s']['reports_off']} msg/s end to end, ratio {r['ratio']} "
        f"(rounds {r['ratio_per_round']}; accepted ratio {r['accepted_ratio']})",
        f"    per round on {r['per_s_rounds']['reports_on']}, off {r['per_s_rounds']['reports_off']}",
        f"  relay CPU {cpu['reports_on']} vs {cpu['reports_off']} ms/message ({r['cpu_on_over_off']}x); "
        f"messages {r['messages']}, failed {r['failed']}",
        f"  history: {r['history_messages']} messages, {r['history_delivered_recipients']} recipients delivered "
        f"by report, {r['history_bytes']} bytes = {r['history_bytes_per_message']} bytes/message",
    ]


def targets(results: Results, args: Any) -> list[Verdict]:
    r = results.get("outcomes")
    if not r:
        return []
    return [
        verdict(
            f"reports on at least {TARGET}x reports off's LAN throughput",
            r["ratio"] >= TARGET,
            f"{r['ratio']}x ({r['per_s']['reports_on']} vs {r['per_s']['reports_off']} msg/s)",
        )
    ]


SCENARIO = Scenario("outcomes", run, "Delivery outcomes", summary=summary, targets=targets)
