"""python -m bench: throughput, latency, connections and memory of the relay against its baselines.

Every figure is measured in this one run, and compared with baselines measured in the same run (this
machine is shared and noisy): (a) the ceiling, a pipelining client talking to the upstream directly
through the same delay proxy, and (d) Postfix as a smarthost, when it is installed.

Processes: the Infobip stand-in (bench.upstream) and the delay proxy (bench.proxy) run on their own,
the relay runs as `python -m relay serve --config <generated toml>`, Postfix as its own master, and the
load client in this process. See docs/PERFORMANCE.md for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import postfix as postfix_mod
from bench import spoolstart
from bench.common import (
    PYTHON,
    ROOT,
    Child,
    RssSampler,
    child_env,
    machine_info,
    median,
    percentile,
    reset_hwm,
    run_loop,
    uvloop_available,
)
from bench.load import Load, LoadResult, Tls, run_load
from bench.relayproc import RelayProcess
from bench.upstream import Control

PHASES = ("throughput", "sweep", "recipients", "large", "startup")
BASE_CONFIGS = ("ceiling", "relay_off", "relay_on", "postfix")
LABELS = {
    "ceiling": "(a) ceiling: client -> upstream",
    "relay_off": "(b) relay, spool off",
    "relay_on": "(c) relay, spool on",
    "postfix": "(d) Postfix smarthost",
}
MB = 1_000_000


def label(config: str) -> str:
    base, _, extra = config.partition("+")
    return LABELS.get(base, base) + (f" [{extra}]" if extra else "")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# targets: what runs, on which port


@dataclass
class Target:
    config: str
    port: int
    pid: int | None = None  # the process whose RSS we measure (tree for Postfix)
    tls: Tls | None = None
    ib_headers: bool = False  # the ceiling client sends the headers the relay would add
    stop: Callable[[], Awaitable[Any]] | None = None
    upstream_port: int | None = None  # the proxy port the target sends to (for CPU accounting)
    notes: dict[str, Any] = field(default_factory=dict)
    relay: RelayProcess | None = None

    def cpu_times(self) -> tuple[float, float] | None:
        """(user, system) CPU seconds of the relay process so far (all its threads)."""
        if self.pid is None or self.relay is None:
            return None
        import psutil

        try:
            times = psutil.Process(self.pid).cpu_times()
        except psutil.Error:
            return None
        return float(times.user), float(times.system)


class Harness:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.upstream: dict[str, Any] = {}
        self.control: Control | None = None
        self._children: list[Child] = []
        self._proxies: dict[float, int] = {}
        self.proxy_pids: dict[int, int] = {}  # proxy port -> pid
        self.postfix_skip: str | None = None
        self.extra_env: dict[str, str] = {}

    async def start(self) -> None:
        flags = [] if self.args.harness_uvloop else ["--no-uvloop"]
        standin = Child([PYTHON, "-m", "bench.upstream", *flags], self.workdir / "standin.log", child_env())
        self._children.append(standin)
        self.upstream = await standin.start()
        self.upstream["pid"] = standin.pid
        self.control = Control(self.upstream["control"])
        if "postfix" in self.args.configs:
            self.postfix_skip = postfix_mod.available()

    async def proxy(self, rtt: float) -> int:
        if rtt not in self._proxies:
            flags = [] if self.args.harness_uvloop else ["--no-uvloop"]
            child = Child(
                [
                    PYTHON,
                    "-m",
                    "bench.proxy",
                    "--target-port",
                    str(self.upstream["port"]),
                    "--rtt-ms",
                    str(rtt),
                    *flags,
                ],
                self.workdir / f"proxy-{rtt:g}ms.log",
                child_env(),
            )
            self._children.append(child)
            self._proxies[rtt] = (await child.start())["port"]
            self.proxy_pids[self._proxies[rtt]] = child.pid
        return self._proxies[rtt]

    async def stop(self) -> None:
        if self.control is not None:
            await self.control.close()
        for child in reversed(self._children):
            await child.stop()

    async def target(self, config: str, rtt: float, name: str) -> Target | None:
        """Start what `config` names behind the proxy for `rtt`; None when it cannot run (Postfix)."""
        port = await self.proxy(rtt)
        base, _, extra = config.partition("+")
        if base == "ceiling":
            tls = Tls(self.upstream["ca_file"], self.upstream["username"], self.upstream["password"], "localhost")
            return Target(config, port, tls=tls, ib_headers=True)
        if base in ("relay_off", "relay_on"):
            relay = RelayProcess(
                self.workdir,
                name,
                upstream_port=port,
                upstream=self.upstream,
                spool=base == "relay_on",
                pool_size=self.args.pool_size,
                uvloop="uvloop" in extra.split("+"),
                switch_interval=next(
                    (float(x.split("=", 1)[1]) for x in extra.split("+") if x.startswith("switch=")), None
                ),
                log_level=next((x.split("=", 1)[1] for x in extra.split("+") if x.startswith("log=")), "info"),
                profile=self.args.profile if name.startswith("profile") else None,
            )
            await relay.start()
            return Target(
                config,
                relay.port,
                pid=relay.pid,
                stop=relay.stop,
                relay=relay,
                upstream_port=port,
                notes={"startup_seconds": round(relay.startup_seconds, 3)},
            )
        if base == "postfix":
            if self.postfix_skip is not None:
                return None
            instance = postfix_mod.Postfix(self.workdir, name, upstream_port=port, upstream=self.upstream)
            try:
                await instance.start()
            except Exception as exc:
                self.postfix_skip = f"Postfix could not run: {exc}"
                with contextlib.suppress(Exception):
                    await instance.stop()
                return None
            return Target(config, instance.port, pid=instance.pid, stop=instance.stop, upstream_port=port)
        raise ValueError(f"unknown config {config!r}")


# one measurement


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
) -> dict[str, Any]:
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
    )
    with sampler:
        result: LoadResult = await run_load(load, on_warm=on_warm)
        key = "recipients" if recipients > 1 else "messages"
        expected = base[key] + (result.accepted * recipients if key == "recipients" else result.accepted)
        stats = await control.wait_for(expected, deliver_timeout, idle_timeout=30, key=key)
    cpu_after = target.cpu_times()
    cpu_use = meter.stop()
    delivered = stats["messages"] - base["messages"]
    delivered_rcpts = stats["recipients"] - base["recipients"]
    out: dict[str, Any] = {
        "clients": clients,
        "messages_sent": clients * messages,
        "accepted": result.accepted,
        "failed": result.failed,
        "delivered": delivered,
        "delivered_recipients": delivered_rcpts,
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


class CpuMeter:
    """CPU used during one measurement: the whole machine (share of all cores busy) and, in cores,
    each harness process, so a reader can tell when the 2-core machine itself was the limit."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        import os

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


