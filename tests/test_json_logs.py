"""With `log.format = "json"` every line the relay writes to stdout and stderr is one JSON object (issue 12,
item 11): its own events, aiosmtpd's and asyncio's loggers, warnings, and exceptions nobody caught, a traceback
always in the `exception` field of its line. And no body is logged, even at DEBUG.

Real processes: a small program that makes each of those happen for real after `configure_logging` (a task
whose exception is never retrieved, a warning, a thread that dies, an exception at top level), and a real
`relay serve` at DEBUG taking a message and some abuse.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, free_port, message
from tests.helpers import write_config

pytestmark = pytest.mark.slow  # a real relay process at debug level: seconds each; .ci/run runs them

ROOT = Path(__file__).resolve().parent.parent
BODY_MARKER = "body-marker-7f3a9c"

EVERYTHING_THAT_WRITES = """
import asyncio, gc, logging, threading, warnings
import structlog
from relay.config import LogSettings
from relay.ops.logs import configure_logging

configure_logging(LogSettings(format="json", level="info"))
structlog.get_logger("relay.test").info("our_event", n=1)
try:
    1 / 0
except ZeroDivisionError:
    structlog.get_logger("relay.test").exception("our_exception")
logging.getLogger("mail.log").error("%r SMTP session exception", ("127.0.0.1", 5), exc_info=ValueError("in aiosmtpd"))
logging.getLogger("mail.log").warning("%r >> %r", ("127.0.0.1", 5), b"AUTH PLAIN c2VjcmV0")  # held back
warnings.warn("something is deprecated", UserWarning)


async def main() -> None:
    async def fails() -> None:
        raise RuntimeError("never retrieved")

    task = asyncio.get_running_loop().create_task(fails())
    while not task.done():
        await asyncio.sleep(0)
    del task
    gc.collect()  # asyncio logs "Task exception was never retrieved" as the task goes


asyncio.run(main())
thread = threading.Thread(target=lambda: 1 / 0, name="worker")
thread.start()
thread.join()


class Unraisable:
    def __del__(self) -> None:
        raise OSError("in __del__")


Unraisable()
raise LookupError("uncaught at top level")
"""


def json_lines(output: bytes) -> list[dict[str, Any]]:
    """Every line as a JSON object; fails naming the first line that is not one."""
    events = []
    for line in output.decode().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}\nin:\n{output.decode()}") from None
        assert isinstance(event, dict), line
        events.append(event)
    return events


def test_every_line_on_stdout_and_stderr_is_one_json_object_whoever_writes_it() -> None:
    done = subprocess.run(
        [sys.executable, "-c", EVERYTHING_THAT_WRITES], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    assert done.returncode == 1  # the exception at top level still ends the program as it would
    assert done.stdout == b""
    events = json_lines(done.stderr)
    by_event = {e["event"]: e for e in events}
    assert by_event["our_event"]["n"] == 1
    assert "ZeroDivisionError" in by_event["our_exception"]["exception"]
    aiosmtpd = by_event["('127.0.0.1', 5) SMTP session exception"]
    assert aiosmtpd["logger"] == "mail.log" and "ValueError: in aiosmtpd" in aiosmtpd["exception"]
    assert not any("AUTH" in e["event"] for e in events)  # mail.log below ERROR stays out
    [warning] = [e for e in events if e.get("logger") == "py.warnings"]
    assert "UserWarning: something is deprecated" in warning["event"]
    [never_retrieved] = [e for e in events if e.get("logger") == "asyncio"]
    assert never_retrieved["event"].startswith("Task exception was never retrieved")
    assert "RuntimeError: never retrieved" in never_retrieved["exception"]
    uncaught = [e for e in events if e["event"] == "uncaught_exception"]
    assert [e.get("thread") for e in uncaught] == ["worker", None]
    assert "ZeroDivisionError" in uncaught[0]["exception"] and "LookupError" in uncaught[1]["exception"]
    assert "OSError: in __del__" in by_event["unraisable_exception"]["exception"]
    assert all(e["level"] and e["timestamp"] for e in events)


RELOADED_LEVEL = """
import structlog
from relay.config import LogSettings
from relay.ops.logs import configure_logging

