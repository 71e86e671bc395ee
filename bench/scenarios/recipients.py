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
    for config, m in out.items():
        if config in runs and isinstance(m, dict) and m.get("end_to_end_median_s"):
            for base, key in (("ceiling", "vs_ceiling"), ("postfix", "vs_postfix")):
                if ratios := _paired(runs[config], runs.get(base, []), args.recipients):
                    m[key], m[key + "_runs"] = round(median(ratios), 3), ratios
    results["recipients"] = out


def _paired(mine: list[dict[str, Any]], base: list[dict[str, Any]], recipients: int) -> list[float]:
    """This config's time over the base's, repeat by repeat (measured seconds apart, so the machine's
    noise hits both alike); a repeat where either lost recipients is left out."""
    return [
        round(a["end_to_end_seconds"] / b["end_to_end_seconds"], 3)
        for a, b in zip(mine, base, strict=False)
        if a["delivered_recipients"] >= recipients and b["delivered_recipients"] >= recipients
    ]


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
                + (f"  {m['vs_ceiling']}x the ceiling" if "vs_ceiling" in m else "")
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
        "| config | median s | runs s | upstream transactions | vs (a) | vs (d) |",
        "|---|---:|---|---|---:|---:|",
    ]
    for config, m in rc.items():
        if not isinstance(m, dict):
            continue
        name = label(config, long=True)
        if "end_to_end_median_s" not in m:
            lines.append(f"| {name} | {m.get('skipped') or m.get('error')} |||||")
            continue
        lines.append(
            f"| {name} | **{m['end_to_end_median_s']}** | {', '.join(str(x) for x in m['end_to_end_seconds'])} "
            f"| {', '.join(str(x) for x in m['upstream_transactions'])} | {fmt(m.get('vs_ceiling'))} "
            f"| {fmt(m.get('vs_postfix'))} |"
        )
    return [*lines, "Ratios: the median of the per-repeat ratios (each repeat measures every config in turn).", ""]


def targets(results: Results, args: argparse.Namespace) -> list[Verdict]:
    """Issue 18: within 1.3x the direct pipelined client's own time, and at most 0.3x Postfix's."""
    rc = results.get("recipients", {})
    on = rc.get("relay_on", {})
    if on.get("end_to_end_median_s") is None:
        return []
    vs_c, vs_pf = on.get("vs_ceiling"), on.get("vs_postfix")
    met = None if vs_c is None else vs_c <= 1.3 and (vs_pf is None or vs_pf <= 0.3)
    return [
        verdict(
            f"{rc.get('recipients')} recipients at {rc.get('rtt_ms'):g} ms RTT: within 1.3x the direct pipelined "
            "client's time and at most 0.3x Postfix's",
            met if vs_pf is not None or met is False else None,
            f"relay (spool on) {on['end_to_end_median_s']} s = {vs_c}x the ceiling "
            f"({rc.get('ceiling', {}).get('end_to_end_median_s')} s), "
            + (f"{vs_pf}x Postfix ({rc['postfix']['end_to_end_median_s']} s)" if vs_pf else "Postfix not measured")
            + "; medians of per-repeat ratios",
        )
    ]


SCENARIO = Scenario("recipients", run, title="1000 recipients", summary=summary, markdown=markdown, targets=targets)