async def stop_target(target: Target | None) -> None:
    if target is not None and target.stop is not None:
        code = await target.stop()
        if target.relay is not None and code not in (0, None):
            log(f"   note: relay exited with {code}; see {target.relay.log_path}")


# phases


async def start_targets(harness: Harness, rtt: float, prefix: str) -> dict[str, Target | None]:
    """Every config's process at once (idle ones cost nothing), so measurements can be interleaved."""
    targets: dict[str, Target | None] = {}
    for config in harness.args.configs:
        try:
            targets[config] = await harness.target(config, rtt, f"{prefix}-{config}")
        except Exception as exc:
            log(f"   {label(config)}: cannot start: {type(exc).__name__}: {exc}")
            targets[config] = None
        if targets[config] is None and config.startswith("postfix"):
            log(f"   {label(config)}: SKIPPED ({harness.postfix_skip})")
    return targets


async def stop_targets(targets: dict[str, Target | None]) -> None:
    for target in targets.values():
        with contextlib.suppress(Exception):
            await stop_target(target)


async def phase_throughput(harness: Harness, results: dict[str, Any]) -> None:
    """Rounds of every config in turn (order rotated each round): the machine's noise hits all alike,
    and each round's ratios are taken between measurements a few seconds apart."""
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
                order = args.configs[index % len(args.configs) :] + args.configs[: index % len(args.configs)]
                for config in order:
                    target = targets[config]
                    if target is None or config in errors:
                        continue
                    try:
                        m = await measure(
                            harness, target, clients=args.clients, messages=per_client, warmup=args.warmup
                        )
                    except Exception as exc:
                        errors[config] = f"{type(exc).__name__}: {exc}"
                        log(f"   {label(config)}: ERROR {exc}")
                        continue
                    m["round"] = index + 1
                    runs[config].append(m)
                    log(f"   round {index + 1} {label(config)}: {_line(m)}")
        finally:
            await stop_targets(targets)
        row: dict[str, Any] = {}
        for config in args.configs:
            if targets[config] is None:
                row[config] = {"skipped": harness.postfix_skip or "could not start"}
            elif config in errors and not runs[config]:
                row[config] = {"error": errors[config]}
            else:
                row[config] = aggregate(runs[config])
                row[config].update(targets[config].notes)  # type: ignore[union-attr]
                if config in errors:
                    row[config]["error"] = errors[config]
        _add_ratios(row, runs)
        for config, m in row.items():
            if "delivered_per_s" in m:
                log(f"   => {label(config)}: {_line(m)}")
        out[f"{rtt:g}"] = row


