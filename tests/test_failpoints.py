"""relay.testing.failpoints: one list of names; an unknown name in RELAY_CRASH_AT or in code is an error."""

from __future__ import annotations

import ast
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from relay.testing.failpoints import FAILPOINTS, crashpoint, parse

RELAY = Path(__file__).resolve().parent.parent / "relay"


def points_in_code() -> set[str]:
    """Every literal name passed to crashpoint(...) anywhere under relay/."""
    found: set[str] = set()
    for path in RELAY.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", getattr(node.func, "attr", None)) == "crashpoint"
            ):
                [argument] = node.args
                assert isinstance(argument, ast.Constant) and isinstance(argument.value, str), (path, node.lineno)
                found.add(argument.value)
    return found


def test_the_list_names_exactly_the_points_in_the_code() -> None:
    assert len(set(FAILPOINTS)) == len(FAILPOINTS)
    assert points_in_code() == set(FAILPOINTS)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("", ("", 1)),
        ("after_commit", ("after_commit", 1)),
        ("mid_data:26", ("mid_data", 26)),
        (" mid_data:1 ", ("mid_data", 1)),
    ],
)
def test_parse(value: str, expected: tuple[str, int]) -> None:
    assert parse(value) == expected


@pytest.mark.parametrize(
    "value", ["after_comit", "after_commit:", "after_commit:0", "after_commit:x", ":3", "mid-data"]
)
def test_parse_refuses_what_would_never_fire(value: str) -> None:
    with pytest.raises(ValueError, match="RELAY_CRASH_AT"):
        parse(value)


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known: " + ", ".join(FAILPOINTS)):
        parse("after_comit:3")


def test_crashpoint_with_an_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="unknown failpoint 'afterr_commit'"):
        crashpoint("afterr_commit")
    crashpoint("after_commit")  # a known point not switched on: nothing happens


def run(code: str, crash_at: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RELAY_CRASH_AT": crash_at}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)


def test_an_unknown_name_in_the_environment_stops_start_up() -> None:
    # The relay's stores import the failpoints, so `relay serve` never starts with a typo in RELAY_CRASH_AT.
    result = run("import relay.app", "after_comit:12")
    assert result.returncode != 0
    assert "ValueError: RELAY_CRASH_AT='after_comit:12' names an unknown failpoint 'after_comit'" in result.stderr


def test_a_known_point_kills_the_process_on_the_nth_pass() -> None:
    code = (
        "from relay.testing.failpoints import crashpoint\n"
        "for n in range(1, 5):\n"
        "    crashpoint('before_promote')\n"
        "    print(n, flush=True)\n"
    )
    result = run(code, "before_promote:3")
    assert result.returncode == -signal.SIGKILL
    assert result.stdout.split() == ["1", "2"]
