"""One module per benchmark. Each ends with `SCENARIO = Scenario(name, run, ...)` (bench.harness); list it
here and `python -m bench --only <name>` runs it, its summary is printed and its targets judged.

A new benchmark: a module with `async def run(harness, results)` that starts what it needs with
`harness.target(config, rtt, name)` (or `start_targets` for every config), measures with
`bench.measure.measure` / `measure_each`, and puts its figures under `results[<name>]`; then, if wanted,
`summary` (console lines), `markdown` (bench.report's section) and `targets` (verdicts).
"""

from __future__ import annotations

from bench.harness import Scenario
from bench.scenarios import (
    encryption,
    large,
    noop_latency,
    outage,
    outcomes,
    profiles,
    profiling,
    recipients,
    small_disk,
    startup,
    sweep,
    throughput,
)

# The phases of `python -m bench`, in the order they run (and are printed).
PHASES: dict[str, Scenario] = {
    s.name: s for s in (throughput.SCENARIO, sweep.SCENARIO, recipients.SCENARIO, large.SCENARIO, startup.SCENARIO)
}
# Run only when named with --only (minutes of wall time each; the edges and hardening issues' checks).
ON_REQUEST: dict[str, Scenario] = {
    s.name: s
    for s in (
        outage.SCENARIO,
        small_disk.SCENARIO,
        noop_latency.SCENARIO,
        encryption.SCENARIO,
        profiles.SCENARIO,
        outcomes.SCENARIO,
    )
}
# Runs only with --profile.
PROFILE = profiling.SCENARIO
