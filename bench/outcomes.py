"""python -m bench.outcomes: the same as `python -m bench --only outcomes` (bench/scenarios/outcomes.py):
LAN throughput with delivery reports on against off, in the same run, and the history's size per message.

Kept as its own command because the README names it; its options are passed on (`--messages N` is the
phase's `--outcomes-messages N`, `--rounds N` its `--outcomes-rounds N`).
"""

from __future__ import annotations

import sys

from bench.__main__ import cli

RENAMED = {"--messages": "--outcomes-messages", "--rounds": "--outcomes-rounds"}


def renamed(arg: str) -> str:
    name, equals, value = arg.partition("=")
    return RENAMED.get(name, name) + equals + value


def main(argv: list[str]) -> int:
    return cli(["--only", "outcomes", "--no-postfix", *map(renamed, argv)])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
