"""The files in deploy/ checked by the tools that read them: promtool for the alert rules (and their unit
tests), systemd-analyze for the unit, kubernetes-validate for the manifests, plus what each must say.

A missing tool skips its test on a developer's machine; `.ci/run` installs them all and sets
RELAY_TEST_REQUIRE_DEPLOY_TOOLS=1, so in CI a missing tool fails instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "relay-rules.yml"
RULE_TESTS = DEPLOY / "prometheus" / "relay-rules.test.yml"


def tool(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path=str(ROOT / ".venv" / "bin"))
    if path is None:
        if os.environ.get("RELAY_TEST_REQUIRE_DEPLOY_TOOLS") == "1":
            pytest.fail(f"{name} is required here (RELAY_TEST_REQUIRE_DEPLOY_TOOLS=1) but not installed")
        pytest.skip(f"{name} not installed (apt-get install prometheus systemd; pip install kubernetes-validate)")
    return path


def run(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)


# --- Prometheus -----------------------------------------------------------------------------------


def test_promtool_checks_the_alert_rules() -> None:
    done = run(tool("promtool"), "check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    done = run(tool("promtool"), "test", "rules", str(RULE_TESTS), cwd=RULE_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """An alert added to the rules file (the bounces alert of the delivery-outcome issue, say) without a
    promtool test fails here."""
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    firing = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
            assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]
