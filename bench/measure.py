"""One measurement of one target (load, stand-in counters, RSS, CPU), the interleaved rounds every
comparison is made of, and how rounds are summed up and compared."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from bench.common import MB, RssSampler, label, log, median, percentile
from bench.harness import Harness, Target
from bench.load import SENDER, Load, LoadResult, run_load


async def measure(
    harness: Harness,
    target: Target,
    *,
    clients: int,
    messages: int,
    warmup: int,
    recipients: int = 1,
    body_size: int = 600,
    deliver_timeout: float = 300.0,
    senders: tuple[str, ...] = (SENDER,),
) -> dict[str, Any]:
    """`clients` sessions each send `warmup` untimed then `messages` timed messages; the figures are
    taken until the stand-in has every accepted message (or recipient)."""
    control = harness.control
    assert control is not None
    await control.reset()
    base: dict[str, Any] = {}

    async def on_warm() -> None:
        stats = await control.wait_for(clients * warmup, 60)
        base.update(stats)

    sampler: Any = RssSampler(target.pid) if target.pid else contextlib.nullcontext()
    cpu_before = target.cpu_times()
    meter = CpuMeter(
        {
            "standin": harness.upstream.get("pid"),
            "proxy": harness.proxy_pids.get(target.port) or harness.proxy_pids.get(target.upstream_port or 0),
            "client": None,  # this process: the load client (and the RSS sampler thread)
            **({"relay": target.pid} if target.relay is not None else {}),
        }
    )
    load = Load(
        host="127.0.0.1",
        port=target.port,
        clients=clients,
        messages=messages,
        warmup=warmup,
        recipients=recipients,
        body_size=body_size,
        with_ib_headers=target.ib_headers,
        tls=target.tls,
        timeout=deliver_timeout,
        senders=senders,
    )
    with sampler:
        result: LoadResult = await run_load(load, on_warm=on_warm)
        key = "recipients" if recipients > 1 else "messages"
        expected = base[key] + (result.accepted * recipients if key == "recipients" else result.accepted)
        stats = await control.wait_for(expected, deliver_timeout, idle_timeout=30, key=key)
    cpu_after = target.cpu_times()
    cpu_use = meter.stop()
    delivered = stats["messages"] - base["messages"]
    out: dict[str, Any] = {
        "clients": clients,
        "messages_sent": clients * messages,
        "accepted": result.accepted,
        "failed": result.failed,
        "delivered": delivered,
        "delivered_recipients": stats["recipients"] - base["recipients"],
        "accepted_per_s": _rate(result.accepted, result.finished - result.started),
        "delivered_per_s": _rate(delivered, (stats["last"] or 0) - result.started) if delivered else 0.0,
        "accept_seconds": round(result.finished - result.started, 4),
        "end_to_end_seconds": round((stats["last"] or result.started) - result.started, 4),
        "latency_p50_ms": _ms(percentile(result.latencies, 50)),
        "latency_p99_ms": _ms(percentile(result.latencies, 99)),
        "latency_max_ms": _ms(max(result.latencies)) if result.latencies else None,
        "upstream_connections": stats["connections"],
        "upstream_connections_delivering": stats["connections_delivering"],
        "_delivering_idents": stats["delivering_idents"],
        "_idle_closed_idents": stats["idle_closed_idents"],
        "upstream_commands": stats["commands"],
        "upstream_pipelined_share": round(stats["pipelined"] / stats["messages"], 3) if stats["messages"] else None,
        "replies": result.replies,
        "delivered_by_user": _by_user_since(base["by_user"], stats["by_user"]),
        "cpu_use": cpu_use,
        "warmup": warmup,
        "_latencies": result.latencies,
    }
    if target.pid:
        out["peak_rss_mb"] = round(sampler.peak / MB, 1)
        out["rss_samples"] = sampler.samples
    if cpu_before is not None and cpu_after is not None:
        user, system = cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]
        out["cpu_seconds"] = round(user + system, 2)
        out["cpu_user_seconds"], out["cpu_system_seconds"] = round(user, 2), round(system, 2)
        if delivered:  # warm-up messages included: the CPU they used is in the figure too
            per = 1000 / (delivered + clients * warmup)
            out["cpu_ms_per_message"] = round((user + system) * per, 3)
            out["cpu_user_ms_per_message"] = round(user * per, 3)
            out["cpu_system_ms_per_message"] = round(system * per, 3)
    if result.errors:
        out["errors"] = result.errors[:10]
    return out


def _by_user_since(before: dict[str, dict[str, int]], after: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """The stand-in's {AUTH user: {sender domain: messages}} for the timed messages only."""
    out: dict[str, dict[str, int]] = {}
    for user, domains in after.items():
        for domain, count in domains.items():
            if count - before.get(user, {}).get(domain, 0):
                out.setdefault(user, {})[domain] = count - before.get(user, {}).get(domain, 0)
    return out


