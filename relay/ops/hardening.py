"""What the process does to itself at start-up so that a crash or a local user cannot read its memory.

The memory holds the Infobip password and messages in clear: a core file would write them to disk, and a
debugger of the same user could read them. So no core files (RLIMIT_CORE 0) and not dumpable
(prctl(PR_SET_DUMPABLE, 0): no core either way, and /proc/<pid>/mem, environ and ptrace become root's only).
"""

from __future__ import annotations

import ctypes
import resource
import sys

import structlog

log = structlog.get_logger("relay.ops.hardening")
PR_SET_DUMPABLE = 4  # <linux/prctl.h>


def forbid_core_dumps() -> None:
    """Soft and hard RLIMIT_CORE 0 (a child cannot raise it again), then not dumpable on Linux."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # cannot fail on Linux >= 2.6.13; say so if it does
        log.warning("process_still_dumpable", errno=ctypes.get_errno())