def _idle_closes(runs: list[dict[str, Any]]) -> int:
    """How many of this config's upstream connections the stand-in closed for idling (between rounds,
    while other configs ran): each one makes a pool open a replacement, not the pool's fault."""
    mine = {i for r in runs for i in r.get("_delivering_idents", [])}
    closed = set(runs[-1].get("_idle_closed_idents", [])) if runs else set()
    return len(mine & closed)


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
        "upstream_commands": {
            verb: sum(r["upstream_commands"].get(verb, 0) for r in runs)
            for verb in sorted({v for r in runs for v in r["upstream_commands"]})
        },
        "replies": {
            key: sum(r["replies"].get(key, 0) for r in runs) for key in sorted({k for r in runs for k in r["replies"]})
        },
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


def _line(m: dict[str, Any]) -> str:
    rss = f", peak RSS {m['peak_rss_mb']} MB" if "peak_rss_mb" in m else ""
    err = f", {m['failed']} FAILED" if m.get("failed") else ""
    return (
        f"accepted {m['accepted_per_s']}/s, delivered {m['delivered_per_s']}/s "
        f"({m['delivered']}/{m['messages_sent']}), p50 {m['latency_p50_ms']} ms, p99 {m['latency_p99_ms']} ms, "
        f"{m['upstream_connections']} upstream conns{rss}{err}"
    )


def _add_ratios(row: dict[str, Any], runs: dict[str, list[dict[str, Any]]] | None = None) -> None:
    """Each config against (a) and (d): with rounds, the median of the per-round ratios (each taken
    between measurements seconds apart); without, the ratio of the two rates."""
    for base_name, key in (("ceiling", "vs_ceiling"), ("postfix", "vs_postfix")):
        base = row.get(base_name, {}).get("delivered_per_s")
        for config, m in row.items():
            if "delivered_per_s" not in m or not base:
                continue
            if runs and runs.get(config) and runs.get(base_name):
                by_round = {r["round"]: r["delivered_per_s"] for r in runs[base_name]}
                paired = [r["delivered_per_s"] / by_round[r["round"]] for r in runs[config] if by_round.get(r["round"])]
                if paired:
                    m[key] = round(median(paired), 3)
                    m[key + "_rounds"] = [round(x, 3) for x in paired]
                    continue
            m[key] = round(m["delivered_per_s"] / base, 3)


async def phase_sweep(harness: Harness, results: dict[str, Any]) -> None:
    """Delivered msgs/s against concurrency; at each level every config in turn (interleaved)."""
    args = harness.args
    out = results.setdefault("sweep", {})
    for rtt in args.sweep_rtt_ms:
        log(f"== concurrency sweep at {rtt:g} ms RTT: {args.sweep} clients x {args.sweep_messages} messages")
        targets = await start_targets(harness, rtt, f"sweep-{rtt:g}ms")
        per_rtt: dict[str, Any] = {
            c: ({} if t is not None else {"skipped": harness.postfix_skip or "could not start"})
            for c, t in targets.items()
        }
        try:
            for clients in args.sweep:
                for round_index in range(args.sweep_rounds):
                    for config, target in targets.items():
                        if target is None or "error" in per_rtt[config]:
                            continue
                        try:
                            m = await measure(harness, target, clients=clients, messages=args.sweep_messages, warmup=1)
                        except Exception as exc:
                            per_rtt[config]["error"] = f"{type(exc).__name__}: {exc}"
                            log(f"   {label(config)}: ERROR {exc}")
                            continue
                        m["round"] = round_index + 1
                        per_rtt[config].setdefault(f"_{clients}", []).append(m)
                        log(
                            f"   c={clients} round {round_index + 1} {label(config)}: delivered "
                            f"{m['delivered_per_s']}/s, p50 {m['latency_p50_ms']} ms, "
                            f"{m['upstream_connections_delivering']} conns delivering"
                            + (f", {m['failed']} FAILED" if m["failed"] else "")
                        )
                for config in targets:
                    done = per_rtt[config].pop(f"_{clients}", [])
                    if done:
                        per_rtt[config][str(clients)] = aggregate(done)
        finally:
            await stop_targets(targets)
        out[f"{rtt:g}"] = per_rtt


