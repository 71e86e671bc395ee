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

`--outcomes-profile py-spy` runs both relays under py-spy and prints the frames whose share of the samples
grew most with reports on (the ratio of that run is not the figure: the profiler costs both).
"""

from __future__ import annotations

import asyncio
import sqlite3
import statistics
from pathlib import Path
from typing import Any

from bench.common import log
from bench.harness import Harness, Results, Scenario, Target, Verdict, verdict
from bench.measure import measure
from bench.relayproc import RelayProcess
from bench.scenarios.profiling import summarise_collapsed

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
        figures["profile"] = _profile_diff(relays)
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


def _profile_diff(relays: dict[str, RelayProcess]) -> dict[str, Any]:
    """Inclusive shares of each frame under py-spy, on against off: what reports on adds."""
    shares: dict[str, dict[str, float]] = {}
    for name, relay in relays.items():
        path = relay.profile_out
        if path is None or not path.exists():
            return {"error": f"no py-spy output for {name}"}
        summary = summarise_collapsed(path)
        shares[name] = {row["frame"]: row["share"] for row in summary["inclusive"]}
        shares[name + "_self"] = {row["frame"]: row["share"] for row in summary["self"]}
        log(f"   profile {name}: {path} ({summary['samples']} samples)")
    grown = sorted(
        ((frame, share - shares["reports_off"].get(frame, 0.0)) for frame, share in shares["reports_on"].items()),
        key=lambda item: -item[1],
    )[:40]
    own = sorted(shares["reports_on_self"].items(), key=lambda item: -item[1])[:40]
    for frame, delta in grown:
        log(f"   incl +{delta:6.1%}  {frame}")
    for frame, share in own:
        log(f"   self (on) {share:6.1%}  {frame}")
    return {
        "inclusive_grown": [{"frame": f, "delta": round(d, 4)} for f, d in grown],
        "self_on": [{"frame": f, "share": round(s, 4)} for f, s in own],
    }


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