async def measure_each(
    harness: Harness,
    targets: dict[str, Target | None],
    order: Sequence[str],
    errors: dict[str, str],
    **load: Any,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    """One round: `measure` each config in `order` in turn, skipping those that did not start or failed
    before; a failure is put in `errors` and that config is left out of the later rounds."""
    for config in order:
        target = targets[config]
        if target is None or config in errors:
            continue
        try:
            m = await measure(harness, target, **load)
        except Exception as exc:
            errors[config] = f"{type(exc).__name__}: {exc}"
            log(f"   {label(config)}: ERROR {exc}")
            continue
        yield config, m


class CpuMeter:
    """CPU used during one measurement: the whole machine (share of all cores busy) and, in cores,
    each harness process, so a reader can tell when the 2-core machine itself was the limit."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        import psutil

        self._psutil = psutil
        self._procs = {name: psutil.Process(pid if pid else os.getpid()) for name, pid in pids.items()}
        self._before = {name: self._times(p) for name, p in self._procs.items()}
        self._machine = psutil.cpu_times()
        self._started = time.monotonic()

    def _times(self, proc: Any) -> float:
        try:
            t = proc.cpu_times()
        except self._psutil.Error:
            return 0.0
        return float(t.user + t.system)

    def stop(self) -> dict[str, float]:
        wall = max(time.monotonic() - self._started, 1e-9)
        now = self._psutil.cpu_times()
        total = sum(now) - sum(self._machine)
        idle = (now.idle - self._machine.idle) + (getattr(now, "iowait", 0) - getattr(self._machine, "iowait", 0))
        out = {"machine_busy": round(1 - idle / total, 3) if total > 0 else 0.0}
        for name, proc in self._procs.items():
            out[f"{name}_cores"] = round((self._times(proc) - self._before[name]) / wall, 3)
        return out


def _rate(count: int, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _ms(seconds: float | None) -> float | None:
    if seconds is None or seconds != seconds:
        return None
    return round(seconds * 1000, 2)


def _idle_closes(runs: list[dict[str, Any]]) -> int:
    """How many of this config's upstream connections the stand-in closed for idling (between rounds,
    while other configs ran): each one makes a pool open a replacement, not the pool's fault."""
    mine = {i for r in runs for i in r.get("_delivering_idents", [])}
    closed = set(runs[-1].get("_idle_closed_idents", [])) if runs else set()
    return len(mine & closed)