async def phase_recipients(harness: Harness, results: dict[str, Any]) -> None:
    args = harness.args
    rtt = args.recipients_rtt_ms
    log(f"== {args.recipients} recipients in one message at {rtt:g} ms RTT, {args.recipients_repeats} repeats")
    out: dict[str, Any] = {"rtt_ms": rtt, "recipients": args.recipients}
    targets = await start_targets(harness, rtt, "rcpt")
    runs: dict[str, list[dict[str, Any]]] = {c: [] for c in targets}
    errors: dict[str, str] = {}
    try:
        for _ in range(args.recipients_repeats):
            for config, target in targets.items():
                if target is None or config in errors:
                    continue
                try:
                    m = await measure(
                        harness, target, clients=1, messages=1, warmup=1, recipients=args.recipients, deliver_timeout=60
                    )
                except Exception as exc:
                    errors[config] = f"{type(exc).__name__}: {exc}"
                    log(f"   {label(config)}: ERROR {exc}")
                    continue
                runs[config].append(m)
    finally:
        await stop_targets(targets)
    for config, target in targets.items():
        if target is None:
            out[config] = {"skipped": harness.postfix_skip or "could not start"}
            continue
        if not runs[config]:
            out[config] = {"error": errors.get(config, "no run")}
            continue
        done = runs[config]
        e2e = [r["end_to_end_seconds"] for r in done if r["delivered_recipients"] >= args.recipients]
        out[config] = {
            "end_to_end_seconds": [r["end_to_end_seconds"] for r in done],
            "end_to_end_median_s": round(median(e2e), 4) if e2e else None,
            "client_reply_ms": [r["latency_p50_ms"] for r in done],
            "upstream_transactions": [r["delivered"] for r in done],
            "delivered_recipients": [r["delivered_recipients"] for r in done],
            "upstream_connections": [r["upstream_connections"] for r in done],
            "upstream_rset": [r["upstream_commands"].get("RSET", 0) for r in done],
        }
        if config in errors:
            out[config]["error"] = errors[config]
        log(
            f"   {label(config)}: median {out[config]['end_to_end_median_s']} s end to end "
            f"(runs {out[config]['end_to_end_seconds']}), {done[-1]['delivered']} upstream transaction(s)"
        )
    base = out.get("postfix", {}).get("end_to_end_median_s")
    for m in out.values():
        if isinstance(m, dict) and m.get("end_to_end_median_s") and base:
            m["vs_postfix"] = round(m["end_to_end_median_s"] / base, 3)
    results["recipients"] = out


