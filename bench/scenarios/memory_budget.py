"""Peak RSS of the relay when fifty clients send 20 MB each at once (issue 5: `limits.memory_budget`).

    python -m bench.memory_budget [--clients 50] [--mb 20] [--budget-mb 256]

Runs the relay as its own process (spool on, `sync_wait = 0`, a pool of 4, no policy rule) against the
stand-in, has every client send its whole message at the same time, and reads the relay's peak RSS from
/proc (VmHWM). Prints the figures against the budget and against what the clients tried to put in
flight; nothing is asserted. A separate run: not a phase of `python -m bench`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.common import MB, proc_status_bytes
from bench.relayproc import RelayProcess
from relay.testing.standin import InfobipStandIn

CHUNK = 1 << 20


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await reader.readline()).decode()
        if not line:
            return "closed"
        if line[3:4] != "-":
            return line.strip()


async def _client(port: int, index: int, body: bytes) -> str:
    """One plain session, the body written a MiB at a time: the reply to its message (or what broke)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        for command in (b"EHLO bench", b"MAIL FROM:<big@erp.example.com>", f"RCPT TO:<r{index}@example.org>".encode()):
            writer.write(command + b"\r\n")
            await _reply(reader)
        writer.write(b"DATA\r\n")
        go = await _reply(reader)
        if not go.startswith("354"):
            return go
        writer.write(f"From: <big@erp.example.com>\r\nSubject: {index}\r\n\r\n".encode())
        for start in range(0, len(body), CHUNK):
            writer.write(body[start : start + CHUNK])
            await writer.drain()
        writer.write(b".\r\n")
        return await _reply(reader)
    except ConnectionError as exc:
        return f"connection error: {exc}"
    finally:
        writer.close()


async def main(clients: int, megabytes: int, budget_mb: int) -> dict[str, Any]:
    standin = InfobipStandIn()
    await standin.start()
    with tempfile.TemporaryDirectory(prefix="relay-budget-") as work:
        relay = RelayProcess(
            Path(work),
            "relay",
            upstream_port=standin.port,
            upstream={"username": standin.username, "password": standin.password, "ca_file": str(standin.ca_file)},
            spool=True,
            pool_size=4,
            log_level="warning",
            overrides={
                "listen": {"max_connections": clients + 10},
                "upstream": {"host": "localhost"},
                "spool": {"sync_wait": 0.0},
                "policy": None,
                "limits": {"memory_budget": budget_mb << 20},
                "http": {"enabled": False},
            },
        )
        try:
            await relay.start()
            idle = proc_status_bytes(relay.pid, "VmRSS") or 0
            line = b"x" * 76 + b"\r\n"
            body = line * (megabytes * MB // len(line))
            started = time.monotonic()
            replies = await asyncio.gather(*(_client(relay.port, i, body) for i in range(clients)))
            seconds = time.monotonic() - started
            peak = proc_status_bytes(relay.pid, "VmHWM") or 0
        finally:
            await relay.stop()
            await standin.stop()
    peak_mib = peak / (1 << 20)
    return {
        "clients": clients,
        "message_mb": megabytes,
        "attempted_in_flight_mb": clients * megabytes,
        "memory_budget_mb": budget_mb,
        "accepted": sum(r.startswith("250") for r in replies),
        "refused_451_4_3_2": sum(r.startswith("451 4.3.2") for r in replies),
        "other_replies": sorted({r for r in replies if not r.startswith(("250", "451 4.3.2"))}),
        "seconds": round(seconds, 2),
        "idle_rss_mb": round(idle / (1 << 20), 1),
        "peak_rss_mb": round(peak_mib, 1),
        "peak_rss_vs_budget": round(peak_mib / budget_mb, 2),
        "peak_rss_vs_attempted": round(peak_mib / (clients * megabytes), 3),
    }


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.memory_budget", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--budget-mb", type=int, default=256)
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(main(args.clients, args.mb, args.budget_mb)), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
