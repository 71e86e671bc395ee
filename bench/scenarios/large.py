"""Large messages (issue 2): the relay's RSS idle, for one message of --large-mb, and for
--large-concurrency of them at once, against the data in flight. Relay configs only."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from bench.common import MB, label, log, reset_hwm
from bench.harness import Harness, Results, Scenario, Target, Verdict, stop_target, verdict
from bench.measure import measure


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    size = args.large_mb * MB
    rtt = args.large_rtt_ms
    log(f"== large messages: {args.large_concurrency} concurrent x {args.large_mb} MB at {rtt:g} ms RTT")
    out: dict[str, Any] = {
        "message_bytes": size,
        "concurrency": args.large_concurrency,
        "rtt_ms": rtt,
        "in_flight_mb": round(args.large_concurrency * size / MB, 1),
    }
    for config in [c for c in args.configs if c.startswith("relay_")]:
        target = await harness.target(config, rtt, f"large-{config}")
        assert target is not None and target.pid is not None
        try:
            out[config] = m = await _one_config(harness, target, size, out["in_flight_mb"])
            log(
                f"   {label(config)}: idle {m['idle_rss_mb']} MB; one {args.large_mb} MB message peaks at "
                f"{m['single_peak_rss_mb']} MB (+{m['single_cost_mb']} MB); {args.large_concurrency} concurrent "
                f"peak {m['concurrent_peak_rss_mb']} MB = {m['concurrent_peak_vs_in_flight']}x the "
                f"{out['in_flight_mb']} MB in flight; delivered {m['concurrent_delivered']}"
            )
        except Exception as exc:
            out[config] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"   {label(config)}: ERROR {exc}")
        finally:
            await stop_target(target)
    results["large"] = out


async def _one_config(harness: Harness, target: Target, size: int, in_flight_mb: float) -> dict[str, Any]:
    import psutil

    args = harness.args
    assert target.pid is not None
    body_size = size - 400  # the headers make up the rest

    async def settled_rss() -> int:
        await asyncio.sleep(1.0)
        return int(psutil.Process(target.pid).memory_info().rss)

    await measure(harness, target, clients=args.clients, messages=1, warmup=1)  # pool warm
    idle = await settled_rss()
    reset_hwm(target.pid)
    single = await measure(harness, target, clients=1, messages=1, warmup=0, body_size=body_size)
    idle_after_single = await settled_rss()
    reset_hwm(target.pid)
    many = await measure(harness, target, clients=args.large_concurrency, messages=1, warmup=0, body_size=body_size)
    idle_after = await settled_rss()
    out = {
        "idle_rss_mb": round(idle / MB, 1),
        "single_peak_rss_mb": single["peak_rss_mb"],
        "single_cost_mb": round(single["peak_rss_mb"] - idle / MB, 1),
        "single_cost_per_message_size": round((single["peak_rss_mb"] - idle / MB) / (size / MB), 2),
        "single_seconds": single["end_to_end_seconds"],
        "idle_rss_after_single_mb": round(idle_after_single / MB, 1),
        "concurrent_peak_rss_mb": many["peak_rss_mb"],
        "concurrent_peak_vs_in_flight": round(many["peak_rss_mb"] / in_flight_mb, 2),
        "concurrent_delivered": many["delivered"],
        "concurrent_failed": many["failed"],
        "concurrent_seconds": many["end_to_end_seconds"],
        "concurrent_latency_max_ms": many["latency_max_ms"],
        "idle_rss_after_mb": round(idle_after / MB, 1),
    }
    if many.get("errors") or single.get("errors"):
        out["errors"] = (single.get("errors") or []) + (many.get("errors") or [])
    return out


def summary(results: Results) -> list[str]:
    large = results.get("large")
    if not large:
        return []
    lines = [
        f"\nLarge messages ({large['concurrency']} x {large['message_bytes'] / MB:g} MB in flight = "
        f"{large['in_flight_mb']} MB)"
    ]
    for config, m in large.items():
        if not isinstance(m, dict):
            continue
        if "error" in m:
            lines.append(f"{label(config):34} ERROR {m['error']}")
            continue
        lines.append(
            f"{label(config):34} idle {m['idle_rss_mb']} MB, one message +{m['single_cost_mb']} MB, "
            f"{large['concurrency']} concurrent peak {m['concurrent_peak_rss_mb']} MB "
            f"({m['concurrent_peak_vs_in_flight']}x in flight)"
        )
    return lines


def markdown(results: Results) -> list[str]:
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
        name = label(config, long=True)
        if "error" in m:
            lines.append(f"| {name} | {m['error']} ||||||")
            continue
        lines.append(
            f"| {name} | {m['idle_rss_mb']} | {m['single_peak_rss_mb']} (+{m['single_cost_mb']}) | "
            f"**{m['concurrent_peak_rss_mb']}** | {m['concurrent_peak_vs_in_flight']}x | "
            f"{m['concurrent_delivered']}/{lg['concurrency']} | {m['concurrent_seconds']} |"
        )
    return [*lines, ""]


def targets(results: Results, args: argparse.Namespace) -> list[Verdict]:
    large = results.get("large", {})
    verdicts = []
    for config in ("relay_off", "relay_on"):
        m = large.get(config, {})
        if "concurrent_peak_rss_mb" in m:
            verdicts.append(
                verdict(
                    f"{large['concurrency']} concurrent {large['message_bytes'] // MB} MB messages "
                    f"({label(config)}): peak RSS < 3x the data in flight",
                    m["concurrent_peak_rss_mb"] < 3 * large["in_flight_mb"]
                    and m["concurrent_delivered"] == large["concurrency"],
                    f"peak {m['concurrent_peak_rss_mb']} MB vs {large['in_flight_mb']} MB in flight "
                    f"({m['concurrent_peak_vs_in_flight']}x); one message costs +{m['single_cost_mb']} MB over idle "
                    f"{m['idle_rss_mb']} MB",
                )
            )
    return verdicts


SCENARIO = Scenario("large", run, title="Large messages", summary=summary, markdown=markdown, targets=targets)
