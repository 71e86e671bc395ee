"""Outages (issue: keep every promise at the edges): Infobip goes away under a steady load and comes back.

In this process: the Infobip stand-in and one relay with its spool in a temp dir. A load of `--outage-rate`
messages a second (one message per connection) runs throughout; Infobip refuses every connection (greets
421 and hangs up) for each outage length in `--outage-seconds` (default 20 and 180), then comes back.
Printed per outage: the time from Infobip's return to the first delivery and to an empty queue, the app's
reply latency while paused (p50/p99), and acked, delivered, lost and duplicates.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.harness import Harness, Results, Scenario, Verdict, verdict

SENDER = "billing@erp.example.com"


async def _send(port: int, message_id: str) -> tuple[bool, float]:
    """One message over a fresh connection: (answered 250, seconds from the end of DATA to the reply)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        for line in ("EHLO bench", f"MAIL FROM:<{SENDER}>", "RCPT TO:<customer@example.org>", "DATA"):
            writer.write(line.encode() + b"\r\n")
            while (await reader.readline())[3:4] == b"-":
                pass
        body = (
            f"From: ERP <{SENDER}>\r\nTo: <customer@example.org>\r\nSubject: outage\r\n"
            f"Message-ID: {message_id}\r\n\r\nHello.\r\n.\r\n"
        )
        started = time.monotonic()
        writer.write(body.encode())
        reply = await reader.readline()
        writer.write(b"QUIT\r\n")
        return reply.startswith(b"250"), time.monotonic() - started
    finally:
        writer.close()


def _p99(values: list[float]) -> float | None:
    return round(sorted(values)[int(len(values) * 0.99)] * 1000, 1) if values else None


async def _one_outage(seconds: float, rate: float, workdir: Path) -> dict[str, Any]:
    from relay.app import Relay
    from relay.config import LogSettings, Settings
    from relay.ops.logs import configure_logging
    from relay.testing.standin import InfobipStandIn, StandInMessage

    configure_logging(LogSettings(level="error"))
    arrivals: list[tuple[float, str]] = []

    def arrived(message: StandInMessage) -> None:
        marker = next((line for line in message.data.split(b"\r\n") if line.startswith(b"Message-ID:")), b"")
        arrivals.append((time.monotonic(), marker.decode().split(":", 1)[-1].strip()))

    standin = InfobipStandIn(on_message=arrived)
    await standin.start()
    settings = Settings(
        listen={"host": "127.0.0.1", "port": 0, "hostname": "relay.bench.test"},
        upstream={
            "host": "localhost",
            "port": standin.port,
            "username": standin.username,
            "password": standin.password,
            "ca_file": str(standin.ca_file),
        },
        spool={"path": str(workdir / f"spool-{int(seconds)}")},
        http={"enabled": False},
    )
    relay = Relay(settings)
    await relay.start()
    acked: list[str] = []
    acked_while_down: list[str] = []
    paused_latency: list[float] = []
    down = asyncio.Event()
    stop = asyncio.Event()

    async def load() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            ok, latency = await _send(relay.port, f"<outage-{int(seconds)}-{n}@bench>")
            if ok:
                acked.append(f"<outage-{int(seconds)}-{n}@bench>")
                if down.is_set():
                    acked_while_down.append(acked[-1])
            if down.is_set():
                paused_latency.append(latency)
            await asyncio.sleep(1 / rate)

    loader = asyncio.create_task(load())
    await asyncio.sleep(3)
    standin.go_down()  # open connections drop too: a warm pool must not hide the outage
    down.set()
    await asyncio.sleep(seconds)
    standin.behaviour.down = False
    down.clear()
    back = time.monotonic()
    await asyncio.sleep(10)  # the load goes on after the return
    stop.set()
    await loader
    deadline = time.monotonic() + 120
    while relay.delivery is not None and relay.delivery.depth and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    drained = time.monotonic()
    await relay.stop()
    await standin.stop()
    after = [t for t, _ in arrivals if t >= back]
    backlog = set(acked_while_down)
    backlog_done = max((t for t, marker in arrivals if marker in backlog), default=None)
    counts = Counter(marker for _, marker in arrivals)
    return {
        "outage_seconds": seconds,
        "first_delivery_after_return_s": round(min(after) - back, 2) if after else None,
        "backlog": len(backlog),
        "backlog_delivered_after_return_s": round(backlog_done - back, 2) if backlog_done else None,
        "queue_empty_after_load_s": round(drained - back - 10, 2),
        "acked": len(acked),
        "delivered": len(counts),
        "lost": len(set(acked) - set(counts)),
        "duplicates": sum(n - 1 for n in counts.values()),
        "reply_while_paused_p50_ms": round(statistics.median(paused_latency) * 1000, 1) if paused_latency else None,
        "reply_while_paused_p99_ms": _p99(paused_latency),
    }


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    lengths = args.outage_seconds or ([5.0] if args.quick else [20.0, 180.0])
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as tmp:
        results["outage"] = [await _one_outage(seconds, args.outage_rate, Path(tmp)) for seconds in lengths]


def summary(results: Results) -> list[str]:
    return [
        f"outage {r['outage_seconds']:.0f} s: first delivery {r['first_delivery_after_return_s']} s after Infobip's "
        f"return, its backlog of {r['backlog']} delivered {r['backlog_delivered_after_return_s']} s after it; "
        f"acked {r['acked']}, delivered {r['delivered']}, "
        f"lost {r['lost']}, duplicates {r['duplicates']}; app reply while paused p50 {r['reply_while_paused_p50_ms']} "
        f"ms, p99 {r['reply_while_paused_p99_ms']} ms"
        for r in results.get("outage", [])
    ]


def targets(results: Results, args: Any) -> list[Verdict]:
    verdicts = []
    for r in results.get("outage", []):
        first = r["first_delivery_after_return_s"]
        met = first is not None and first <= 10 and r["lost"] == 0 and (r["reply_while_paused_p99_ms"] or 0) < 1000
        figures = f"{first} s, lost {r['lost']}, p99 {r['reply_while_paused_p99_ms']} ms"
        target = f"outage {r['outage_seconds']:.0f} s: first delivery within 10 s, nothing lost, replies under 1 s"
        verdicts.append(verdict(target, met, figures))
    return verdicts


SCENARIO = Scenario("outage", run, "Outages", summary=summary, targets=targets)
