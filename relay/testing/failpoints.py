"""Named failpoints for the kill -9 recovery tests: one list of names, switched on by an environment variable.

`RELAY_CRASH_AT=<point>:<n>` makes the process SIGKILL itself the n-th time it passes <point>, so a
test can kill it exactly between two steps of the spool protocol. Unset (always, in production) a
failpoint costs one string comparison and one set lookup.

An unknown name is an error, as in fail-rs: in the environment variable it stops start-up (this module
raises ValueError when imported), and in code `crashpoint("typo")` raises, so a misspelt point fails
the tests instead of silently never firing.
"""

from __future__ import annotations

import os
import signal

# Every failpoint in relay/, in data-path order. tests/test_failpoints.py checks this list against the code.
FAILPOINTS: tuple[str, ...] = (
    "before_commit",  # store: a record written to the journal, not yet fdatasync'd
    "after_commit",  # store: the batch fdatasync'd, its sessions not yet told
    "mid_data",  # upstream: the message's bytes partly sent to Infobip
    "after_upstream_reply",  # delivery: Infobip answered, nothing recorded yet
    "before_promote",  # store: the queue file written and fsync'd under tmp/, not yet renamed
    "after_promote",  # store: renamed into queue/ and the directory synced
    "after_spool_removed",  # delivery: settled messages' files removed from queue/ (a dead one's kept in dead/)
    "after_report_stored",  # outcomes: a report taken from Infobip and its bounce on disk, the bounce not sent
)
_KNOWN = frozenset(FAILPOINTS)
ENV_VAR = "RELAY_CRASH_AT"


def parse(value: str) -> tuple[str, int]:
    """`<point>[:<n>]` as (point, n); ("", 1) for an empty value. Raises ValueError for anything else."""
    point, colon, nth = value.strip().partition(":")
    if not point:
        if value.strip():
            raise ValueError(f"{ENV_VAR}={value!r} names no failpoint; use <point>[:<n>]")
        return "", 1
    if point not in _KNOWN:
        raise ValueError(f"{ENV_VAR}={value!r} names an unknown failpoint {point!r}; known: {', '.join(FAILPOINTS)}")
    if not colon:
        return point, 1
    if not nth.isdigit() or int(nth) < 1:
        raise ValueError(f"{ENV_VAR}={value!r}: the count after ':' must be a whole number from 1")
    return point, int(nth)


_point, _remaining = parse(os.environ.get(ENV_VAR, ""))


def crashpoint(name: str) -> None:
    """SIGKILL this process here if RELAY_CRASH_AT names this point and this is the n-th pass."""
    global _remaining
    if name != _point:
        if name not in _KNOWN:
            raise ValueError(f"unknown failpoint {name!r}: add it to FAILPOINTS in relay/testing/failpoints.py")
        return
    _remaining -= 1
    if _remaining <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
