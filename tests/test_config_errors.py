"""Config errors name the key and where its value came from; an environment variable for a section that
does not exist is an error, not silently ignored (issue 13)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigError, load_settings
from tests.helpers import clear_relay_env, env_without_relay

pytestmark = pytest.mark.slow  # CLI runs in new processes: seconds each; .ci/run runs them


@pytest.fixture(autouse=True)
def no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_relay_env(monkeypatch)


def config_error(path: Path | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_an_unknown_section_in_the_environment_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_LSTEN__PORT", "2526")
    message = config_error()
    assert message.startswith("RELAY_LSTEN__PORT: unknown section 'lsten' (sections: listen, upstream, ")


def test_relay_variables_without_a_section_are_not_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """RELAY_CRASH_AT (failpoints) and the test suite's RELAY_TEST_REQUIRE_* have no `__`: not settings."""
    monkeypatch.setenv("RELAY_CRASH_AT", "")
    monkeypatch.setenv("RELAY_TEST_REQUIRE_SWAKS", "1")
    assert load_settings(None).listen.port == 2525


def test_bad_json_in_an_environment_variable_names_it_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "relay.toml"
    path.write_text("[listen]\nport = 2526\n")
    monkeypatch.setenv("RELAY_LISTEN__ALLOWED_NETWORKS", "10.0.0.0/8")
    message = config_error(path)
    assert message.startswith("listen.allowed_networks: RELAY_LISTEN__ALLOWED_NETWORKS is not valid JSON (")
    assert """lists and tables in environment variables are JSON, e.g. '["10.0.0.0/8"]'""" in message
    assert str(path) not in message


def test_a_bad_value_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_LISTEN__ALLOWED_NETWORKS", '["10.0.0.1/8"]')
    assert config_error() == (
        "listen.allowed_networks: '10.0.0.1/8' is not a network: 10.0.0.1/8 has host bits set "
        "(from RELAY_LISTEN__ALLOWED_NETWORKS)"
    )


def test_the_same_bad_value_from_the_file_names_no_variable(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[listen]\nallowed_networks = ["10.0.0.1/8"]\n')
    assert config_error(path) == (
        "listen.allowed_networks: '10.0.0.1/8' is not a network: 10.0.0.1/8 has host bits set"
    )


@pytest.mark.parametrize("key", ["ca_file", "username_file", "password_file"])
def test_a_missing_upstream_file_names_its_key(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(f"RELAY_UPSTREAM__{key.upper()}", "/nonexistent/x.pem")
    assert config_error() == (
        f"upstream.{key}: '/nonexistent/x.pem' cannot be read: No such file or directory "
        f"(from RELAY_UPSTREAM__{key.upper()})"
    )


def test_a_missing_listen_tls_file_names_its_key(tmp_path: Path) -> None:
    cert = tmp_path / "cert.pem"
    cert.write_text("x")
    path = tmp_path / "relay.toml"
    path.write_text(f'[listen]\ntls_cert_file = "{cert}"\ntls_key_file = "/nonexistent/key.pem"\n')
    assert config_error(path) == "listen.tls_key_file: '/nonexistent/key.pem' does not exist"


def test_the_cli_refuses_an_unknown_environment_section(tmp_path: Path) -> None:
    env = env_without_relay()
    env["RELAY_LSTEN__PORT"] = "2526"
    done = subprocess.run(
        [sys.executable, "-m", "relay", "check-config"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("relay: config error: RELAY_LSTEN__PORT: unknown section 'lsten'")
    assert "config OK" not in done.stderr
