"""One message to many recipients (1000 by default) at 20 ms RTT: first send to the last recipient
accepted upstream, and how many upstream transactions it took."""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import fmt, label, log, median
from bench.harness import Harness, Results, Scenario, Verdict, start_targets, stop_targets, verdict
from bench.measure import measure_each


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    rtt = args.recipients_rtt_ms
    log(f"== {args.recipients} recipients in one message at {rtt:g} ms RTT, {args.recipients_repeats} repeats")
    out: dict[str, Any] = {"rtt_ms": rtt, "recipients": args.recipients}
    targets = await start_targets(harness, rtt, "rcpt")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in targets}
    errors: dict[str, str] = {}
    load = {"clients": 1, "messages": 1, "warmup": 1, "recipients": args.recipients, "deliver_timeout": 60}
    try:
        for _ in range(args.recipients_repeats):
            async for config, m in measure_each(harness, targets, list(targets), errors, **load):
                runs[config].append(m)
    finally:
        await stop_targets(targets)
    for config, target in targets.items():
        if target is None:
            out[config] = harness.skipped()
        elif not runs[config]:
            out[config] = {"error": errors.get(config, "no run")}
        else:
            out[config] = _row(runs[config], args.recipients) | ({"error": errors[config]} if config in errors else {})
            log(
                f"   {label(config)}: median {out[config]['end_to_end_median_s']} s end to end "
                f"(runs {out[config]['end_to_end_seconds']}), {runs[config][-1]['delivered']} upstream transaction(s)"
            )
    base = out.get("postfix", {}).get("end_to_end_median_s")
    for m in out.values():
        if isinstance(m, dict) and m.get("end_to_end_median_s") and base:
            m["vs_postfix"] = round(m["end_to_end_median_s"] / base, 3)
    results["recipients"] = out


def _row(done: list[dict[str, Any]], recipients: int) -> dict[str, Any]:
    e2e = [r["end_to_end_seconds"] for r in done if r["delivered_recipients"] >= recipients]
    return {
        "end_to_end_seconds": [r["end_to_end_seconds"] for r in done],
        "end_to_end_median_s": round(median(e2e), 4) if e2e else None,
        "client_reply_ms": [r["latency_p50_ms"] for r in done],
        "upstream_transactions": [r["delivered"] for r in done],
        "delivered_recipients": [r["delivered_recipients"] for r in done],
        "upstream_connections": [r["upstream_connections"] for r in done],
        "upstream_rset": [r["upstream_commands"].get("RSET", 0) for r in done],
    }


def summary(results: Results) -> list[str]:
    rc = results.get("recipients")
    if not rc:
        return []
    lines = [f"\nOne message to {rc['recipients']} recipients at {rc['rtt_ms']} ms RTT (median end to end)"]
    for config, m in rc.items():
        if isinstance(m, dict):
            lines.append(
                f"{label(config):34} {m.get('end_to_end_median_s', m.get('skipped') or m.get('error'))} s"
                f"  runs {m.get('end_to_end_seconds')}  transactions {m.get('upstream_transactions')}"
                + (f"  {m['vs_postfix']}x Postfix" if "vs_postfix" in m else "")
            )
    return lines


def markdown(results: Results) -> list[str]:
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
        name = label(config, long=True)
        if "end_to_end_median_s" not in m:
            lines.append(f"| {name} | {m.get('skipped') or m.get('error')} ||||")
            continue
        lines.append(
            f"| {name} | **{m['end_to_end_median_s']}** | {', '.join(str(x) for x in m['end_to_end_seconds'])} "
            f"| {', '.join(str(x) for x in m['upstream_transactions'])} | {fmt(m.get('vs_postfix'))} |"
        )
    return [*lines, ""]


def targets(results: Results, args: argparse.Namespace) -> list[Verdict]:
    rc = results.get("recipients", {})
    relay_rc = rc.get("relay_on", {}).get("end_to_end_median_s")
    if relay_rc is None:
        return []
    pf_rc = rc.get("postfix", {}).get("end_to_end_median_s")
    return [
        verdict(
            f"{rc.get('recipients')} recipients at {rc.get('rtt_ms'):g} ms RTT: at most half of Postfix's time",
            (relay_rc <= 0.5 * pf_rc) if pf_rc else None,
            f"relay (spool on) {relay_rc} s, Postfix {pf_rc if pf_rc else 'not measured'} s, "
            f"ceiling {rc.get('ceiling', {}).get('end_to_end_median_s')} s",
        )
    ]


SCENARIO = Scenario("recipients", run, title="1000 recipients", summary=summary, markdown=markdown, targets=targets)