async def phase_large(harness: Harness, results: dict[str, Any]) -> None:
    import psutil

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
    body_size = size - 400  # the headers make up the rest
    for config in [c for c in args.configs if c.startswith("relay_")]:
        target = await harness.target(config, rtt, f"large-{config}")
        assert target is not None and target.pid is not None
        try:
            await measure(harness, target, clients=args.clients, messages=1, warmup=1)  # pool warm
            await asyncio.sleep(1.0)
            idle = psutil.Process(target.pid).memory_info().rss
            reset_hwm(target.pid)
            single = await measure(harness, target, clients=1, messages=1, warmup=0, body_size=body_size)
            await asyncio.sleep(1.0)
            idle_after_single = psutil.Process(target.pid).memory_info().rss
            reset_hwm(target.pid)
            many = await measure(
                harness, target, clients=args.large_concurrency, messages=1, warmup=0, body_size=body_size
            )
            await asyncio.sleep(1.0)
            idle_after = psutil.Process(target.pid).memory_info().rss
            out[config] = {
                "idle_rss_mb": round(idle / MB, 1),
                "single_peak_rss_mb": single["peak_rss_mb"],
                "single_cost_mb": round(single["peak_rss_mb"] - idle / MB, 1),
                "single_cost_per_message_size": round((single["peak_rss_mb"] - idle / MB) / (size / MB), 2),
                "single_seconds": single["end_to_end_seconds"],
                "idle_rss_after_single_mb": round(idle_after_single / MB, 1),
                "concurrent_peak_rss_mb": many["peak_rss_mb"],
                "concurrent_peak_vs_in_flight": round(many["peak_rss_mb"] / out["in_flight_mb"], 2),
                "concurrent_delivered": many["delivered"],
                "concurrent_failed": many["failed"],
                "concurrent_seconds": many["end_to_end_seconds"],
                "concurrent_latency_max_ms": many["latency_max_ms"],
                "idle_rss_after_mb": round(idle_after / MB, 1),
            }
            if many.get("errors") or single.get("errors"):
                out[config]["errors"] = (single.get("errors") or []) + (many.get("errors") or [])
            m = out[config]
            log(
                f"   {label(config)}: idle {m['idle_rss_mb']} MB; one 20 MB message peaks at "
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


async def phase_startup(harness: Harness, results: dict[str, Any]) -> None:
    args = harness.args
    log(f"== spool start-up with {args.spool_messages} queued messages (building the spool first)")
    out = await spoolstart.run(harness.workdir, args.spool_messages)
    log(
        f"   built in {out['build']['build_seconds']} s; baseline scandir + first lines: "
        f"{out['baseline_scan_seconds']} s; Relay.start(): {out['relay_start']['seconds']} s "
        f"(spool_recovered says {out['relay_start']['spool_recovered_seconds']} s for "
        f"{out['relay_start']['recovered_messages']} messages) = {out['ratio_to_baseline']}x baseline; "
        f"`relay serve` process to listening: {out['process_start_seconds']} s "
        f"(empty spool {out['process_start_empty_seconds']} s)"
    )
    results["startup"] = out


async def phase_profile(harness: Harness, results: dict[str, Any]) -> None:
    """One extra run of a relay under a profiler; the profile is summarised and kept in the workdir."""
    args = harness.args
    config, rtt = args.profile_config, args.profile_rtt_ms
    log(f"== profile ({args.profile}) of {label(config)} at {rtt:g} ms RTT, {args.clients} x {args.profile_messages}")
    target = await harness.target(config, rtt, f"profile-{config}")
    assert target is not None and target.relay is not None
    try:
        m = await measure(harness, target, clients=args.clients, messages=args.profile_messages, warmup=args.warmup)
    finally:
        await stop_target(target)
    out: dict[str, Any] = {"config": config, "rtt_ms": rtt, "run": m, "file": str(target.relay.profile_out)}
    path = target.relay.profile_out
    if args.profile == "py-spy" and path is not None and path.exists():
        out["summary"] = summarise_collapsed(path)
        log(f"   profile: {path}")
        for row in out["summary"]["self"][:25]:
            log(f"   self {row['share']:6.1%}  {row['frame']}")
        for row in out["summary"]["inclusive"][:40]:
            log(f"   incl {row['share']:6.1%}  {row['frame']}")
    elif path is not None and path.exists():
        log(f"   profile: {path}")
        log(path.read_text()[:6000])
    results["profile"] = out


def summarise_collapsed(path: Path) -> dict[str, Any]:
    """Self and inclusive shares per frame from py-spy's collapsed ("raw") output."""
    total = 0
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        frames = [f for f in frames if not f.startswith(("process ", "thread "))]
        total += count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count

    def top(table: dict[str, int], n: int) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:n]
        return [{"frame": frame, "samples": count, "share": count / total if total else 0.0} for frame, count in rows]

    return {"samples": total, "self": top(own, 60), "inclusive": top(incl, 120)}


# targets of issue 6


