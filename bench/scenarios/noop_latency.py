"""One message must not freeze the relay for everyone (issue 12, item 3): the NOOP latency of a second client
while 20 MB messages of tiny header lines (`a:` lines) are being refused, and the relay's peak RSS against
`limits.memory_budget`.

    python -m bench --only noop_latency [--quick]

The relay runs as its own process (spool on, `memory_budget` 64 MiB, as in the issue's repro) against the
harness's stand-in. For each case, one client keeps sending NOOP (one every 10 ms, each waiting for its reply)
while the big uploads go in: one tiny-header message, three at once, and, for comparison, one plain 20 MB
message that is accepted (its NOOPs include the relay's delivery of it to the stand-in, which is not DATA's
work: see the plain case's max). Printed: the NOOP latency p50 / p99 / max per case, the big messages' replies, and
the relay's peak RSS (VmHWM) against its idle RSS plus twice the budget. On 7eaaba9 the first case stalled a
NOOP for 12.4 s and took RSS from 63 to 605 MB.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.common import MB, percentile, proc_status_bytes, reset_hwm
from bench.harness import Harness, Results, Scenario, Verdict, verdict
from bench.relayproc import RelayProcess

SENDER = "billing@erp.example.com"
BUDGET = 64 << 20
NOOP_TARGET_MS = 100.0


async def _reply(reader: asyncio.StreamReader) -> str:
    while (line := await reader.readline())[3:4] == b"-":
        pass
    return line.decode().strip() or "closed"


async def _session(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await _reply(reader)
    writer.write(b"EHLO bench\r\n")
    await _reply(reader)
    return reader, writer


async def _big(port: int, data: bytes) -> str:
    """One transaction carrying `data` (ends with CRLF.CRLF): the reply to its end of data."""
    reader, writer = await _session(port)
    try:
        for command in (f"MAIL FROM:<{SENDER}>", "RCPT TO:<customer@example.org>", "DATA"):
            writer.write(command.encode() + b"\r\n")
            await _reply(reader)
        writer.write(data)
        return await _reply(reader)
    finally:
        writer.close()


async def _case(port: int, data: bytes, clients: int) -> dict[str, Any]:
    reader, writer = await _session(port)
    uploads = asyncio.gather(*(_big(port, data) for _ in range(clients)))
    latencies: list[float] = []
    started = time.monotonic()
    while not uploads.done():
        sent = time.monotonic()
        writer.write(b"NOOP\r\n")
        await _reply(reader)
        latencies.append(time.monotonic() - sent)
        await asyncio.sleep(0.01)
    seconds = time.monotonic() - started
    writer.close()
    ms = [x * 1000 for x in latencies]
    return {
        "clients": clients,
        "message_mb": round(len(data) / MB, 1),
        "seconds": round(seconds, 2),
        "replies": sorted(set(await uploads)),
        "noops": len(ms),
        "noop_p50_ms": round(percentile(ms, 50), 1),
        "noop_p99_ms": round(percentile(ms, 99), 1),
        "noop_max_ms": round(max(ms), 1),
    }


def _tiny_headers(megabytes: int) -> bytes:
    return f"From: <{SENDER}>\r\n".encode() + b"a:\r\n" * (megabytes * MB // 4) + b"\r\nbody\r\n.\r\n"


def _plain(megabytes: int) -> bytes:
    line = b"x" * 76 + b"\r\n"
    head = f"From: <{SENDER}>\r\nTo: <customer@example.org>\r\nSubject: big\r\n\r\n".encode()
    return head + line * (megabytes * MB // len(line)) + b".\r\n"


async def run(harness: Harness, results: Results) -> None:
    megabytes = 5 if harness.args.quick else 20
    relay = RelayProcess(
        harness.workdir,
        "noop-latency",
        upstream_port=harness.upstream["port"],
        upstream=harness.upstream,
        spool=True,
        pool_size=4,
        log_level="warning",
        overrides={"limits": {"memory_budget": BUDGET}, "http": {"enabled": False}},
    )
    await relay.start()
    try:
        await asyncio.sleep(0.5)  # settled after start-up
        idle = proc_status_bytes(relay.pid, "VmRSS") or 0
        reset_hwm(relay.pid)
        cases = {
            "tiny_headers": await _case(relay.port, _tiny_headers(megabytes), 1),
            "tiny_headers_x3": await _case(relay.port, _tiny_headers(megabytes), 3),
            "plain": await _case(relay.port, _plain(megabytes), 1),
        }
        peak = proc_status_bytes(relay.pid, "VmHWM") or 0
    finally:
        await relay.stop()
    results["noop_latency"] = {
        "cases": cases,
        "memory_budget_mb": round(BUDGET / (1 << 20)),
        "idle_rss_mb": round(idle / (1 << 20), 1),
        "peak_rss_mb": round(peak / (1 << 20), 1),
        "peak_over_idle_vs_budget": round((peak - idle) / BUDGET, 2),
    }


def summary(results: Results) -> list[str]:
    r = results.get("noop_latency")
    if not r:
        return []
    lines = ["NOOP latency of a second client while big messages go in (target: p99 under 100 ms):"]
    for name, c in r["cases"].items():
        lines.append(
            f"  {name:16} {c['clients']} x {c['message_mb']} MB: NOOP p50 {c['noop_p50_ms']} ms, "
            f"p99 {c['noop_p99_ms']} ms, max {c['noop_max_ms']} ms ({c['noops']} NOOPs, {c['seconds']} s); "
            f"replies {c['replies']}"
        )
    lines.append(
        f"  relay RSS: idle {r['idle_rss_mb']} MB, peak {r['peak_rss_mb']} MB; memory_budget {r['memory_budget_mb']} MB"
        f" (peak - idle = {r['peak_over_idle_vs_budget']} x budget; the promise is at most 2 x)"
    )
    return lines


def targets(results: Results, args: Any) -> list[Verdict]:
    r = results.get("noop_latency")
    if not r:
        return []
    worst = max(c["noop_p99_ms"] for name, c in r["cases"].items() if name.startswith("tiny_headers"))
    return [
        verdict("NOOP p99 under 100 ms while 20 MB of tiny headers are refused", worst < NOOP_TARGET_MS, f"{worst} ms"),
        verdict(
            "peak RSS at most idle + 2 x memory_budget",
            r["peak_over_idle_vs_budget"] <= 2,
            f"peak {r['peak_rss_mb']} MB, idle {r['idle_rss_mb']} MB, budget {r['memory_budget_mb']} MB",
        ),
    ]


SCENARIO = Scenario("noop_latency", run, "One message never freezes the relay", summary=summary, targets=targets)
