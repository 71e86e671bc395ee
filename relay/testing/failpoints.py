"""Named crash points for the kill -9 recovery tests.

`RELAY_CRASH_AT=<point>:<n>` makes the process SIGKILL itself the n-th time it passes <point>, so a
test can kill it exactly between two steps of the spool protocol. Unset (always, in production) a
crash point is one string comparison.
"""

from __future__ import annotations

import os
import signal

_point, _, _nth = os.environ.get("RELAY_CRASH_AT", "").partition(":")
_remaining = int(_nth or 1)


def crashpoint(name: str) -> None:
    global _remaining
    if name != _point:
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