def evaluate(results: dict[str, Any], args: argparse.Namespace) -> list[dict[str, Any]]:
    verdicts: list[dict[str, Any]] = []

    def add(name: str, met: bool | None, figures: str) -> None:
        verdicts.append({"target": name, "met": met, "figures": figures})

    tp = results.get("throughput", {})
    zero = tp.get("0", {})
    on = zero.get("relay_on", {})
    if "delivered_per_s" in on:
        pf = zero.get("postfix", {})
        vs_pf = on.get("vs_postfix")
        vs_c = on.get("vs_ceiling")
        pf_text = f"{vs_pf}x Postfix ({pf.get('delivered_per_s')}/s)" if vs_pf else "Postfix not measured"
        met = (vs_c is not None and vs_c >= 0.4) and (vs_pf is None or vs_pf >= 1.5)
        add(
            "0 ms RTT, spool on: delivered >= 1.5x Postfix (aim 2x) and >= 0.4x the ceiling",
            met if vs_pf is not None else (False if vs_c is not None and vs_c < 0.4 else None),
            f"{on['delivered_per_s']}/s = {pf_text}, {vs_c}x the ceiling "
            f"({zero.get('ceiling', {}).get('delivered_per_s')}/s)",
        )
    twenty = tp.get("20", {})
    for config in ("relay_on", "relay_off"):
        m = twenty.get(config, {})
        if "delivered_per_s" in m:
            conns = m["upstream_connections"]
            add(
                f"20 ms RTT, pool of {args.pool_size} ({label(config)}): "
                ">= 0.9x the ceiling with <= 10 upstream connections",
                m.get("vs_ceiling", 0) >= 0.9 and conns <= 10,
                f"{m['delivered_per_s']}/s = {m.get('vs_ceiling')}x the ceiling "
                f"({twenty.get('ceiling', {}).get('delivered_per_s')}/s), {conns} upstream connections, "
                f"RSET {m['upstream_commands'].get('RSET', 0)}, NOOP {m['upstream_commands'].get('NOOP', 0)}",
            )
    rc = results.get("recipients", {})
    relay_rc = rc.get("relay_on", {}).get("end_to_end_median_s")
    if relay_rc is not None:
        pf_rc = rc.get("postfix", {}).get("end_to_end_median_s")
        add(
            f"{rc.get('recipients')} recipients at {rc.get('rtt_ms'):g} ms RTT: at most half of Postfix's time",
            (relay_rc <= 0.5 * pf_rc) if pf_rc else None,
            f"relay (spool on) {relay_rc} s, Postfix {pf_rc if pf_rc else 'not measured'} s, "
            f"ceiling {rc.get('ceiling', {}).get('end_to_end_median_s')} s",
        )
    large = results.get("large", {})
    for config in ("relay_off", "relay_on"):
        m = large.get(config, {})
        if "concurrent_peak_rss_mb" in m:
            add(
                f"{large['concurrency']} concurrent {large['message_bytes'] // MB} MB messages ({label(config)}): "
                "peak RSS < 3x the data in flight",
                m["concurrent_peak_rss_mb"] < 3 * large["in_flight_mb"]
                and m["concurrent_delivered"] == large["concurrency"],
                f"peak {m['concurrent_peak_rss_mb']} MB vs {large['in_flight_mb']} MB in flight "
                f"({m['concurrent_peak_vs_in_flight']}x); one message costs +{m['single_cost_mb']} MB over idle "
                f"{m['idle_rss_mb']} MB",
            )
    for rtt_key, row in tp.items():
        for config in ("relay_on", "relay_off"):
            m = row.get(config, {})
            if m.get("delivered", 0) + m.get("clients", 0) * args.warmup >= 10_000:
                closes = m.get("upstream_idle_closes", 0)
                per_round = m.get("upstream_connections_per_round") or [m["upstream_connections"]]
                add(
                    f"10,000 messages use no more than pool_size ({args.pool_size}) upstream connections, "
                    f"barring upstream-initiated closes ({label(config)}, {rtt_key} ms RTT)",
                    m["upstream_connections"] <= args.pool_size + closes and max(per_round) <= args.pool_size,
                    f"{m['delivered']} timed + {m['clients'] * args.warmup * m.get('rounds', 1)} warm-up messages "
                    f"over {m['upstream_connections']} connections (per round {per_round}); the stand-in closed "
                    f"{closes} of them for idling between rounds",
                )
    st = results.get("startup")
    if st:
        add(
            f"issue 3: a spool with {st['build']['messages']} queued messages starts up in seconds",
            st["relay_start"]["seconds"] < 10,
            f"Relay.start() {st['relay_start']['seconds']} s (baseline scan {st['baseline_scan_seconds']} s, "
            f"{st['ratio_to_baseline']}x); process to listening {st['process_start_seconds']} s",
        )
    return verdicts


