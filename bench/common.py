"""Small helpers shared by the bench processes: names of the configs, ports, event loops, child processes,
RSS sampling, percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
MB = 1_000_000
T = TypeVar("T")

# What each config is called: (console label, long name for the report and the plot).
CONFIG_NAMES = {
    "ceiling": ("(a) ceiling: client -> upstream", "(a) ceiling: pipelining client → upstream"),
    "relay_off": ("(b) relay, spool off", "(b) relay, spool off"),
    "relay_on": ("(c) relay, spool on", "(c) relay, spool on"),
    "postfix": ("(d) Postfix smarthost", "(d) Postfix smarthost"),
}


def label(config: str, *, long: bool = False) -> str:
    """`relay_on+uvloop` -> "(c) relay, spool on [uvloop]"."""
    base, _, extra = config.partition("+")
    names = CONFIG_NAMES.get(base)
    name = names[long] if names else base
    return name + (f" [{extra}]" if extra else "")


def fmt(value: Any) -> str:
    """A figure in a Markdown table: '-' when there is none."""
    return "-" if value is None or value == "-" else str(value)


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries the summary."""
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_loop(main: Callable[[], Coroutine[Any, Any, T]], *, use_uvloop: bool = True) -> T:
    """asyncio.run, on uvloop when it is installed and wanted (the harness, never the relay by default)."""
    if use_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main())
    return asyncio.run(main())


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


async def wait_port(port: int, host: str = "127.0.0.1", timeout: float = 30.0, proc: Any = None) -> float:
    """Seconds until a TCP connect succeeds; raises if `proc` exits first or the deadline passes."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        if proc is not None and proc.returncode is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            await asyncio.sleep(0.005)
            continue
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return time.monotonic() - started


async def until_signalled() -> None:
    """Return on SIGTERM or SIGINT: how a harness child process waits to be stopped."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def terminate(proc: asyncio.subprocess.Process, timeout: float) -> int:
    """SIGTERM, then SIGKILL if it has not exited after `timeout` seconds; its exit status."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode


class Child:
    """A harness subprocess that prints one JSON line (its ports, files) once it is ready."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.log_path = log_path
        self.env = env
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}
        self._log: Any = None

    async def start(self, timeout: float = 60.0) -> dict[str, Any]:
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = await asyncio.create_subprocess_exec(
            *self.args,
            cwd=ROOT,
            stdout=asyncio.subprocess.PIPE,
            stderr=self._log,
            env=self.env,
            start_new_session=True,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            await self.proc.wait()
            raise RuntimeError(f"{self.args} exited ({self.proc.returncode}); see {self.log_path}")
        self.info = json.loads(line)
        return self.info

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def stop(self, timeout: float = 10.0) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        await terminate(self.proc, timeout)
        if self._log is not None:
            self._log.close()


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def proc_status_bytes(pid: int, key: str = "VmHWM") -> int | None:
    """A size from /proc/<pid>/status in bytes: VmHWM (the kernel's peak RSS) or VmRSS."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def reset_hwm(pid: int) -> bool:
    """Reset a process's VmHWM to its current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Samples the summed RSS of a process and all its descendants on a thread; keeps the peak.

    For a single process the kernel's own high-water mark (VmHWM) is also read at the end, so a
    short peak between two samples is not missed.
    """

    def __init__(self, pid: int, interval: float = 0.01) -> None:
        import psutil

        self._psutil = psutil
        self.pid = pid
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._root = psutil.Process(pid)
        self._children: dict[int, Any] = {}
        self._last_children_scan = 0.0

    def current(self) -> int:
        psutil = self._psutil
        now = time.monotonic()
        if now - self._last_children_scan > 0.2:  # listing children is costly; new ones are rare
            self._last_children_scan = now
            try:
                found = self._root.children(recursive=True)
            except psutil.Error:
                found = []
            self._children = {p.pid: self._children.get(p.pid, p) for p in found}
        total = 0
        for proc in (self._root, *self._children.values()):
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def __enter__(self) -> RssSampler:
        self.peak = max(self.peak, self.current())
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, self.current())
            self.samples += 1

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.peak = max(self.peak, self.current())
        if not self._children:
            hwm = proc_status_bytes(self.pid)
            if hwm is not None:
                self.peak = max(self.peak, hwm)


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def git_info(where: Path = ROOT) -> dict[str, Any]:
    """Which relay code was measured (this checkout's, or a +src= one's): other work lands in relay/ all the time."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=where, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return {
            "commit": git("rev-parse", "--short", "HEAD"),
            "subject": git("log", "-1", "--format=%s"),
            "relay_changes_uncommitted": bool(git("status", "--porcelain", "--", "relay")),
        }
    return {}


def machine_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["findmnt", "-n", "-o", "FSTYPE,SOURCE", "-T", "/tmp"], capture_output=True, text=True)
        info["tmp_filesystem"] = out.stdout.strip()
    return info
