"""The spool holds recipient addresses and bodies: directories 0700 and files 0600 whatever the umask
(issue 12, item 9), and a spool an older relay left open is made private at start-up, with a log line."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import structlog.testing

from relay.store.spool import Spool
from relay.testing.standin import InfobipStandIn
from tests.conftest import StartRelay, message
from tests.helpers import send_one, spooled, until

SENDER = "billing@erp.example.com"


def modes(root: Path) -> Iterator[tuple[str, bool, int]]:
    """(path relative to root, is a directory, permission bits) for root and everything under it."""
    yield ".", True, stat.S_IMODE(root.stat().st_mode)
    for directory, subdirectories, files in os.walk(root):
        for name in subdirectories + files:
            path = Path(directory) / name
            yield str(path.relative_to(root)), name in subdirectories, stat.S_IMODE(path.lstat().st_mode)


async def test_spool_files_and_directories_are_private_whatever_the_umask(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    spool_path = tmp_path / "spool"
    before = os.umask(0)  # the most open umask: every mode below is the relay's own choice
    try:
        standin.behaviour.data_replies.append("554 5.6.0 Message content rejected")
        relay = await start_relay(spool=spooled(spool_path, sync_wait=0.0, retry_initial=60))
        reply = await send_one(relay.port, SENDER, ["dead@example.org"], message())
        dead_id = reply.split("Queued as ")[1].split(";")[0]
        await until(lambda: (spool_path / "dead" / f"{dead_id}.state").exists())
        standin.behaviour.data_replies.append("451 4.3.0 Try later")  # the next one waits in queue/, with a .state
        reply = await send_one(relay.port, SENDER, ["later@example.org"], message())
        queued_id = reply.split("Queued as ")[1].split(";")[0]
        await until(lambda: (spool_path / "queue" / f"{queued_id}.state").exists())
        Spool(spool_path).request_flush()  # what `relay queue flush` writes
        found = list(modes(spool_path))
    finally:
        os.umask(before)
    names = {name for name, _, _ in found}
    assert {f"dead/{dead_id}.msg", f"dead/{dead_id}.state", f"queue/{queued_id}.msg", "flush.request"} <= names
    assert any(name.startswith("journal/") for name in names) and "lock" in names
    wrong = [(name, oct(mode)) for name, is_dir, mode in found if mode != (0o700 if is_dir else 0o600)]
    assert wrong == []


async def test_an_open_spool_from_an_older_relay_is_made_private_at_start_up_and_logged(
    start_relay: StartRelay, tmp_path: Path
) -> None:
    spool_path = tmp_path / "spool"
    for name in ("", "tmp", "queue", "dead", "journal"):
        (spool_path / name).mkdir(exist_ok=True)
        (spool_path / name).chmod(0o755)  # as 7eaaba9 left them
    with structlog.testing.capture_logs() as logs:
        relay = await start_relay(spool=spooled(spool_path))
    assert (await send_one(relay.port, SENDER, ["a@example.org"], message())).startswith("250 2.6.0 ")
    opened = [(name, oct(mode)) for name, is_dir, mode in modes(spool_path) if is_dir and mode != 0o700]
    assert opened == []
    tightened = {e["path"]: (e["old"], e["new"]) for e in logs if e["event"] == "spool_permissions_tightened"}
    assert tightened == {
        str(spool_path / name).rstrip("/"): ("755", "700") for name in ("", "tmp", "queue", "dead", "journal")
    }
