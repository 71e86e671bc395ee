"""The bench's generated relay configs load as the relay reads them: a scenario whose config drifted from
the settings' schema would otherwise fail only minutes into `python -m bench`."""

from __future__ import annotations

import argparse
from pathlib import Path

from bench.harness import Harness
from bench.relayproc import RelayProcess
from bench.scenarios.outcomes import relay_pair
from bench.scenarios.profiles import PROFILES, profiles
from relay.config import load_settings


def test_the_profiles_bench_config_has_one_profile_per_sender_domain_with_its_own_user_and_pool(
    tmp_path: Path,
) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("")  # read, not parsed, when the settings load
    upstream = {"username": "demo", "password": "demo-password", "ca_file": str(ca_file)}
    relay = RelayProcess(
        tmp_path, "four", upstream_port=2525, upstream=upstream, spool=True, pool_size=12,
        overrides={"profiles": profiles(3)},
    )  # fmt: skip
    settings = load_settings(relay.config)
    assert [(p.name, p.sender_domain, p.pool_size) for p in settings.profiles] == [
        (f"app{i}", f"app{i}.example.com", 3) for i in range(PROFILES)
    ]
    users = [p.upstream(settings.upstream).username.get_secret_value() for p in settings.profiles]
    assert users == [f"bench-app{i}" for i in range(PROFILES)]
    assert settings.upstream.pool_size == 12


def test_the_outcomes_bench_configs_differ_only_in_reports(tmp_path: Path) -> None:
    ca_file = tmp_path / "ca.pem"
    ca_file.write_text("")
    harness = Harness(argparse.Namespace(pool_size=10, outcomes_profile=None), tmp_path)
    harness.upstream = {
        "username": "demo",
        "password": "demo-password",
        "ca_file": str(ca_file),
        "reports_base_url": "https://localhost:8443",
        "reports_api_key": "demo-api-key",
    }
    off, on = (load_settings(relay.config) for relay in relay_pair(harness, 2525).values())
    assert (off.reports.enabled, on.reports.enabled) == (False, True)
    assert on.reports.base_url == "https://localhost:8443" and on.reports.poll_interval == 1.0
    assert off.spool.enabled and on.spool.enabled and off.upstream == on.upstream
