"""Real Redis (and PostgreSQL) servers for the cluster tests: Debian's binaries, started by the test on a
loopback ephemeral port in a temporary directory, and stopped (or killed) by it.

Where a binary is missing the test is skipped with the reason, except in CI (RELAY_TEST_REQUIRE_CLUSTER=1,
set by .ci/run, which installs redis-server and postgresql): there a skip would hide a gap, so it fails.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
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


def postgres_bin(name: str) -> str:
    """A PostgreSQL server binary: Debian keeps them under /usr/lib/postgresql/<version>/bin, off PATH."""
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        reason = f"{name} (PostgreSQL) is not installed (Debian package postgresql: apt-get install postgresql)"
        if os.environ.get("RELAY_TEST_REQUIRE_CLUSTER"):
            pytest.fail(f"{reason}; RELAY_TEST_REQUIRE_CLUSTER is set, so this is a failure")
        pytest.skip(reason)
    return found


class PostgresServer:
    """One private PostgreSQL (trust auth, loopback TCP only, fsync off). initdb and postgres refuse to
    run as root, so as root both run as `nobody` (uid 65534), in a directory of their own under /tmp (pytest's tmp_path
    is private to root)."""

    def __init__(self) -> None:
        self.initdb, self.postgres = postgres_bin("initdb"), postgres_bin("postgres")
        self.directory = Path(tempfile.mkdtemp(prefix="relay-pg-"))
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        # setpriv execs the server itself (runuser would sit between and not pass our signals on)
        self._as = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--"] if os.geteuid() == 0 else []

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://relay@127.0.0.1:{self.port}/{database}"

    def start(self, timeout: float = 30.0) -> PostgresServer:
        data, log = self.directory / "data", self.directory / "postgres.log"
        if self._as:
            os.chown(self.directory, 65534, 65534)
        init = [*self._as, self.initdb, "-D", str(data), "-U", "relay", "--auth=trust", "-E", "UTF8", "--no-sync"]
        subprocess.run(init, check=True, cwd=self.directory, stdin=subprocess.DEVNULL, capture_output=True)
        args = [*self._as, self.postgres, "-D", str(data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1"]
        args += ["-c", "unix_socket_directories=", "-c", "fsync=off", "-c", "full_page_writes=off"]
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                args, cwd=self.directory, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self.url(), connect_timeout=1).close()
                return self
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = log.read_text(errors="replace")[-2000:]
                    pytest.fail(f"postgres did not start on port {self.port}:\n{tail}")
                time.sleep(0.05)

    def database(self) -> str:
        """A new, empty database; returns its URL."""
        name = f"t{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # fast shutdown
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One server for the session (initdb takes a second or two); each test takes its own database."""
    server = PostgresServer().start()
    yield server
    server.stop()