def _summed(runs: list[dict[str, Any]], key: str) -> dict[str, int]:
    return {name: sum(r[key].get(name, 0) for r in runs) for name in sorted({n for r in runs for n in r[key]})}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one config: rates as the median round (all rounds listed), latency percentiles over
    every message, connections and messages summed, the highest peak RSS."""
    latencies = [x for r in runs for x in r.pop("_latencies", [])]
    out: dict[str, Any] = {
        "rounds": len(runs),
        "clients": runs[0]["clients"],
        "messages_sent": sum(r["messages_sent"] for r in runs),
        "accepted": sum(r["accepted"] for r in runs),
        "failed": sum(r["failed"] for r in runs),
        "delivered": sum(r["delivered"] for r in runs),
        "accepted_per_s": round(median([r["accepted_per_s"] for r in runs]), 1),
        "delivered_per_s": round(median([r["delivered_per_s"] for r in runs]), 1),
        "delivered_per_s_rounds": [r["delivered_per_s"] for r in runs],
        "accepted_per_s_rounds": [r["accepted_per_s"] for r in runs],
        "latency_p50_ms": _ms(percentile(latencies, 50)) if latencies else None,
        "latency_p99_ms": _ms(percentile(latencies, 99)) if latencies else None,
        "latency_max_ms": _ms(max(latencies)) if latencies else None,
        "upstream_connections": sum(r["upstream_connections"] for r in runs),
        "upstream_connections_per_round": [r["upstream_connections"] for r in runs],
        "upstream_idle_closes": _idle_closes(runs),
        "upstream_commands": _summed(runs, "upstream_commands"),
        "replies": _summed(runs, "replies"),
        "cpu_use_rounds": [r["cpu_use"] for r in runs],
    }
    if all("peak_rss_mb" in r for r in runs):
        out["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
    if all("cpu_seconds" in r for r in runs):
        messages = sum(r["delivered"] + r["clients"] * r.get("warmup", 0) for r in runs)
        out["cpu_seconds"] = round(sum(r["cpu_seconds"] for r in runs), 2)
        for key in ("cpu_ms_per_message", "cpu_user_ms_per_message", "cpu_system_ms_per_message"):
            out[key] = round(median([r[key] for r in runs if key in r]), 3) if messages else None
        out["relay_cores"] = median([r["cpu_use"].get("relay_cores", 0.0) for r in runs])
    out["machine_busy"] = median([r["cpu_use"]["machine_busy"] for r in runs])
    errors = [e for r in runs for e in r.get("errors", [])]
    if errors:
        out["errors"] = errors[:10]
    return out


def add_ratios(row: dict[str, Any], runs: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Each config against (a) and (d), and an experiment (`relay_on+...`) against its base config
    (`vs_base`): with rounds, the median of the per-round ratios (each taken between measurements
    seconds apart); without, the ratio of the two rates."""
    for config, m in row.items():
        if "delivered_per_s" not in m:
            continue
        pairs = [("ceiling", "vs_ceiling"), ("postfix", "vs_postfix")]
        if "+" in config:
            pairs.append((config.partition("+")[0], "vs_base"))
        for base_name, key in pairs:
            base = row.get(base_name, {}).get("delivered_per_s")
            if not base:
                continue
            if runs and runs.get(config) and runs.get(base_name):
                by_round = {r["round"]: r["delivered_per_s"] for r in runs[base_name]}
                paired = [r["delivered_per_s"] / by_round[r["round"]] for r in runs[config] if by_round.get(r["round"])]
                if paired:
                    m[key] = round(median(paired), 3)
                    m[key + "_rounds"] = [round(x, 3) for x in paired]
                    continue
            m[key] = round(m["delivered_per_s"] / base, 3)


def line(m: dict[str, Any]) -> str:
    """One measurement (or aggregate) on one line, for the progress log."""
    rss = f", peak RSS {m['peak_rss_mb']} MB" if "peak_rss_mb" in m else ""
    err = f", {m['failed']} FAILED" if m.get("failed") else ""
    vs_base = f", {m['vs_base']}x its base config" if "vs_base" in m else ""
    return (
        f"accepted {m['accepted_per_s']}/s, delivered {m['delivered_per_s']}/s "
        f"({m['delivered']}/{m['messages_sent']}), p50 {m['latency_p50_ms']} ms, p99 {m['latency_p99_ms']} ms, "
        f"{m['upstream_connections']} upstream conns{rss}{err}{vs_base}"
    )
