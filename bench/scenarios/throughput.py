"""Throughput at each RTT: rounds of every config in turn (the order rotated each round), so the machine's
noise hits all alike and each round's ratios are taken between measurements a few seconds apart."""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import fmt, label, log
from bench.harness import Harness, Results, Scenario, Verdict, start_targets, stop_targets, verdict
from bench.measure import add_ratios, aggregate, line, measure_each


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    out = results.setdefault("throughput", {})
    for rtt in args.rtt_ms:
        per_client = args.messages if rtt == 0 else args.messages_rtt
        rounds = args.rounds if rtt == 0 else args.rounds_rtt
        log(
            f"== throughput at {rtt:g} ms RTT: {rounds} rounds x {args.clients} clients x {per_client} messages "
            f"= {rounds * args.clients * per_client} messages per config"
        )
        targets = await start_targets(harness, rtt, f"tp-{rtt:g}ms")
        runs: dict[str, list[dict[str, Any]]] = {c: [] for c in args.configs}
        errors: dict[str, str] = {}
        try:
            for index in range(rounds):
                shift = index % len(args.configs)
                order = args.configs[shift:] + args.configs[:shift]
                load = {"clients": args.clients, "messages": per_client, "warmup": args.warmup}
                async for config, m in measure_each(harness, targets, order, errors, **load):
                    m["round"] = index + 1
                    runs[config].append(m)
                    log(f"   round {index + 1} {label(config)}: {line(m)}")
        finally:
            await stop_targets(targets)
        row: dict[str, Any] = {}
        for config in args.configs:
            target = targets[config]
            if target is None:
                row[config] = harness.skipped()
            elif config in errors and not runs[config]:
                row[config] = {"error": errors[config]}
            else:
                row[config] = aggregate(runs[config]) | target.notes
                if config in errors:
                    row[config]["error"] = errors[config]
        add_ratios(row, runs)
        for config, m in row.items():
            if "delivered_per_s" in m:
                log(f"   => {label(config)}: {line(m)}")
        out[f"{rtt:g}"] = row


def summary(results: Results) -> list[str]:
    lines: list[str] = []
    for rtt, row in results.get("throughput", {}).items():
        lines += [
            f"\nThroughput at {rtt} ms RTT",
            f"{'':34} {'accepted/s':>10} {'delivered/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'conns':>9} "
            f"{'peak RSS MB':>11} {'vs (a)':>6} {'vs (d)':>6} {'CPU ms/msg':>10} {'busy':>5}",
        ]
        for config, m in row.items():
            if "delivered_per_s" not in m:
                lines.append(f"{label(config):34} {m.get('skipped') or m.get('error')}")
                continue
            per_round = m.get("upstream_connections_per_round") or [m["upstream_connections"]]
            conns = f"{m['upstream_connections']}/{max(per_round)}"
            lines.append(
                f"{label(config):34} {m['accepted_per_s']:>10} {m['delivered_per_s']:>11} "
                f"{m['latency_p50_ms']!s:>7} {m['latency_p99_ms']!s:>7} {conns:>9} "
                f"{m.get('peak_rss_mb', '-')!s:>11} {m.get('vs_ceiling', '-')!s:>6} {m.get('vs_postfix', '-')!s:>6} "
                f"{m.get('cpu_ms_per_message', '-')!s:>10} {m.get('machine_busy', '-')!s:>5}"
            )
        lines.append(
            "  conns: upstream connections opened in all rounds / most in one round; CPU ms/msg: user+system CPU per "
            "message of the relay process, or of every Postfix process; busy: share of the machine's cores "
            "busy (all processes)"
        )
    return lines


def markdown(results: Results) -> list[str]:
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
            name = label(config, long=True)
            if "delivered_per_s" not in m:
                lines.append(f"| {name} | {m.get('skipped') or m.get('error')} |||||||||")
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
                f"| {name} | {m['accepted_per_s']} | **{m['delivered_per_s']}** ({rounds}) | "
                f"{fmt(m['latency_p50_ms'])} | {fmt(m['latency_p99_ms'])} | {conns} | {fmt(m.get('peak_rss_mb'))} | "
                f"{fmt(m.get('vs_ceiling'))} | {fmt(m.get('vs_postfix'))} | {cpu} | {fmt(m.get('machine_busy'))} |"
            )
        rsets = {c: m.get("upstream_commands", {}).get("RSET", 0) for c, m in row.items() if "upstream_commands" in m}
        rset_text = ", ".join(f"{label(c, long=True)} {n}" for c, n in rsets.items())
        lines += ["", "Upstream RSET commands: " + rset_text, ""]
    return lines


