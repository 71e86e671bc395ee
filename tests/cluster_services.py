"""Real Redis (and PostgreSQL) servers for the cluster tests: Debian's binaries, started by the test on a
loopback ephemeral port in a temporary directory, and stopped (or killed) by it.

Where a binary is missing the test is skipped with the reason, except in CI (RELAY_TEST_REQUIRE_CLUSTER=1,
set by .ci/run, which installs redis-server and postgresql): there a skip would hide a gap, so it fails.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tests.conftest import free_port


def need(binary: str, package: str) -> str:
    found = shutil.which(binary)
    if found is None:
        reason = f"{binary} is not installed (Debian package {package}: apt-get install {package})"
        if os.environ.get("RELAY_TEST_REQUIRE_CLUSTER"):
            pytest.fail(f"{reason}; RELAY_TEST_REQUIRE_CLUSTER is set, so this is a failure")
        pytest.skip(reason)
    return found


class RedisServer:
    """One private redis-server; `kill()` is kill -9, `start()` again comes back on the same port, empty."""

    def __init__(self, directory: Path) -> None:
        self.binary = need("redis-server", "redis-server")
        self.directory = directory
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.directory.mkdir(parents=True, exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory)]
        args += ["--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "redis.log"]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with redis.Redis(port=self.port, socket_connect_timeout=0.2) as client:
                    client.ping()
                return self
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    log = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                    pytest.fail(f"redis-server did not start on port {self.port}:\n{log}")
                time.sleep(0.02)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1.0, decode_responses=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
