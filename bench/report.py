"""Markdown tables of every figure in a bench JSON, for docs/PERFORMANCE.md.

    python -m bench.report [bench/results.json]

Nothing here measures: it only formats what `python -m bench` wrote, so the document carries the
run's own numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import ROOT

NAMES = {
    "ceiling": "(a) ceiling: pipelining client → upstream",
    "relay_off": "(b) relay, spool off",
    "relay_on": "(c) relay, spool on",
    "postfix": "(d) Postfix smarthost",
}


def name(config: str) -> str:
    base, _, extra = config.partition("+")
    return NAMES.get(base, base) + (f" [{extra}]" if extra else "")


def fmt(value: Any, suffix: str = "") -> str:
    if value is None or value == "-":
        return "-"
    return f"{value}{suffix}"


def throughput(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for rtt, row in results.get("throughput", {}).items():
        first: dict[str, Any] = next((m for m in row.values() if "rounds" in m), {})
        lines += [
            f"#### {rtt} ms RTT ({first.get('rounds', '?')} interleaved rounds, {first.get('clients', '?')} clients, "
            f"{first.get('messages_sent', '?')} messages per config)",
            "",
            "| config | accepted msgs/s | delivered msgs/s (rounds) | p50 ms | p99 ms | upstream conns "
            "(per round) | peak RSS MB | vs (a) | vs (d) | relay CPU ms/msg (user+sys) | machine busy |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for config, m in row.items():
            if "delivered_per_s" not in m:
                lines.append(f"| {name(config)} | {m.get('skipped') or m.get('error')} |||||||||")
                continue
            rounds = ", ".join(str(x) for x in m.get("delivered_per_s_rounds", []))
            per_round = ", ".join(str(x) for x in m.get("upstream_connections_per_round", []))
            conns = f"{m['upstream_connections']} ({per_round})"
            if m.get("upstream_idle_closes"):
                conns += f"; {m['upstream_idle_closes']} closed idle by the upstream"
            cpu = (
                f"{m['cpu_ms_per_message']} ({m['cpu_user_ms_per_message']}+{m['cpu_system_ms_per_message']})"
                if m.get("cpu_ms_per_message") is not None
                else "-"
            )
            lines.append(
                f"| {name(config)} | {m['accepted_per_s']} | **{m['delivered_per_s']}** ({rounds}) | "
                f"{fmt(m['latency_p50_ms'])} | {fmt(m['latency_p99_ms'])} | {conns} | {fmt(m.get('peak_rss_mb'))} | "
                f"{fmt(m.get('vs_ceiling'))} | {fmt(m.get('vs_postfix'))} | {cpu} | {fmt(m.get('machine_busy'))} |"
            )
        rsets = {c: m.get("upstream_commands", {}).get("RSET", 0) for c, m in row.items() if "upstream_commands" in m}
        lines += ["", "Upstream RSET commands: " + ", ".join(f"{name(c)} {n}" for c, n in rsets.items()), ""]
    return lines


def sweep(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for rtt, per in results.get("sweep", {}).items():
        levels = sorted({int(k) for p in per.values() for k in p if k.isdigit()})
        lines += [
            f"#### delivered msgs/s by concurrency, {rtt} ms RTT (median of rounds)",
            "",
            "| config | " + " | ".join(f"C={c}" for c in levels) + " |",
            "|---|" + "---:|" * len(levels),
        ]
        for config, points in per.items():
            cells = []
            for c in levels:
                m = points.get(str(c), {})
                cells.append(fmt(m.get("delivered_per_s")))
            lines.append(f"| {name(config)} | " + " | ".join(cells) + " |")
        if float(rtt) > 0:
            lines.append("| C / (2 x RTT) | " + " | ".join(f"{c / (2 * float(rtt) / 1000):g}" for c in levels) + " |")
        lines.append("")
    return lines


def recipients(results: dict[str, Any]) -> list[str]:
    rc = results.get("recipients")
    if not rc:
        return []
    lines = [
        f"One message to {rc['recipients']} recipients at {rc['rtt_ms']:g} ms RTT, first send to last upstream "
        "acceptance:",
        "",
        "| config | median s | runs s | upstream transactions | vs (d) |",
        "|---|---:|---|---|---:|",
    ]
    for config, m in rc.items():
        if not isinstance(m, dict):
            continue
        if "end_to_end_median_s" not in m:
            lines.append(f"| {name(config)} | {m.get('skipped') or m.get('error')} ||||")
            continue
        lines.append(
            f"| {name(config)} | **{m['end_to_end_median_s']}** | {', '.join(str(x) for x in m['end_to_end_seconds'])} "
            f"| {', '.join(str(x) for x in m['upstream_transactions'])} | {fmt(m.get('vs_postfix'))} |"
        )
    return [*lines, ""]


def large(results: dict[str, Any]) -> list[str]:
    lg = results.get("large")
    if not lg:
        return []
    lines = [
        f"{lg['concurrency']} concurrent messages of {lg['message_bytes'] / 1e6:g} MB at {lg['rtt_ms']:g} ms RTT "
        f"({lg['in_flight_mb']} MB in flight); RSS of the relay process (MB = 10^6 bytes):",
        "",
        "| config | idle RSS | one message: peak (cost over idle) | 10 concurrent: peak | peak / in flight | "
        "delivered | time s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for config, m in lg.items():
        if not isinstance(m, dict):
            continue
        if "error" in m:
            lines.append(f"| {name(config)} | {m['error']} ||||||")
            continue
        lines.append(
            f"| {name(config)} | {m['idle_rss_mb']} | {m['single_peak_rss_mb']} (+{m['single_cost_mb']}) | "
            f"**{m['concurrent_peak_rss_mb']}** | {m['concurrent_peak_vs_in_flight']}x | "
            f"{m['concurrent_delivered']}/{lg['concurrency']} | {m['concurrent_seconds']} |"
        )
    return [*lines, ""]


def startup(results: dict[str, Any]) -> list[str]:
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


def targets(results: dict[str, Any]) -> list[str]:
    lines = ["| target | verdict | figures |", "|---|---|---|"]
    for v in results.get("targets", []):
        verdict = {True: "**met**", False: "**missed**", None: "n/a"}[v["met"]]
        lines.append(f"| {v['target']} | {verdict} | {v['figures']} |")
    return [*lines, ""]


def render(results: dict[str, Any]) -> str:
    meta = results.get("meta", {})
    head = [
        f"Run of {meta.get('started_at')} (`{meta.get('command')}`), {meta.get('duration_seconds')} s, "
        f"relay at commit {meta.get('git', {}).get('commit')}"
        + (" plus uncommitted changes in relay/" if meta.get("git", {}).get("relay_changes_uncommitted") else "")
        + f"; machine: {meta.get('machine')}",
        "",
    ]
    parts = [
        ("### Throughput, latency, connections, RSS", throughput(results)),
        ("### Concurrency sweep", sweep(results)),
        ("### 1000 recipients", recipients(results)),
        ("### Large messages", large(results)),
        ("### Spool start-up", startup(results)),
        ("### Targets", targets(results)),
    ]
    body = head
    for title, lines in parts:
        if lines:
            body += [title, "", *lines]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("source", nargs="?", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args(argv)
    print(render(json.loads(args.source.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
