"""Delivered msgs/s against concurrency at each RTT; at each level every config in turn (interleaved).
docs/performance.png is drawn from these figures (bench.plot)."""

from __future__ import annotations

from typing import Any

from bench.common import fmt, label, log
from bench.harness import Harness, Results, Scenario, start_targets, stop_targets
from bench.measure import aggregate, measure_each


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    out = results.setdefault("sweep", {})
    for rtt in args.sweep_rtt_ms:
        log(f"== concurrency sweep at {rtt:g} ms RTT: {args.sweep} clients x {args.sweep_messages} messages")
        targets = await start_targets(harness, rtt, f"sweep-{rtt:g}ms")
        per_rtt: dict[str, Any] = {c: ({} if t is not None else harness.skipped()) for c, t in targets.items()}
        errors: dict[str, str] = {}
        try:
            for clients in args.sweep:
                done: dict[str, list[dict[str, Any]]] = {}
                for round_index in range(args.sweep_rounds):
                    load = {"clients": clients, "messages": args.sweep_messages, "warmup": 1}
                    async for config, m in measure_each(harness, targets, list(targets), errors, **load):
                        m["round"] = round_index + 1
                        done.setdefault(config, []).append(m)
                        log(
                            f"   c={clients} round {round_index + 1} {label(config)}: delivered "
                            f"{m['delivered_per_s']}/s, p50 {m['latency_p50_ms']} ms, "
                            f"{m['upstream_connections_delivering']} conns delivering"
                            + (f", {m['failed']} FAILED" if m["failed"] else "")
                        )
                for config, runs in done.items():
                    per_rtt[config][str(clients)] = aggregate(runs)
        finally:
            await stop_targets(targets)
        for config, error in errors.items():
            per_rtt[config]["error"] = error
        out[f"{rtt:g}"] = per_rtt


def _levels(per: dict[str, Any]) -> list[int]:
    return sorted({int(k) for p in per.values() for k in p if k.isdigit()})


def summary(results: Results) -> list[str]:
    lines: list[str] = []
    for rtt, per in results.get("sweep", {}).items():
        levels = _levels(per)
        lines.append(f"\nDelivered msgs/s by concurrency at {rtt} ms RTT")
        lines.append(f"{'':34} " + " ".join(f"{'c=' + str(c):>8}" for c in levels))
        for config, points in per.items():
            cells = [str(points.get(str(c), {}).get("delivered_per_s", "-")) for c in levels]
            lines.append(f"{label(config):34} " + " ".join(f"{x:>8}" for x in cells))
    return lines


def markdown(results: Results) -> list[str]:
    lines: list[str] = []
    for rtt, per in results.get("sweep", {}).items():
        levels = _levels(per)
        lines += [
            f"#### delivered msgs/s by concurrency, {rtt} ms RTT (median of rounds)",
            "",
            "| config | " + " | ".join(f"C={c}" for c in levels) + " |",
            "|---|" + "---:|" * len(levels),
        ]
        for config, points in per.items():
            cells = [fmt(points.get(str(c), {}).get("delivered_per_s")) for c in levels]
            lines.append(f"| {label(config, long=True)} | " + " | ".join(cells) + " |")
        if float(rtt) > 0:
            lines.append("| C / (2 x RTT) | " + " | ".join(f"{c / (2 * float(rtt) / 1000):g}" for c in levels) + " |")
        lines.append("")
    return lines


SCENARIO = Scenario("sweep", run, title="Concurrency sweep", summary=summary, markdown=markdown)
