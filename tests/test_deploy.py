"""The files in deploy/ checked by the tools that read them: promtool for the alert rules (and their unit
tests), systemd-analyze for the unit, kubernetes-validate for the manifests, plus what each must say.

A missing tool skips its test on a developer's machine; `.ci/run` installs them all and sets
RELAY_TEST_REQUIRE_DEPLOY_TOOLS=1, so in CI a missing tool fails instead.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from relay.config import load_settings
from tests.conftest import free_port
from tests.test_ops import RelayProcess, wait_listening

pytestmark = (
    pytest.mark.slow
)  # promtool, systemd-analyze, kubernetes-validate and a relay started by hand: seconds each; .ci/run runs them

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


# --- systemd --------------------------------------------------------------------------------------

UNIT = DEPLOY / "systemd" / "relay.service"


def unit_settings() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def test_systemd_analyze_verify_warns_only_that_the_binary_is_absent_here(tmp_path: Path) -> None:
    analyze = tool("systemd-analyze")
    done = run(analyze, "verify", str(UNIT))
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert lines == ["relay.service: Command /opt/relay/.venv/bin/relay is not executable: No such file or directory"]
    # with an executable where ExecStart says (here: this Python), not a single warning
    installed = tmp_path / "relay.service"
    installed.write_text(UNIT.read_text().replace("/opt/relay/.venv/bin/relay", sys.executable))
    done = run(analyze, "verify", str(installed))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_the_unit_runs_as_its_own_user_with_the_spool_as_state_directory_and_hardening() -> None:
    unit = unit_settings()
    assert unit["User"] == ["relay"] and unit["Group"] == ["relay"]
    assert unit["StateDirectory"] == ["relay"] and "RELAY_SPOOL__PATH=/var/lib/relay" in unit["Environment"]
    assert unit["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert unit["Restart"] == ["on-failure"] and unit["RestartPreventExitStatus"] == ["2"]
    for key, value in {"ProtectSystem": "strict", "NoNewPrivileges": "yes", "PrivateTmp": "yes"}.items():
        assert unit[key] == [value], key
    assert int(unit["TimeoutStopSec"][0]) > 8  # the relay exits within about 8 s of SIGTERM


async def test_the_units_execstart_and_execreload_lines_run_a_relay_by_hand(tmp_path: Path) -> None:
    """What the unit runs, run by hand: its ExecStart (binary and arguments) with its Environment= and the
    config from config.example.toml; its ExecReload line reloads it; SIGTERM (KillSignal) stops it with 0."""
    unit = unit_settings()
    argv = unit["ExecStart"][0].split()
    assert argv[:2] == ["/opt/relay/.venv/bin/relay", "serve"] and argv[2:] == ["--config", "/etc/relay/config.toml"]
    config = tmp_path / "etc" / "config.toml"
    config.parent.mkdir()
    config.write_text((ROOT / "config.example.toml").read_text())
    state = tmp_path / "var" / "lib" / "relay"
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith("RELAY_")}
    for assignment in unit["Environment"]:
        key, _, value = assignment.partition("=")
        env[key] = value.replace("/var/lib/relay", str(state))
    port = free_port()
    env |= {"RELAY_UPSTREAM__USERNAME": "u", "RELAY_UPSTREAM__PASSWORD": "p"}  # as /etc/relay/relay.env would
    env |= {"RELAY_LISTEN__HOST": "127.0.0.1", "RELAY_LISTEN__PORT": str(port), "RELAY_HTTP__PORT": "0"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", *argv[1:-1], str(config), env=env, stderr=asyncio.subprocess.PIPE
    )
    try:
        await wait_listening(port, process)
        relay = RelayProcess(process, port)
        assert (await relay.wait_for_log("relay_listening"))["spool"] == str(state)
        assert (state / "queue").is_dir() and (state / "lock").exists()
        reload = unit["ExecReload"][0].replace("$MAINPID", str(process.pid)).split()
        assert run(*reload).returncode == 0
        await relay.wait_for_log("config_reloaded")
        assert unit["KillSignal"] == ["SIGTERM"]
        assert await relay.stop() == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- Kubernetes -------------------------------------------------------------------------------------

KUBERNETES = DEPLOY / "kubernetes.yaml"


def test_kubernetes_validate_strict_accepts_the_manifests(tmp_path: Path) -> None:
    validate = tool("kubernetes-validate")
    done = run(validate, "--strict", str(KUBERNETES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count(" passed for resource ") == 3, done.stdout
    # and it is a real check: an unknown field fails it
    broken = tmp_path / "broken.yaml"
    broken.write_text(KUBERNETES.read_text().replace("fsGroup: 10001", "fsGroup: 10001\n        runAsUserr: 1"))
    assert run(validate, "--strict", str(broken)).returncode != 0


def test_the_sidecar_runs_only_the_relay_as_10001_and_recreates_instead_of_rolling() -> None:
    deployment = next(d for d in yaml.safe_load_all(KUBERNETES.read_text()) if d["kind"] == "Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}  # one RWO spool volume, one relay
    pod = deployment["spec"]["template"]["spec"]
    assert not {"runAsUser", "runAsNonRoot", "runAsGroup"} & set(pod.get("securityContext", {}))  # not the app's
    relay = next(c for c in pod["containers"] if c["name"] == "relay")
    context = relay["securityContext"]
    assert (context["runAsUser"], context["runAsGroup"], context["runAsNonRoot"]) == (10001, 10001, True)
    registry, _, tag = relay["image"].rpartition(":")
    assert "/" in registry and tag not in ("", "latest"), relay["image"]  # a registry path and a version
    assert "kubectl rollout restart deployment/legacy-erp" in KUBERNETES.read_text()


# --- Compose and the image ----------------------------------------------------------------------------

COMPOSE = DEPLOY / "docker-compose.yml"


def test_compose_mounts_config_toml_from_the_repository_root_and_never_creates_it() -> None:
    relay = yaml.safe_load(COMPOSE.read_text())["services"]["relay"]
    [config] = [v for v in relay["volumes"] if isinstance(v, dict) and v["target"] == "/etc/relay/config.toml"]
    assert (COMPOSE.parent / config["source"]).resolve() == ROOT / "config.toml"  # where README's `cp` puts it
    assert config["bind"]["create_host_path"] is False and config["read_only"] is True
    assert "9090" not in str(relay.get("healthcheck", ""))


def dockerfile_instructions() -> list[str]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_image_installs_pinned_versions_and_asks_the_configured_health_port() -> None:
    instructions = dockerfile_instructions()
    assert any(i.startswith("COPY ") and "constraints.txt" in i for i in instructions)
    assert any(i.startswith("RUN pip install") and "-c constraints.txt ." in i for i in instructions)
    [health] = [i for i in instructions if i.startswith("HEALTHCHECK")]
    assert health.endswith('CMD ["relay", "healthcheck", "--config", "/etc/relay/config.toml"]')
    assert "9090" not in health
    assert "constraints.txt" not in (ROOT / ".dockerignore").read_text()


def test_the_image_default_config_adds_nothing_to_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "COPY config.example.toml /etc/relay/config.toml" in dockerfile_instructions()
    for name in [n for n in os.environ if n.upper().startswith("RELAY_")]:
        monkeypatch.delenv(name)
    settings = load_settings(ROOT / "config.example.toml")
    assert settings.policy.rules == []
    assert all(not profile.rules for profile in settings.profiles)


def test_constraints_pin_every_dependency_the_package_pulls_in() -> None:
    """Every distribution `pip install .` brings in (pyproject's dependencies and theirs, as installed
    here) has an exact pin in constraints.txt that its range in pyproject.toml allows."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"not an exact pin: {line}"
            pins[norm(name)] = version.strip()
    wanted = [Requirement(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for requirement in wanted:
        assert norm(requirement.name) in pins, f"{requirement.name} is not pinned: run deploy/pin-dependencies.sh"
        assert requirement.specifier.contains(pins[norm(requirement.name)]), f"{requirement} vs the pin"
    seen: set[str] = set()
    todo = list(wanted)
    while todo:
        requirement = todo.pop()
        if norm(requirement.name) in seen or (requirement.marker and not requirement.marker.evaluate()):
            continue
        seen.add(norm(requirement.name))
        try:
            todo += [Requirement(r) for r in distribution(requirement.name).requires or []]
        except PackageNotFoundError:
            continue  # an extra's dependency not installed here
        assert norm(requirement.name) in pins, f"{requirement.name} (pulled in) is not pinned"


def test_the_readmes_demo_command_uncomments_exactly_the_example_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    [command] = [line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("sed -e ")]
    (tmp_path / "config.example.toml").write_text((ROOT / "config.example.toml").read_text())
    done = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    for name in [n for n in os.environ if n.upper().startswith("RELAY_")]:
        monkeypatch.delenv(name)
    [rule] = load_settings(tmp_path / "demo.toml").policy.rules
    assert rule.sender_domain == "erp.example.com" and set(rule.headers) == {"X-IB-Tracking-Url", "X-IB-Callback-Data"}
