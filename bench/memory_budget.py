"""Peak RSS of the relay when fifty clients send 20 MB each at once (issue 5: `limits.memory_budget`).

    python -m bench.memory_budget [--clients 50] [--mb 20] [--budget-mb 256]

Runs the relay as its own process (spool on) against the stand-in, has every client send its whole message
at the same time, and reads the relay's peak RSS from /proc (VmHWM). Prints the figures against the budget
and against what the clients tried to put in flight; nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path

from relay.testing.standin import InfobipStandIn

CHUNK = 1 << 20


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rss_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


async def _reply(reader: asyncio.StreamReader) -> str:
    while True:
        line = (await reader.readline()).decode()
        if not line:
            return "closed"
        if line[3:4] != "-":
            return line.strip()


async def _client(port: int, index: int, body: bytes) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        writer.write(b"EHLO bench\r\n")
        await _reply(reader)
        writer.write(b"MAIL FROM:<big@erp.example.com>\r\n")
        await _reply(reader)
        writer.write(f"RCPT TO:<r{index}@example.org>\r\n".encode())
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


async def main(clients: int, megabytes: int, budget_mb: int) -> dict[str, object]:
    standin = InfobipStandIn()
    await standin.start()
    work = Path(tempfile.mkdtemp(prefix="relay-budget-"))
    port = _free_port()
    config = work / "relay.toml"
    config.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {port}
max_connections = {clients + 10}
[upstream]
host = "localhost"
port = {standin.port}
username = "{standin.username}"
password = "{standin.password}"
ca_file = "{standin.ca_file}"
pool_size = 4
[spool]
path = "{work / "spool"}"
sync_wait = 0.0
[limits]
memory_budget = {budget_mb << 20}
[http]
enabled = false
[log]
level = "warning"
"""
    )
    relay = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "serve", "--config", str(config), stderr=asyncio.subprocess.DEVNULL
    )
    try:
        for _ in range(500):
            try:
                _, probe = await asyncio.open_connection("127.0.0.1", port)
                probe.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        idle_kib = _rss_kib(relay.pid, "VmRSS")
        line = b"x" * 76 + b"\r\n"
        body = line * (megabytes * 1_000_000 // len(line))
        started = time.monotonic()
        replies = await asyncio.gather(*(_client(port, i, body) for i in range(clients)))
        seconds = time.monotonic() - started
        peak_kib = _rss_kib(relay.pid, "VmHWM")
    finally:
        relay.terminate()
        await relay.wait()
        await standin.stop()
    accepted = sum(r.startswith("250") for r in replies)
    budget_refusals = sum(r.startswith("451 4.3.2") for r in replies)
    result = {
        "clients": clients,
        "message_mb": megabytes,
        "attempted_in_flight_mb": clients * megabytes,
        "memory_budget_mb": budget_mb,
        "accepted": accepted,
        "refused_451_4_3_2": budget_refusals,
        "other_replies": sorted({r for r in replies if not r.startswith(("250", "451 4.3.2"))}),
        "seconds": round(seconds, 2),
        "idle_rss_mb": round(idle_kib / 1024, 1),
        "peak_rss_mb": round(peak_kib / 1024, 1),
        "peak_rss_vs_budget": round((peak_kib / 1024) / budget_mb, 2),
        "peak_rss_vs_attempted": round((peak_kib / 1024) / (clients * megabytes), 3),
    }
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--mb", type=int, default=20)
    parser.add_argument("--budget-mb", type=int, default=256)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONDONTWRITEBYTECODE", "1")
    print(json.dumps(asyncio.run(main(args.clients, args.mb, args.budget_mb)), indent=2))
