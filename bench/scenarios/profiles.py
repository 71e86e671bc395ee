"""Per-app profiles (issue 16): LAN throughput of a relay whose load is shared by 4 `[[profiles]]` against
the same relay with one profile (the default `[upstream]`), in the same run. Target: at least 0.9x.

    python -m bench --only profiles [--rtt-ms 0,20] [--profiles-rounds 6]

Both relays get the same load: the clients (a multiple of 4) send as billing@app{i % 4}.example.com, envelope
and From alike. The one-profile relay sends all of it as the stand-in's default user; the four-profile relay
has one `[[profiles]]` per sender domain, each with its own stand-in user (the stand-in is told of those
accounts over its control port) and its own pool, lane and breaker.

Fair comparison: the pools' sizes sum to the one profile's pool (e.g. 12 = 4 x 3). Both relays then hold
the same number of upstream connections and delivery workers, so what is measured is the cost of routing
and of four lanes, not extra parallelism: with an equal pool each (4 x 12 = 48 connections) the four-profile
relay would get 4 times the connections, which at 20 ms RTT is more capacity and would hide any overhead.
(The four-profile relay's default lane has its own pool too, but no mail reaches it, so it opens nothing.)

Spool on, the bench's usual policy. Rounds alternate (one, four, then four, one, ...) so the shared machine's
noise falls on both alike. A round's rate is end to end, as the throughput phase's: the timed messages over
the time from the first send until the stand-in has the last of them; the accept rate is printed beside it.
The figure is the median of the per-round ratios (four / one). Relay CPU per message (user + system, all
threads, warm-up messages included) is the steadier measure on a busy machine. The stand-in's count of
messages per AUTH user and sender domain shows each profile's mail went out as its own account.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from bench.common import log
from bench.harness import Harness, Results, Scenario, Target, Verdict, verdict
from bench.load import one_sender_per_domain
from bench.measure import measure
from bench.relayproc import RelayProcess

TARGET = 0.9
PROFILES = 4
CONFIGS = ("one", "four")


def user_of(index: int) -> str:
    return f"bench-app{index}"


def profiles(per_profile_pool: int) -> list[dict[str, Any]]:
    """One `[[profiles]]` per sender domain, each with its own stand-in account and pool."""
    return [
        {
            "name": f"app{i}",
            "sender_domain": f"app{i}.example.com",
            "username": user_of(i),
            "password": f"{user_of(i)}-password",
            "pool_size": per_profile_pool,
        }
        for i in range(PROFILES)
    ]


def expected_users(config: str, default_user: str) -> dict[str, set[str]]:
    """Which sender domains each stand-in user should have received mail from."""
    domains = {f"app{i}.example.com" for i in range(PROFILES)}
    if config == "one":
        return {default_user: domains}
    return {user_of(i): {f"app{i}.example.com"} for i in range(PROFILES)}


async def _relays(harness: Harness, rtt: float, pool: int) -> dict[str, RelayProcess]:
    port = await harness.proxy(rtt)
    common: dict[str, Any] = {"upstream_port": port, "upstream": harness.upstream, "spool": True}
    return {
        "one": RelayProcess(harness.workdir, f"profiles-one-{rtt:g}ms", pool_size=pool, **common),
        "four": RelayProcess(
            harness.workdir,
            f"profiles-four-{rtt:g}ms",
            pool_size=pool,
            overrides={"profiles": profiles(pool // PROFILES)},
            **common,
        ),
    }


async def _case(harness: Harness, rtt: float, clients: int, pool: int) -> dict[str, Any]:
    args = harness.args
    rounds = max(5, args.profiles_rounds)
    per_client = args.messages if rtt == 0 else args.messages_rtt
    senders = one_sender_per_domain(PROFILES)
    started = await _relays(harness, rtt, pool)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    try:
        for relay in started.values():
            await relay.start()
        targets = {
            name: Target(name, r.port, pid=r.pid, relay=r, upstream_port=r.settings["upstream"]["port"])
            for name, r in started.items()
        }
        for index in range(rounds):
            for name in CONFIGS if index % 2 == 0 else tuple(reversed(CONFIGS)):
                m = await measure(
                    harness, targets[name], clients=clients, messages=per_client, warmup=args.warmup, senders=senders
                )
                runs[name].append(m)
                log(
                    f"   {rtt:g} ms round {index + 1} {name:>4}: {m['delivered_per_s']:7.1f} msg/s end to end "
                    f"({m['accepted_per_s']:.1f} accepted), {m.get('cpu_ms_per_message')} ms CPU/msg, "
                    f"{m['failed']} failed, by user {m['delivered_by_user']}"
                )
    finally:
        for relay in started.values():
            await relay.stop()
    return _figures(harness, rtt, clients, per_client, runs)


def _figures(
    harness: Harness, rtt: float, clients: int, per_client: int, runs: dict[str, list[dict[str, Any]]]
) -> dict[str, Any]:
    def per_round(name: str, key: str) -> list[float]:
        return [float(m[key]) for m in runs[name]]

    def ratios(key: str) -> list[float]:
        return [f / o for f, o in zip(per_round("four", key), per_round("one", key), strict=True) if o]

    by_user: dict[str, dict[str, dict[str, int]]] = {}
    for name in CONFIGS:
        users: dict[str, dict[str, int]] = {}
        for m in runs[name]:
            for user, domains in m["delivered_by_user"].items():
                for domain, count in domains.items():
                    users.setdefault(user, {})[domain] = users.get(user, {}).get(domain, 0) + count
        by_user[name] = users
    default_user = str(harness.upstream["username"])
    auth_ok = all(
        {user: set(domains) for user, domains in by_user[name].items()} == expected_users(name, default_user)
        for name in CONFIGS
    )
    cpu = {}
    for name in CONFIGS:
        messages = sum(m["delivered"] + m["clients"] * m["warmup"] for m in runs[name])
        seconds = sum(m.get("cpu_seconds", 0.0) for m in runs[name])
        cpu[name] = round(1000 * seconds / max(1, messages), 3)
    return {
        "rtt_ms": rtt,
        "rounds": len(runs["one"]),
        "messages_per_round": clients * per_client,
        "per_s_rounds": {name: [round(x, 1) for x in per_round(name, "delivered_per_s")] for name in CONFIGS},
        "per_s": {name: round(statistics.median(per_round(name, "delivered_per_s")), 1) for name in CONFIGS},
        "accepted_per_s": {name: round(statistics.median(per_round(name, "accepted_per_s")), 1) for name in CONFIGS},
        "ratio_per_round": [round(r, 3) for r in ratios("delivered_per_s")],
        "ratio": round(statistics.median(ratios("delivered_per_s")), 3),
        "accepted_ratio": round(statistics.median(ratios("accepted_per_s")), 3),
        "cpu_ms_per_message": cpu,
        "failed": {name: sum(m["failed"] for m in runs[name]) for name in CONFIGS},
        "delivered_by_user": by_user,
        "auth_ok": auth_ok,
    }


async def run(harness: Harness, results: Results) -> None:
    args = harness.args
    clients = PROFILES * math.ceil(args.clients / PROFILES)
    pool = PROFILES * math.ceil(args.pool_size / PROFILES)
    assert harness.control is not None
    for i in range(PROFILES):
        await harness.control.add_account(user_of(i), f"{user_of(i)}-password")
    log(
        f"== profiles: {clients} clients over {PROFILES} sender domains, spool on; one profile (pool {pool}) "
        f"against {PROFILES} profiles (pool {pool // PROFILES} each)"
    )
    cases = [await _case(harness, rtt, clients, pool) for rtt in args.rtt_ms]
    results["profiles"] = {
        "target_ratio": TARGET,
        "clients": clients,
        "pool": {"one": pool, "four": [pool // PROFILES] * PROFILES},
        "cases": cases,
    }


def summary(results: Results) -> list[str]:
    r = results.get("profiles")
    if not r:
        return []
    lines = [
        f"Profiles: {PROFILES} profiles (pools {r['pool']['four']}) against one (pool {r['pool']['one']}), "
        f"{r['clients']} clients, spool on (target at least {TARGET}x):"
    ]
    for c in r["cases"]:
        lines.append(
            f"  {c['rtt_ms']:g} ms RTT: {c['per_s']['four']} vs {c['per_s']['one']} msg/s end to end, ratio "
            f"{c['ratio']} (rounds {c['ratio_per_round']}; accepted ratio {c['accepted_ratio']}); relay CPU "
            f"{c['cpu_ms_per_message']['four']} vs {c['cpu_ms_per_message']['one']} ms/message"
        )
        lines.append(f"    per round four {c['per_s_rounds']['four']}, one {c['per_s_rounds']['one']}")
        lines.append(f"    delivered by stand-in user: {c['delivered_by_user']} (as expected: {c['auth_ok']})")
    return lines


def targets(results: Results, args: Any) -> list[Verdict]:
    r = results.get("profiles")
    if not r:
        return []
    out = [
        verdict(
            f"{PROFILES} profiles at least {TARGET}x one profile's throughput ({c['rtt_ms']:g} ms RTT)",
            c["ratio"] >= TARGET,
            f"{c['ratio']}x ({c['per_s']['four']} vs {c['per_s']['one']} msg/s)",
        )
        for c in r["cases"]
    ]
    out.append(
        verdict(
            "each profile's messages arrived authenticated as its own stand-in user",
            all(c["auth_ok"] for c in r["cases"]),
            "; ".join(f"{c['rtt_ms']:g} ms: {c['delivered_by_user']['four']}" for c in r["cases"]),
        )
    )
    return out


SCENARIO = Scenario("profiles", run, "Per-app profiles", summary=summary, targets=targets)
