"""A core file or a same-user debugger would read the Infobip password and messages from the relay's memory:
`relay serve` sets RLIMIT_CORE to 0 and makes itself non-dumpable at start-up (issue 12, item 10).

Seen from outside a real `relay serve` process: its /proc/<pid>/limits, and the owner of /proc/<pid>/environ,
which the kernel gives to root for a non-dumpable process. The relay runs as an unprivileged user for that
(nobody when the tests run as root), started with core dumps allowed, so only the relay can turn them off.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, free_port, message
from tests.test_container import _traversable
from tests.test_processes import ROOT, _child_env, write_config

pytestmark = pytest.mark.slow  # a real relay process run as another user: seconds each; .ci/run runs them

NOBODY = 65534


@contextlib.contextmanager
def cores_allowed() -> Iterator[None]:
    """Core dumps as open as this test process may make them, for the children it starts meanwhile."""
    before = resource.getrlimit(resource.RLIMIT_CORE)
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    except (ValueError, OSError):  # not root: as far as the hard limit goes
        resource.setrlimit(resource.RLIMIT_CORE, (before[1], before[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_CORE, before)


async def test_relay_serve_allows_no_core_dump_and_is_not_dumpable(standin: InfobipStandIn) -> None:
    uid = NOBODY if os.geteuid() == 0 else os.geteuid()
    port = free_port()
    with (
        _traversable([ROOT, Path(sys.prefix), Path(sys.base_prefix)]),
        tempfile.TemporaryDirectory(prefix="relay-cores-") as name,
    ):
        home = Path(name)
        os.chmod(home, 0o755)
        spool = home / "spool"
        spool.mkdir()
        os.chown(spool, uid, uid)
        ca_file = home / "ca.pem"
        shutil.copy(standin.ca_file, ca_file)
        config = write_config(home / "relay.toml", standin, port=port, spool=spool)
        config.write_text(config.read_text().replace(str(standin.ca_file), str(ca_file)))
        for path in (config, ca_file):
            os.chmod(path, 0o644)
        with cores_allowed():
            process = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "relay", "serve", "--config", str(config)),
                cwd=ROOT,
                env=_child_env(),
                # user=uid, group=uid, extra_groups=[] as uvloop takes them (its subprocess_exec has no such kwargs)
                preexec_fn=lambda: (os.setgroups([]), os.setgid(uid), os.setuid(uid)),
                stderr=asyncio.subprocess.PIPE,
            )
        try:
            dialog = await _connect(port, process)
            await dialog.hello()
            reply = await dialog.mail("billing@erp.example.com", ["a@example.org"], message())
            assert reply.startswith("250 2.6.0 "), reply  # up and serving: start-up is over
            await dialog.close()

            limits = Path(f"/proc/{process.pid}/limits").read_text().splitlines()
            assert next(line for line in limits if line.startswith("Max core file size")).split()[4:6] == ["0", "0"]
            status = Path(f"/proc/{process.pid}/status").read_text()
            real_uid = int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])
            assert real_uid == uid != 0
            assert Path(f"/proc/{process.pid}/environ").stat().st_uid == 0  # the kernel marks a non-dumpable process
        finally:
            if process.returncode is None:
                process.terminate()
            assert await asyncio.wait_for(process.wait(), 15) == 0
        assert process.stderr is not None
        logs = (await process.stderr.read()).decode()
        assert "Traceback" not in logs and "process_still_dumpable" not in logs, logs


async def _connect(port: int, process: asyncio.subprocess.Process) -> Dialog:
    for _ in range(750):
        if process.returncode is not None:
            assert process.stderr is not None
            raise AssertionError(f"relay exited: {(await process.stderr.read()).decode()}")
        try:
            return await Dialog.open(port)
        except OSError:
            await asyncio.sleep(0.02)
    raise AssertionError("relay did not start listening")
