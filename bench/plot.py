"""Draw delivered msgs/s against concurrency from the bench's JSON.

python -m bench.plot [results.json] [-o docs/performance.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from bench.common import ROOT, label

STYLE = {  # colour, marker, line
    "ceiling": ("black", "o", "-"),
    "relay_off": ("tab:blue", "s", "-"),
    "relay_on": ("tab:green", "^", "-"),
    "postfix": ("tab:red", "D", "--"),
}


def plot(source: Path, target: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(source.read_text())
    sweep = results.get("sweep") or {}
    if not sweep:
        raise SystemExit(f"{source} has no concurrency sweep (run python -m bench with the sweep phase)")
    pool = results.get("meta", {}).get("settings", {}).get("pool_size")
    fig, axes = plt.subplots(1, len(sweep), figsize=(6.2 * len(sweep), 4.6), squeeze=False)
    for ax, (rtt, per) in zip(axes[0], sorted(sweep.items(), key=lambda kv: float(kv[0])), strict=True):
        levels: set[int] = set()
        for config, points in per.items():
            xs = sorted(int(k) for k in points if k.isdigit() and "delivered_per_s" in points[k])
            if not xs:
                continue
            levels.update(xs)
            color, marker, line = STYLE.get(config, (None, "x", ":"))
            ys = [points[str(x)]["delivered_per_s"] for x in xs]
            ax.plot(xs, ys, marker=marker, linestyle=line, color=color, label=label(config, long=True))
        if float(rtt) > 0 and levels:
            xs = sorted(levels)
            ideal = [x / (2 * float(rtt) / 1000) for x in xs]
            ax.plot(xs, ideal, linestyle=":", color="grey", label="C / (2 x RTT)")
        if pool:
            ax.axvline(pool, color="grey", linewidth=0.8, alpha=0.5)
            ax.annotate(
                f"relay pool_size={pool}",
                (pool, 0),
                xytext=(3, 3),
                textcoords="offset points",
                fontsize=8,
                color="grey",
            )
        ax.set_title(f"{float(rtt):g} ms RTT to the upstream")
        ax.set_xlabel("concurrent client connections (C)")
        ax.set_ylabel("delivered msgs/s (end to end, at the upstream)")
        ax.set_xticks(sorted(levels))
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    meta = results.get("meta", {})
    fig.suptitle(
        f"Delivered msgs/s vs concurrency ({meta.get('machine', {}).get('cpus')} CPUs, {meta.get('started_at', '')})",
        fontsize=10,
    )
    handles: dict[str, Any] = {}
    for ax in axes[0]:
        for handle, text in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(text, handle)
    fig.legend(list(handles.values()), list(handles.keys()), loc="lower center", ncol=len(handles), fontsize=8)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.plot")
    parser.add_argument("source", nargs="?", type=Path, default=ROOT / "bench" / "results.json")
    parser.add_argument("-o", "--output", type=Path, default=ROOT / "docs" / "performance.png")
    args = parser.parse_args(argv)
    plot(args.source, args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