def print_summary(results: dict[str, Any]) -> None:
    print()
    print("=" * 100)
    print("RESULTS (every ratio is against a baseline measured in this same run)")
    for rtt, row in results.get("throughput", {}).items():
        print(f"\nThroughput at {rtt} ms RTT")
        head = (
            f"{'':34} {'accepted/s':>10} {'delivered/s':>11} {'p50 ms':>7} {'p99 ms':>7} {'conns':>9} "
            f"{'peak RSS MB':>11} {'vs (a)':>6} {'vs (d)':>6} {'CPU ms/msg':>10} {'busy':>5}"
        )
        print(head)
        for config, m in row.items():
            if "delivered_per_s" not in m:
                print(f"{label(config):34} {m.get('skipped') or m.get('error')}")
                continue
            per_round = m.get("upstream_connections_per_round") or [m["upstream_connections"]]
            conns = f"{m['upstream_connections']}/{max(per_round)}"
            print(
                f"{label(config):34} {m['accepted_per_s']:>10} {m['delivered_per_s']:>11} "
                f"{m['latency_p50_ms']!s:>7} {m['latency_p99_ms']!s:>7} {conns:>9} "
                f"{m.get('peak_rss_mb', '-')!s:>11} {m.get('vs_ceiling', '-')!s:>6} {m.get('vs_postfix', '-')!s:>6} "
                f"{m.get('cpu_ms_per_message', '-')!s:>10} {m.get('machine_busy', '-')!s:>5}"
            )
        print(
            "  conns: upstream connections opened in all rounds / most in one round; CPU ms/msg: the relay "
            "process's user+system CPU per message; busy: share of the machine's cores busy (all processes)"
        )
    for rtt, per in results.get("sweep", {}).items():
        print(f"\nDelivered msgs/s by concurrency at {rtt} ms RTT")
        levels = sorted({int(k) for p in per.values() for k in p if k.isdigit()})
        print(f"{'':34} " + " ".join(f"{'c=' + str(c):>8}" for c in levels))
        for config, points in per.items():
            cells = [str(points.get(str(c), {}).get("delivered_per_s", "-")) for c in levels]
            print(f"{label(config):34} " + " ".join(f"{x:>8}" for x in cells))
    rc = results.get("recipients")
    if rc:
        print(f"\nOne message to {rc['recipients']} recipients at {rc['rtt_ms']} ms RTT (median end to end)")
        for config, m in rc.items():
            if isinstance(m, dict):
                print(
                    f"{label(config):34} {m.get('end_to_end_median_s', m.get('skipped') or m.get('error'))} s"
                    f"  runs {m.get('end_to_end_seconds')}  transactions {m.get('upstream_transactions')}"
                    + (f"  {m['vs_postfix']}x Postfix" if "vs_postfix" in m else "")
                )
    large = results.get("large")
    if large:
        print(
            f"\nLarge messages ({large['concurrency']} x {large['message_bytes'] / MB:g} MB in flight = "
            f"{large['in_flight_mb']} MB)"
        )
        for config, m in large.items():
            if isinstance(m, dict):
                if "error" in m:
                    print(f"{label(config):34} ERROR {m['error']}")
                    continue
                print(
                    f"{label(config):34} idle {m['idle_rss_mb']} MB, one message +{m['single_cost_mb']} MB, "
                    f"{large['concurrency']} concurrent peak {m['concurrent_peak_rss_mb']} MB "
                    f"({m['concurrent_peak_vs_in_flight']}x in flight)"
                )
    st = results.get("startup")
    if st:
        print(
            f"\nSpool start-up, {st['build']['messages']} queued messages: Relay.start() "
            f"{st['relay_start']['seconds']} s; baseline scandir+first lines {st['baseline_scan_seconds']} s "
            f"({st['ratio_to_baseline']}x); `relay serve` to listening {st['process_start_seconds']} s "
            f"(empty spool {st['process_start_empty_seconds']} s)"
        )
    print("\nTargets (issue 6)")
    for v in results.get("targets", []):
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[v["met"]]
        print(f"  [{mark}] {v['target']}\n           {v['figures']}")
    for note in results.get("skipped", []):
        print(f"  note: {note}")
    print("=" * 100)


# entry point


