"""Every log event the relay writes is named in the README (issue 13): ops grep for them."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_CALL = re.compile(r"\blog\.(?:debug|info|warning|error|exception|critical)\(\s*\"([a-z_]+)\"")
_HELPER = re.compile(r"\blog_message\(\s*\w+,\s*\"([a-z_]+)\"")


def events_in_the_code() -> set[str]:
    events: set[str] = set()
    for path in (ROOT / "relay").rglob("*.py"):
        text = path.read_text()
        events |= set(_CALL.findall(text)) | set(_HELPER.findall(text))
    return events


def test_every_event_the_relay_logs_is_in_the_readme() -> None:
    events = events_in_the_code()
    assert {"relay_listening", "delivery_attempt", "message_rejected", "config_reloaded"} <= events  # the scan works
    readme = (ROOT / "README.md").read_text()
    missing = sorted(event for event in events if f"`{event}`" not in readme)
    assert not missing, f"log events the README does not list: {missing}"