def targets(results: Results, args: argparse.Namespace) -> list[Verdict]:
    """Issue 18: the rate and CPU at 0 ms against Postfix and the ceiling, the wire and its tail at 20 ms,
    and the pool holding."""
    tp = results.get("throughput", {})
    verdicts = _zero_ms(tp.get("0", {}))
    twenty = tp.get("20", {})
    for config in ("relay_on", "relay_off"):
        m = twenty.get(config, {})
        if "delivered_per_s" in m:
            conns = m["upstream_connections_per_round"]
            p50, p99 = m.get("latency_p50_ms") or 0.0, m.get("latency_p99_ms") or 0.0
            tail = round(p99 / p50, 2) if p50 else None
            verdicts.append(
                verdict(
                    f"issue 18: 20 ms RTT, pool of {args.pool_size} ({label(config)}): "
                    ">= 0.95x the pipelined ceiling on <= 10 upstream connections, p99 under 3x the median",
                    m.get("vs_ceiling", 0) >= 0.95 and max(conns) <= 10 and tail is not None and tail < 3,
                    f"{m['delivered_per_s']}/s = {m.get('vs_ceiling')}x the ceiling "
                    f"({twenty.get('ceiling', {}).get('delivered_per_s')}/s), upstream connections per round "
                    f"{conns}, p50 {p50} ms, p99 {p99} ms ({tail}x)",
                )
            )
    for rtt_key, row in tp.items():
        for config in ("relay_on", "relay_off"):
            m = row.get(config, {})
            if m.get("delivered", 0) + m.get("clients", 0) * args.warmup >= 10_000:
                verdicts.append(_pool_held(m, config, rtt_key, args))
    return verdicts


def _zero_ms(zero: dict[str, Any]) -> list[Verdict]:
    on = zero.get("relay_on", {})
    if "delivered_per_s" not in on:
        return []
    pf = zero.get("postfix", {})
    vs_pf = on.get("vs_postfix")
    vs_c = on.get("vs_ceiling")
    pf_text = f"{vs_pf}x Postfix ({pf.get('delivered_per_s')}/s)" if vs_pf else "Postfix not measured"
    met = (vs_c is not None and vs_c >= 0.5) and (vs_pf is None or vs_pf >= 2.5)
    out = [
        verdict(
            "issue 18: 0 ms RTT, spool on: delivered >= 0.5x the ceiling and >= 2.5x Postfix",
            met if vs_pf is not None else (False if vs_c is not None and vs_c < 0.5 else None),
            f"{on['delivered_per_s']}/s = {pf_text}, {vs_c}x the ceiling "
            f"({zero.get('ceiling', {}).get('delivered_per_s')}/s)",
        )
    ]
    relay_cpu, postfix_cpu = on.get("cpu_ms_per_message"), pf.get("cpu_ms_per_message")
    ratio = round(relay_cpu / postfix_cpu, 3) if relay_cpu and postfix_cpu else None
    out.append(
        verdict(
            "issue 18: relay CPU per delivered message (spool on, 0 ms) <= 0.5x Postfix's (all its processes)",
            None if ratio is None else ratio <= 0.5,
            f"relay {relay_cpu} ms, Postfix {postfix_cpu} ms per message ({ratio}x)",
        )
    )
    return out


def _pool_held(m: dict[str, Any], config: str, rtt_key: str, args: argparse.Namespace) -> Verdict:
    closes = m.get("upstream_idle_closes", 0)
    per_round = m.get("upstream_connections_per_round") or [m["upstream_connections"]]
    return verdict(
        f"10,000 messages use no more than pool_size ({args.pool_size}) upstream connections, "
        f"barring upstream-initiated closes ({label(config)}, {rtt_key} ms RTT)",
        m["upstream_connections"] <= args.pool_size + closes and max(per_round) <= args.pool_size,
        f"{m['delivered']} timed + {m['clients'] * args.warmup * m.get('rounds', 1)} warm-up messages "
        f"over {m['upstream_connections']} connections (per round {per_round}); the stand-in closed "
        f"{closes} of them for idling between rounds",
    )


SCENARIO = Scenario(
    "throughput",
    run,
    title="Throughput, latency, connections, RSS",
    summary=summary,
    markdown=markdown,
    targets=targets,
)