def git_info() -> dict[str, Any]:
    """Which relay code was measured: other work lands in relay/ all the time."""
    import subprocess

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "subject": git("log", "-1", "--format=%s"),
            "relay_changes_uncommitted": bool(git("status", "--porcelain", "--", "relay")),
        }
    return {}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x.strip()]

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=floats, default=[0.0, 20.0], help="round-trip times to add (default 0,20)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent client connections (default 10)")
    parser.add_argument(
        "--messages", type=int, default=200, help="messages per client per round at 0 ms RTT (default 200)"
    )
    parser.add_argument(
        "--messages-rtt", type=int, default=40, help="messages per client per round when RTT > 0 (default 40)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds at 0 ms RTT (default 5)")
    parser.add_argument("--rounds-rtt", type=int, default=3, help="interleaved rounds when RTT > 0 (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed messages per client first (default 2)")
    parser.add_argument("--pool-size", type=int, default=10, help="relay upstream.pool_size (default 10)")
    parser.add_argument(
        "--configs",
        default=",".join(BASE_CONFIGS),
        help="what to measure: ceiling,relay_off,relay_on,postfix; a relay config may take experiments, "
        "each after a '+': uvloop (the relay on uvloop), switch=SECONDS (sys.setswitchinterval), "
        "log=LEVEL (log.level, default info); e.g. relay_on+uvloop+log=warning",
    )
    parser.add_argument("--no-postfix", action="store_true", help="leave Postfix out")
    parser.add_argument("--sweep", type=ints, default=[1, 2, 5, 10, 20], help="concurrency levels (1,2,5,10,20)")
    parser.add_argument("--sweep-rtt-ms", type=floats, default=[0.0, 20.0], help="RTTs for the sweep (default 0,20)")
    parser.add_argument("--sweep-rounds", type=int, default=2, help="interleaved rounds per level (median)")
    parser.add_argument(
        "--sweep-messages", type=int, default=40, help="messages per client per level and round (default 40)"
    )
    parser.add_argument("--recipients", type=int, default=1000, help="recipients of the one message (default 1000)")
    parser.add_argument("--recipients-rtt-ms", type=float, default=20.0)
    parser.add_argument("--recipients-repeats", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=20, help="size of a large message in MB (default 20)")
    parser.add_argument("--large-concurrency", type=int, default=10)
    parser.add_argument("--large-rtt-ms", type=float, default=0.0)
    parser.add_argument("--spool-messages", type=int, default=50_000, help="queued messages for start-up (50000)")
    parser.add_argument("--only", default="", help=f"comma-separated phases to run: {','.join(PHASES)}")
    parser.add_argument("--skip", default="", help="comma-separated phases to leave out")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in about a minute")
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file (default bench/results.json for a full run, "
        "bench/results.partial.json for --quick, --only, --skip or --profile runs)",
    )
    parser.add_argument("--plot", action="store_true", help="also draw docs/performance.png from the JSON")
    parser.add_argument("--plot-output", type=Path, default=ROOT / "docs" / "performance.png")
    parser.add_argument("--profile", choices=["py-spy", "pyinstrument"], help="one extra profiled relay run")
    parser.add_argument("--profile-config", default="relay_on")
    parser.add_argument("--profile-rtt-ms", type=float, default=0.0)
    parser.add_argument("--profile-messages", type=int, default=500, help="messages per client (default 500)")
    parser.add_argument(
        "--harness-uvloop",
        action=argparse.BooleanOptionalAction,
        default=uvloop_available(),
        help="run the stand-in, proxy and load client on uvloop (default: when installed)",
    )
    parser.add_argument("--workdir", type=Path, help="where spools, configs and logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, configs, profiles)")
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c and not (args.no_postfix and c == "postfix")]
    if args.quick:
        args.messages, args.messages_rtt, args.sweep_messages, args.rounds, args.rounds_rtt = 100, 20, 15, 2, 1
        args.sweep, args.sweep_rtt_ms, args.sweep_rounds = [1, 5, 10, 20], [20.0], 1
        args.recipients_repeats, args.spool_messages, args.large_concurrency = 1, 5000, 10
        args.profile_messages = 100
    only = {p for p in args.only.split(",") if p}
    skip = {p for p in args.skip.split(",") if p}
    unknown = (only | skip) - set(PHASES)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; choose from {', '.join(PHASES)}")
    args.phases = [p for p in PHASES if (not only or p in only) and p not in skip]
    if args.profile and not args.only:
        args.phases = []  # --profile alone runs only the profile
    if args.output is None:
        partial = args.quick or args.profile or set(args.phases) != set(PHASES)
        args.output = ROOT / "bench" / ("results.partial.json" if partial else "results.json")
    return args


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results: dict[str, Any] = {
        "meta": {
            "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "machine": machine_info(),
            "workdir": str(workdir),
            "git": git_info(),
            "harness_uvloop": args.harness_uvloop,
            "settings": {
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("output", "plot_output", "workdir")
            },
        }
    }
    log(f"bench: workdir {workdir}; phases {', '.join(args.phases) or '-'}; configs {', '.join(args.configs)}")
    harness = Harness(args, workdir)
    try:
        await harness.start()
        if harness.postfix_skip:
            results.setdefault("skipped", []).append(f"Postfix skipped: {harness.postfix_skip}")
            log(f"bench: Postfix SKIPPED: {harness.postfix_skip}")
        phases = {
            "throughput": phase_throughput,
            "sweep": phase_sweep,
            "recipients": phase_recipients,
            "large": phase_large,
            "startup": phase_startup,
        }
        for name in args.phases:
            t0 = time.monotonic()
            try:
                await phases[name](harness, results)
            except Exception as exc:
                results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                log(f"bench: phase {name} failed: {type(exc).__name__}: {exc}")
            results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t0, 1)
        if args.profile:
            await phase_profile(harness, results)
    finally:
        await harness.stop()
        if harness.postfix_skip and "Postfix" not in " ".join(results.get("skipped", [])):
            results.setdefault("skipped", []).append(f"Postfix skipped: {harness.postfix_skip}")
    results["targets"] = evaluate(results, args)
    results["meta"]["duration_seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["git_at_end"] = git_info()  # relay/ is edited by others: a change mid-run shows here
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def _public(value: Any) -> Any:
    """Drop working keys (leading underscore, e.g. raw latencies) before writing the JSON."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_loop(lambda: main(args), use_uvloop=args.harness_uvloop)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(_public(results), indent=2) + "\n")
    print_summary(results)
    print(f"\nwrote {args.output}")
    if args.plot:
        from bench.plot import plot

        plot(args.output, args.plot_output)
        print(f"wrote {args.plot_output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
