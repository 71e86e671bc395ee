"""The bench's results: the JSON file (bench/results.json), the console summary after a run, and Markdown
tables of every figure for docs/PERFORMANCE.md.

    python -m bench.report [bench/results.json]

Nothing here measures: it only formats what `python -m bench` wrote (each scenario formats its own
section), so the document carries the run's own numbers.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.common import ROOT, git_info, machine_info
from bench.harness import Results, Verdict
from bench.scenarios import ON_REQUEST, PHASES

# results.json


def new_results(args: argparse.Namespace, workdir: Path) -> Results:
    """The `meta` block: when, what command, which machine and commit, every setting."""
    meta = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench", *sys.argv[1:]]),
        "machine": machine_info(),
        "workdir": str(workdir),
        "git": git_info(),
        "harness_uvloop": args.harness_uvloop,
        "settings": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in vars(args).items()
            if k not in ("output", "plot_output", "workdir")
        },
    }
    return {"meta": meta}


def evaluate(results: Results, args: argparse.Namespace) -> list[Verdict]:
    """Every scenario's targets (issues 6 and 18), judged on the figures of this run."""
    return [v for scenario in {**PHASES, **ON_REQUEST}.values() for v in scenario.targets(results, args)]


def _public(value: Any) -> Any:
    """Drop working keys (leading underscore, e.g. raw latencies) before writing the JSON."""
    if isinstance(value, dict):
        return {k: _public(v) for k, v in value.items() if not str(k).startswith("_")}
    if isinstance(value, list):
        return [_public(v) for v in value]
    return value


def write(results: Results, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_public(results), indent=2) + "\n")


# the console summary


def print_summary(results: Results) -> None:
    print()
    print("=" * 100)
    print("RESULTS (every ratio is against a baseline measured in this same run)")
    for scenario in {**PHASES, **ON_REQUEST}.values():
        for line in scenario.summary(results):
            print(line)
    print("\nTargets")
    for v in results.get("targets", []):
        mark = {True: "MET   ", False: "MISSED", None: "n/a   "}[v["met"]]
        print(f"  [{mark}] {v['target']}\n           {v['figures']}")
    for note in results.get("skipped", []):
        print(f"  note: {note}")
    print("=" * 100)


# Markdown


def targets(results: Results) -> list[str]:
    lines = ["| target | verdict | figures |", "|---|---|---|"]
    for v in results.get("targets", []):
        verdict = {True: "**met**", False: "**missed**", None: "n/a"}[v["met"]]
        lines.append(f"| {v['target']} | {verdict} | {v['figures']} |")
    return [*lines, ""]


def render(results: Results) -> str:
    meta = results.get("meta", {})
    body = [
        f"Run of {meta.get('started_at')} (`{meta.get('command')}`), {meta.get('duration_seconds')} s, "
        f"relay at commit {meta.get('git', {}).get('commit')}"
        + (" plus uncommitted changes in relay/" if meta.get("git", {}).get("relay_changes_uncommitted") else "")
        + f"; machine: {meta.get('machine')}",
        "",
    ]
    parts = [(s.title, s.markdown(results)) for s in PHASES.values()] + [("Targets", targets(results))]
    for title, lines in parts:
        if lines:
            body += [f"### {title}", "", *lines]
    return "\n".join(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report")
    parser.add_argument("source", nargs="?", type=Path, default=ROOT / "bench" / "results.json")
    args = parser.parse_args(argv)
    print(render(json.loads(args.source.read_text())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