log = structlog.get_logger("relay.test")
configure_logging(LogSettings(format="json", level="info"))
log.info("before", n=1)  # the logger is cached here
configure_logging(LogSettings(format="json", level="warning"))  # what a SIGHUP does
log.info("dropped", n=2)
log.warning("kept", n=3)
configure_logging(LogSettings(format="json", level="info"))
log.info("back", n=4)
"""


def test_a_reloaded_level_applies_to_loggers_already_in_use() -> None:
    done = subprocess.run([sys.executable, "-c", RELOADED_LEVEL], cwd=ROOT, capture_output=True, timeout=60, check=True)
    assert [(e["event"], e["level"]) for e in json_lines(done.stderr)] == [
        ("before", "info"),
        ("kept", "warning"),
        ("back", "info"),
    ]


BATCHED = """
import asyncio, sys, threading
import structlog
from relay.config import LogSettings
from relay.ops.logs import configure_logging

class Counting:
    def __init__(self, out): self.out, self.writes = out, []
    def write(self, text): self.writes.append(text); return self.out.write(text)
    def flush(self): self.out.flush()

sys.stderr = counting = Counting(sys.stderr)
configure_logging(LogSettings(format="json", level="info"))
log = structlog.get_logger("relay.test")

async def main():
    for n in range(3):
        log.info("in_the_loop", n=n)
    assert counting.writes == [], "written before the iteration ended"
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    print(len(counting.writes), counting.writes[0].count("\\n"), file=sys.__stdout__)
    thread = threading.Thread(target=lambda: log.info("from_a_thread"))
    thread.start(); thread.join()
    print(len(counting.writes), file=sys.__stdout__)
    log.info("last_before_the_loop_ends")

asyncio.run(main())
"""


def test_the_lines_of_one_loop_iteration_go_out_in_one_write_and_none_is_lost_at_exit() -> None:
    done = subprocess.run([sys.executable, "-c", BATCHED], cwd=ROOT, capture_output=True, timeout=60, check=True)
    assert done.stdout.split() == [b"1", b"3", b"2"]  # 3 lines, 1 write; a thread's line at once
    events = [e["event"] for e in json_lines(done.stderr)]
    assert events == ["in_the_loop"] * 3 + ["from_a_thread", "last_before_the_loop_ends"]


async def test_a_relay_at_debug_writes_json_lines_only_and_never_a_body(
    standin: InfobipStandIn, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(tmp_path / "relay.toml", standin, port=port, log={"level": "debug", "format": "json"})
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "relay", "serve", "--config", str(config)),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        dialog = await _connect(port, process)
        await dialog.hello()
        assert (await dialog.send("NONSENSE with arguments")).startswith("500 ")
        assert (await dialog.send("MAIL FROM:<broken")).startswith("553 ")
        data = message(body=f"{BODY_MARKER}\r\n".encode(), X_Secret=BODY_MARKER)
        assert (await dialog.mail("billing@erp.example.com", ["a@example.org"], data)).startswith("250 2.6.0 ")
        dialog.writer.write(b"\x16\x03\x01garbage that is not SMTP\r\n")  # and hang up mid-command
        await dialog.close()
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await asyncio.wait_for(process.communicate(), 15)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0
    events = json_lines(stdout) + json_lines(stderr)
    assert {"relay_listening", "relay_stopped"} <= {e["event"] for e in events}
    assert BODY_MARKER.encode() not in stdout + stderr


async def _connect(port: int, process: asyncio.subprocess.Process) -> Dialog:
    for _ in range(750):
        assert process.returncode is None, "relay exited"
        try:
            return await Dialog.open(port)
        except OSError:
            await asyncio.sleep(0.02)
    raise AssertionError("relay did not start listening")
