"""A TCP delay proxy: adds a round-trip time, half in each direction, without throttling.

    python -m bench.proxy --target-port P [--target-host 127.0.0.1] [--rtt-ms 20] [--no-uvloop]

Every chunk read from one side is written to the other side `rtt/2` after it arrived, in order; a
chunk is never held back for another. Bytes pass through untouched, so STARTTLS and TLS records go
through as they are. It is a delay line, not a bandwidth limit (the only back-pressure is a cap on the
bytes waiting in one direction's delay line, far above what small messages need, so a 20 MB message
cannot make the proxy balloon). Prints {"port": N} once listening.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import sys
from typing import Any

from bench.common import run_loop, until_signalled

LINE_CAP = 32 * 1024 * 1024  # bytes waiting in one direction before reading from that side pauses
_EOF = b""


class DelayLine:
    """One direction: chunks out to `dst` `delay` seconds after they came in, in arrival order."""

    def __init__(self, loop: asyncio.AbstractEventLoop, delay: float) -> None:
        self.loop = loop
        self.delay = delay
        self.dst: asyncio.Transport | None = None
        self.src: asyncio.Transport | None = None
        self.queue: collections.deque[tuple[float, bytes | None]] = collections.deque()
        self.pending = 0
        self.timer: asyncio.TimerHandle | None = None
        self.dst_paused = False  # dst's write buffer is full
        self.src_paused = False

    def push(self, data: bytes | None) -> None:
        """`data` b"" is an EOF to pass on, None a close."""
        if self.delay <= 0 and not self.queue and self.dst is not None:
            self._emit(data)
            return
        self.queue.append((self.loop.time() + self.delay, data))
        if data:
            self.pending += len(data)
        self._flow()
        if self.timer is None and self.dst is not None:
            self.timer = self.loop.call_at(self.queue[0][0], self._fire)

    def attach(self, dst: asyncio.Transport) -> None:
        self.dst = dst
        if self.queue and self.timer is None:
            self.timer = self.loop.call_at(self.queue[0][0], self._fire)

    def _fire(self) -> None:
        self.timer = None
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data:
                self.pending -= len(data)
            self._emit(data)
        if self.queue:
            self.timer = self.loop.call_at(self.queue[0][0], self._fire)
        self._flow()

    def _emit(self, data: bytes | None) -> None:
        dst = self.dst
        if dst is None or dst.is_closing():
            return
        if data:
            dst.write(data)
        elif data == _EOF:
            if dst.can_write_eof():
                dst.write_eof()
            else:
                dst.close()
        else:
            dst.close()

    def _flow(self) -> None:
        """Pause reading `src` while the line holds too much or `dst` cannot keep up."""
        if self.src is None or self.src.is_closing():
            return
        should_pause = self.pending > LINE_CAP or self.dst_paused
        if should_pause and not self.src_paused:
            self.src.pause_reading()
            self.src_paused = True
        elif not should_pause and self.src_paused:
            self.src.resume_reading()
            self.src_paused = False

    def set_dst_paused(self, paused: bool) -> None:
        self.dst_paused = paused
        self._flow()


class Side(asyncio.Protocol):
    """One socket of a proxied connection: what it reads goes into `out`; `inbound` writes to it."""

    def __init__(self, out: DelayLine, inbound: DelayLine) -> None:
        self.out = out
        self.inbound = inbound
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.out.src = transport
        self.inbound.attach(transport)

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self.out.push(_EOF)
        return True  # keep our write side open until the other direction is done

    def connection_lost(self, exc: Exception | None) -> None:
        self.out.push(None)

    def pause_writing(self) -> None:
        self.inbound.set_dst_paused(True)

    def resume_writing(self) -> None:
        self.inbound.set_dst_paused(False)


class Proxy:
    def __init__(self, target: tuple[str, int], rtt: float) -> None:
        self.target = target
        self.half = rtt / 2
        self.connections = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def accept(self) -> Side:
        loop = asyncio.get_running_loop()
        up = DelayLine(loop, self.half)  # client -> server
        down = DelayLine(loop, self.half)  # server -> client
        client_side = Side(up, down)
        self.connections += 1
        task = loop.create_task(self._connect(up, down, client_side))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return client_side

    async def _connect(self, up: DelayLine, down: DelayLine, client_side: Side) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.create_connection(lambda: Side(down, up), *self.target)
        except OSError:
            if client_side.transport is not None:
                client_side.transport.close()


async def main(args: argparse.Namespace) -> None:
    proxy = Proxy((args.target_host, args.target_port), args.rtt_ms / 1000)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(proxy.accept, "127.0.0.1", args.port)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
    await until_signalled()
    server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.proxy")
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--target-port", type=int, required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rtt-ms", type=float, default=20.0)
    parser.add_argument("--no-uvloop", action="store_true")
    ns = parser.parse_args()
    run_loop(lambda: main(ns), use_uvloop=not ns.no_uvloop)
    sys.exit(0)
