"""`--profile py-spy|pyinstrument`: one extra run of a relay under a profiler; the profile is summarised
(top frames on stderr, shares in the JSON) and kept in the workdir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import label, log
from bench.harness import Harness, Results, Scenario, stop_target
from bench.measure import measure


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    config, rtt = args.profile_config, args.profile_rtt_ms
    log(f"== profile ({args.profile}) of {label(config)} at {rtt:g} ms RTT, {args.clients} x {args.profile_messages}")
    target = await harness.target(config, rtt, f"profile-{config}")
    assert target is not None and target.relay is not None
    try:
        m = await measure(harness, target, clients=args.clients, messages=args.profile_messages, warmup=args.warmup)
    finally:
        await stop_target(target)
    out: dict[str, Any] = {"config": config, "rtt_ms": rtt, "run": m, "file": str(target.relay.profile_out)}
    path = target.relay.profile_out
    if args.profile == "py-spy" and path is not None and path.exists():
        out["summary"] = summarise_collapsed(path)
        log(f"   profile: {path}")
        for row in out["summary"]["self"][:25]:
            log(f"   self {row['share']:6.1%}  {row['frame']}")
        for row in out["summary"]["inclusive"][:40]:
            log(f"   incl {row['share']:6.1%}  {row['frame']}")
    elif path is not None and path.exists():
        log(f"   profile: {path}")
        log(path.read_text()[:6000])
    results["profile"] = out


def summarise_collapsed(path: Path) -> dict[str, Any]:
    """Self and inclusive shares per frame from py-spy's collapsed ("raw") output."""
    total = 0
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        total += count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            incl[frame] = incl.get(frame, 0) + count

    def top(table: dict[str, int], n: int) -> list[dict[str, Any]]:
        rows = sorted(table.items(), key=lambda kv: -kv[1])[:n]
        return [{"frame": frame, "samples": count, "share": count / total if total else 0.0} for frame, count in rows]

    return {"samples": total, "self": top(own, 60), "inclusive": top(incl, 120)}


SCENARIO = Scenario("profile", run)
