"""python -m bench: throughput, latency, connections and memory of the relay against its baselines.

Every figure is measured in this one run, and compared with baselines measured in the same run (this
machine is shared and noisy): (a) the ceiling, a pipelining client talking to the upstream directly
through the same delay proxy, and (d) Postfix as a smarthost, when it is installed.

This module only reads the command line and runs the phases: each phase is a module in bench/scenarios/,
the processes they measure are started by bench/harness.py, one measurement is bench/measure.py, and the
JSON and the printed summary come from bench/report.py. See docs/PERFORMANCE.md for what each figure means.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench import report
from bench.common import ROOT, log, run_loop, uvloop_available
from bench.harness import Harness, Results
from bench.scenarios import ON_REQUEST, PHASES, PROFILE

BASE_CONFIGS = ("ceiling", "relay_off", "relay_on", "postfix")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    def floats(text: str) -> list[float]:
        return [float(x) for x in text.split(",") if x.strip()]

    def ints(text: str) -> list[int]:
        return [int(x) for x in text.split(",") if x.strip()]

    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rtt-ms", type=floats, default=[0.0, 20.0], help="round-trip times to add (default 0,20)")
    parser.add_argument("--clients", type=int, default=10, help="concurrent client connections (default 10)")
    parser.add_argument(
        "--messages", type=int, default=200, help="messages per client per round at 0 ms RTT (default 200)"
    )
    parser.add_argument(
        "--messages-rtt", type=int, default=40, help="messages per client per round when RTT > 0 (default 40)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds at 0 ms RTT (default 5)")
    parser.add_argument("--rounds-rtt", type=int, default=3, help="interleaved rounds when RTT > 0 (default 3)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed messages per client first (default 2)")
    parser.add_argument("--pool-size", type=int, default=10, help="relay upstream.pool_size (default 10)")
    parser.add_argument(
        "--configs",
        default=",".join(BASE_CONFIGS),
        help="what to measure: ceiling,relay_off,relay_on,postfix; a relay config may take experiments, "
        "each after a '+': uvloop (the relay on uvloop), switch=SECONDS (sys.setswitchinterval), "
        "log=LEVEL (log.level, default info), src=DIR (the relay of another checkout, for an A/B), "
        "sync_wait=SECONDS (spool.sync_wait, default 5: 0 answers once on disk); "
        "e.g. relay_on+uvloop+log=warning",
    )
    parser.add_argument("--no-postfix", action="store_true", help="leave Postfix out")
    parser.add_argument("--sweep", type=ints, default=[1, 2, 5, 10, 20], help="concurrency levels (1,2,5,10,20)")
    parser.add_argument("--sweep-rtt-ms", type=floats, default=[0.0, 20.0], help="RTTs for the sweep (default 0,20)")
    parser.add_argument("--sweep-rounds", type=int, default=2, help="interleaved rounds per level (median)")
    parser.add_argument(
        "--sweep-messages", type=int, default=40, help="messages per client per level and round (default 40)"
    )
    parser.add_argument("--recipients", type=int, default=1000, help="recipients of the one message (default 1000)")
    parser.add_argument("--recipients-rtt-ms", type=float, default=20.0)
    parser.add_argument("--recipients-repeats", type=int, default=3)
    parser.add_argument("--large-mb", type=int, default=20, help="size of a large message in MB (default 20)")
    parser.add_argument("--large-concurrency", type=int, default=10)
    parser.add_argument("--large-rtt-ms", type=float, default=0.0)
    parser.add_argument("--spool-messages", type=int, default=50_000, help="queued messages for start-up (50000)")
    parser.add_argument(
        "--only",
        default="",
        help=f"comma-separated phases to run: {','.join(PHASES)} (and on request: {', '.join(ON_REQUEST)})",
    )
    parser.add_argument("--outage-seconds", type=floats, default=None, help="outage lengths (default 20,180)")
    parser.add_argument("--outage-rate", type=float, default=10.0, help="messages a second during the outage bench")
    parser.add_argument(
        "--profiles-rounds", type=int, default=6, help="interleaved rounds per RTT of the profiles phase (default 6)"
    )
    parser.add_argument(
        "--outcomes-messages", type=int, default=10_000, help="timed messages per config of the outcomes phase"
    )
    parser.add_argument("--outcomes-rounds", type=int, default=8, help="interleaved rounds of the outcomes phase")
    parser.add_argument(
        "--outcomes-profile", choices=["py-spy", "pyinstrument"], help="run the outcomes phase's relays profiled"
    )
    parser.add_argument("--skip", default="", help="comma-separated phases to leave out")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in about a minute")
    parser.add_argument(
        "--output",
        type=Path,
        help="JSON file (default bench/results.json for a full run, "
        "bench/results.partial.json for --quick, --only, --skip or --profile runs)",
    )
    parser.add_argument("--plot", action="store_true", help="also draw docs/performance.png from the JSON")
    parser.add_argument("--plot-output", type=Path, default=ROOT / "docs" / "performance.png")
    parser.add_argument("--profile", choices=["py-spy", "pyinstrument"], help="one extra profiled relay run")
    parser.add_argument("--profile-config", default="relay_on")
    parser.add_argument("--profile-rtt-ms", type=float, default=0.0)
    parser.add_argument("--profile-messages", type=int, default=500, help="messages per client (default 500)")
    parser.add_argument(
        "--harness-uvloop",
        action=argparse.BooleanOptionalAction,
        default=uvloop_available(),
        help="run the stand-in, proxy and load client on uvloop (default: when installed)",
    )
    parser.add_argument("--workdir", type=Path, help="where spools, configs and logs go (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (logs, configs, profiles)")
    args = parser.parse_args(argv)
    args.configs = [c for c in args.configs.split(",") if c and not (args.no_postfix and c == "postfix")]
    if args.quick:
        args.messages, args.messages_rtt, args.sweep_messages, args.rounds, args.rounds_rtt = 100, 20, 15, 2, 1
        args.sweep, args.sweep_rtt_ms, args.sweep_rounds = [1, 5, 10, 20], [20.0], 1
        args.recipients_repeats, args.spool_messages, args.large_concurrency = 1, 5000, 10
        args.profile_messages = 100
    only = {p for p in args.only.split(",") if p}
    skip = {p for p in args.skip.split(",") if p}
    unknown = (only | skip) - set(PHASES) - set(ON_REQUEST)
    if unknown:
        parser.error(f"unknown phase(s) {sorted(unknown)}; choose from {', '.join(PHASES)}")
    args.phases = [p for p in {**PHASES, **ON_REQUEST} if (p in only or (not only and p in PHASES)) and p not in skip]
    if args.profile and not args.only:
        args.phases = []  # --profile alone runs only the profile
    if args.output is None:
        partial = args.quick or args.profile or set(args.phases) != set(PHASES)
        args.output = ROOT / "bench" / ("results.partial.json" if partial else "results.json")
    return args


async def main(args: argparse.Namespace) -> Results:
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="relay-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    results = report.new_results(args, workdir)
    log(f"bench: workdir {workdir}; phases {', '.join(args.phases) or '-'}; configs {', '.join(args.configs)}")
    harness = Harness(args, workdir)
    try:
        await harness.start()
        if harness.postfix_skip:
            results.setdefault("skipped", []).append(f"Postfix skipped: {harness.postfix_skip}")
            log(f"bench: Postfix SKIPPED: {harness.postfix_skip}")
        for name in args.phases:
            t0 = time.monotonic()
            try:
                await {**PHASES, **ON_REQUEST}[name].run(harness, results)
            except Exception as exc:
                results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
                log(f"bench: phase {name} failed: {type(exc).__name__}: {exc}")
            results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - t0, 1)
        if args.profile:
            await PROFILE.run(harness, results)
    finally:
        await harness.stop()
        if harness.postfix_skip and "Postfix" not in " ".join(results.get("skipped", [])):
            results.setdefault("skipped", []).append(f"Postfix skipped: {harness.postfix_skip}")
    results["targets"] = report.evaluate(results, args)
    results["meta"]["duration_seconds"] = round(time.monotonic() - started, 1)
    results["meta"]["git_at_end"] = report.git_info()  # relay/ is edited by others: a change mid-run shows here
    if not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def cli(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = run_loop(lambda: main(args), use_uvloop=args.harness_uvloop)
    report.write(results, args.output)
    report.print_summary(results)
    print(f"\nwrote {args.output}")
    if args.plot:
        from bench.plot import plot

        plot(args.output, args.plot_output)
        print(f"wrote {args.plot_output}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
