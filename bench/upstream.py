"""The Infobip stand-in (relay.testing.standin) in its own process, with a line-based control port.

    python -m bench.upstream [--no-uvloop]

Prints one JSON line when ready: {"port", "control", "ca_file", "username", "password", "reports_base_url",
"reports_api_key"} (the stand-in's HTTPS delivery-reports endpoint, idle unless a relay polls it).
Control commands (one line each, one JSON line back):
    stats  -> messages, recipients, bytes, first, last (time.monotonic() of acceptances, which on Linux
              is CLOCK_MONOTONIC and so comparable across processes), connections (opened since reset)
              by_user ({AUTH user: {envelope sender domain: messages}}: did each profile's mail go out
              as its own account?)
    reset  -> zero the counters
    account USER PASSWORD -> the stand-in also accepts this login (another Infobip account, for profiles)
Accepted message bodies are dropped at once so the process does not grow with the run. The bench's side
of the control port is bench.harness.Control.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any

from bench.common import run_loop, until_signalled
from relay.testing import standin as standin_module
from relay.testing.standin import InfobipStandIn, StandInMessage

IDLE_CLOSED: set[int] = set()  # connection idents the stand-in closed for being idle (its 30 s timeout)


def _count_idle_closes() -> None:
    """Record the stand-in's own idle-timeout closes: upstream-initiated, so not the pool's doing."""
    protocol = standin_module._StandInSMTP
    original: Any = protocol._timeout_cb

    def timeout_cb(self: Any) -> None:
        IDLE_CLOSED.add(self.record.ident)
        original(self)

    setattr(protocol, "_timeout_cb", timeout_cb)  # noqa: B010


class Counters:
    def __init__(self, standin: InfobipStandIn) -> None:
        self.standin = standin
        self.reset()

    def reset(self) -> None:
        self.messages = 0
        self.recipients = 0
        self.bytes = 0
        self.first: float | None = None
        self.last: float | None = None
        self.connections_at_reset = len(self.standin.connections)
        self.used_connections: set[int] = set()
        self.pipelined = 0
        self.by_user: dict[str, dict[str, int]] = {}

    def on_message(self, message: StandInMessage) -> None:
        now = time.monotonic()
        self.messages += 1
        self.recipients += len(message.rcpt_tos)
        self.bytes += len(message.data)
        self.first = now if self.first is None else self.first
        self.last = now
        self.used_connections.add(message.connection)
        self.pipelined += int(message.pipelined)
        domains = self.by_user.setdefault(message.auth_user or "", {})
        domain = message.mail_from.rpartition("@")[2]
        domains[domain] = domains.get(domain, 0) + 1
        self.standin.messages.clear()  # keep nothing: counters are all the bench needs

    def stats(self) -> dict[str, Any]:
        return {
            "messages": self.messages,
            "recipients": self.recipients,
            "bytes": self.bytes,
            "first": self.first,
            "last": self.last,
            "connections": len(self.standin.connections) - self.connections_at_reset,
            "connections_delivering": len(self.used_connections),
            "delivering_idents": sorted(self.used_connections),
            "idle_closed_idents": sorted(IDLE_CLOSED),  # since the process started, not since reset
            "pipelined": self.pipelined,
            "by_user": {user: dict(domains) for user, domains in self.by_user.items()},
            "commands": _command_counts(self.standin, self.connections_at_reset),
        }


def _command_counts(standin: InfobipStandIn, since: int) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in standin.connections[since:]:
        for verb in record.commands:
            counts[verb] = counts.get(verb, 0) + 1
    return counts


async def main(args: argparse.Namespace) -> None:
    _count_idle_closes()
    standin = InfobipStandIn()
    counters = Counters(standin)
    standin.on_message = counters.on_message
    await standin.start("127.0.0.1", args.port)
    await standin.reports.start()

    async def control(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "reset":
                counters.reset()
                answer: dict[str, Any] = {"ok": True}
            elif command == "stats":
                answer = counters.stats()
            elif command.startswith("account "):
                _, user, password = command.split(" ", 2)
                standin.accounts[user] = password
                answer = {"ok": True}
            else:
                answer = {"error": f"unknown command {command!r}"}
            writer.write(json.dumps(answer).encode() + b"\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(control, "127.0.0.1", 0)
    print(
        json.dumps(
            {
                "port": standin.port,
                "control": server.sockets[0].getsockname()[1],
                "ca_file": str(standin.ca_file),
                "username": standin.username,
                "password": standin.password,
                "reports_base_url": standin.reports.base_url,
                "reports_api_key": standin.reports.api_key,
            }
        ),
        flush=True,
    )
    await until_signalled()
    server.close()
    await standin.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.upstream")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-uvloop", action="store_true")
    ns = parser.parse_args()
    run_loop(lambda: main(ns), use_uvloop=not ns.no_uvloop)
    sys.exit(0)
