"""What the image does, tested without a Docker engine: the Dockerfile's own command line, run as its
non-root user, on a read-only root file system (bubblewrap) where only the spool is writable."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import shutil
import signal
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, free_port, message
from tests.test_ops import wait_listening

pytestmark = pytest.mark.slow  # a relay in a read-only sandbox: seconds each; .ci/run runs them

ROOT = Path(__file__).resolve().parent.parent
needs_bwrap = pytest.mark.skipif(
    (shutil.which("bwrap") is None or os.geteuid() != 0) and not os.environ.get("RELAY_TEST_REQUIRE_BWRAP"),
    reason="needs root and bubblewrap (apt-get install bubblewrap; .ci/run does)",
)


def dockerfile() -> dict[str, str]:
    """The last value of each instruction, continuation lines joined."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    instructions: dict[str, str] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions[keyword.upper()] = rest.strip()
    return instructions


def test_image_runs_the_relay_as_a_non_root_user_with_a_healthcheck() -> None:
    image = dockerfile()
    assert json.loads(image["ENTRYPOINT"]) + json.loads(image["CMD"]) == [
        "relay",
        "serve",
        "--config",
        "/etc/relay/config.toml",
    ]
    assert image["USER"].split(":")[0] not in ("root", "0")
    assert image["FROM"].split(":")[1][0].isdigit()  # a pinned version, not "latest"
    assert image["HEALTHCHECK"].endswith('CMD ["relay", "healthcheck", "--config", "/etc/relay/config.toml"]')
    assert image["STOPSIGNAL"] == "SIGTERM"
    assert "/var/spool/relay" in image["VOLUME"] and set(image["EXPOSE"].split()) == {"2525", "9090"}


@needs_bwrap
async def test_relay_runs_non_root_on_a_read_only_root_with_only_the_spool_writable(
    standin: InfobipStandIn,
) -> None:
    uid = int(dockerfile()["USER"].split(":")[0])
    code = [ROOT, Path(sys.prefix), Path(sys.base_prefix)]  # the image's user must reach the installed relay
    with _traversable(code), tempfile.TemporaryDirectory(prefix="relay-container-") as name:
        os.chmod(name, 0o755)  # readable by that user, unlike tmp_path
        await _run_as_the_image_would(standin, Path(name), uid)


@contextlib.contextmanager
def _traversable(paths: list[Path]) -> Iterator[None]:
    """Let other users through every directory above `paths` for the test's duration: a checkout under
    a 0700 directory (mktemp -d) would otherwise hide the relay from the non-root user."""
    changed: dict[Path, int] = {}
    for path in paths:
        for directory in [path.resolve(), *path.resolve().parents]:
            mode = directory.stat().st_mode
            if directory not in changed and not mode & stat.S_IXOTH:
                changed[directory] = mode
                directory.chmod(mode | stat.S_IXOTH)
    try:
        yield
    finally:
        for directory, mode in changed.items():
            directory.chmod(stat.S_IMODE(mode))


async def _run_as_the_image_would(standin: InfobipStandIn, tmp_path: Path, uid: int) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    os.chown(spool, uid, uid)
    ca_file = tmp_path / "ca.pem"
    shutil.copy(standin.ca_file, ca_file)
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / "config.toml"
    config.write_text(
        f"""
[listen]
host = "127.0.0.1"
port = {smtp_port}
hostname = "relay.test"
[upstream]
host = "localhost"
port = {standin.port}
username = "{standin.username}"
password = "{standin.password}"
ca_file = "{ca_file}"
[spool]
path = "{spool}"
sync_wait = 2.0
[http]
host = "127.0.0.1"
port = {http_port}
"""
    )
    for path in (config, ca_file):
        os.chmod(path, 0o644)
    # The image's command line, with the config file of this test instead of /etc/relay/config.toml.
    image = dockerfile()
    command = json.loads(image["ENTRYPOINT"]) + json.loads(image["CMD"])
    command[0] = str(Path(sys.executable).parent / "relay")
    command[command.index("--config") + 1] = str(config)
    sandbox = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--bind", str(spool), str(spool)]
    as_user = ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    process = await asyncio.create_subprocess_exec(
        *sandbox,
        "--",
        *as_user,
        *command,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await wait_listening(smtp_port, process)
        dialog = await Dialog.open(smtp_port)
        await dialog.hello()
        reply = await dialog.mail("billing@erp.example.com", ["a@example.org"], message())
        await dialog.close()
        assert reply.startswith("250 2.6.0 Message queued as "), reply
        assert len(standin.messages) == 1

        # The image's HEALTHCHECK command, against this relay (it finds the port in the config).
        health = json.loads(image["HEALTHCHECK"].split("CMD", 1)[1])
        health[0] = str(Path(sys.executable).parent / "relay")
        health[health.index("--config") + 1] = str(config)
        probe = await asyncio.create_subprocess_exec(*health, stdout=asyncio.subprocess.PIPE)
        assert await asyncio.wait_for(probe.wait(), 20) == 0
        assert probe.stdout is not None and f":{http_port}/healthz: alive" in (await probe.stdout.read()).decode()

        owners = {(tmp_path / "spool" / d).stat().st_uid for d in ("queue", "tmp", "dead")}
        assert owners == {uid}  # created by the non-root user, in the only writable place

        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        os.kill(int(children[0]), signal.SIGTERM)  # bwrap does not forward signals: SIGTERM the relay
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.stderr is not None
    logs = (await process.stderr.read()).decode()
    assert "Read-only file system" not in logs and "Traceback" not in logs, logs
    assert '"event": "relay_stopped"' in logs, shlex.join(command) + "\n" + logs
