"""`relay check-config --strict` (issue 13): what `serve` would trip over on this machine makes it fail,
tried without changing anything; plain `check-config` keeps exiting 0 for a valid config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from relay.cli import main as relay_main
from tests.helpers import clear_relay_env, env_without_relay

pytestmark = pytest.mark.slow  # CLI runs in new processes: seconds each; .ci/run runs them

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_relay_env(monkeypatch)
    monkeypatch.setenv("RELAY_UPSTREAM__USERNAME", "user")
    monkeypatch.setenv("RELAY_UPSTREAM__PASSWORD", "pw")


def check(tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, *flags: str) -> tuple[int, str]:
    config = tmp_path / "relay.toml"
    config.write_text(toml)
    capsys.readouterr()
    code = relay_main(["check-config", "--config", str(config), *flags])
    return code, capsys.readouterr().err


def good(tmp_path: Path, extra: str = "", spool: Path | None = None) -> str:
    spool = spool or tmp_path / "spool" / "not-yet"
    return f'[listen]\nallowed_networks = ["10.0.0.0/8"]\n[spool]\npath = "{spool}"\n{extra}'


def test_strict_passes_a_config_serve_can_use(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = check(tmp_path, capsys, good(tmp_path), "--strict")
    assert code == 0, err
    assert err.strip().endswith("config OK")
    assert not (tmp_path / "spool").exists()  # tried, not created


def test_strict_fails_on_a_spool_path_serve_would_refuse(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    toml = good(tmp_path, spool=blocker / "spool")
    assert check(tmp_path, capsys, toml)[0] == 0  # valid, so plain check-config says OK
    code, err = check(tmp_path, capsys, toml, "--strict")
    assert code == 1
    assert f"WARNING: spool.path: {blocker} is not a directory" in err
    assert "config NOT OK with --strict: 1 warning(s)" in err


@pytest.mark.skipif(
    (shutil.which("bwrap") is None or os.geteuid() != 0) and not os.environ.get("RELAY_TEST_REQUIRE_BWRAP"),
    reason="needs root and bubblewrap",
)
def test_strict_fails_on_a_spool_directory_that_cannot_be_written(tmp_path: Path) -> None:
    """As `serve` does on a read-only spool (here: the whole file system read-only, through bwrap)."""
    spool = tmp_path / "spool"
    spool.mkdir()
    config = tmp_path / "relay.toml"
    config.write_text(good(tmp_path, spool=spool))
    sandbox = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    env = env_without_relay()
    done = subprocess.run(
        [*sandbox, sys.executable, "-m", "relay", "check-config", "--strict", "--config", str(config)],
        cwd=ROOT,
        env=env | {"RELAY_UPSTREAM__USERNAME": "u", "RELAY_UPSTREAM__PASSWORD": "p"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert f"WARNING: spool.path: cannot write in {spool}: Read-only file system" in done.stderr


def test_strict_fails_on_a_ca_file_that_is_not_a_ca_bundle(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    toml = good(tmp_path, f'[upstream]\nca_file = "{ca}"\n')
    assert check(tmp_path, capsys, toml)[0] == 0
    code, err = check(tmp_path, capsys, toml, "--strict")
    assert code == 1
    assert f"WARNING: upstream.ca_file: {ca} is not a usable PEM CA bundle" in err


def test_strict_fails_on_an_empty_credentials_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "password"
    secret.write_text("\n")
    code, err = check(tmp_path, capsys, good(tmp_path, f'[upstream]\npassword_file = "{secret}"\n'), "--strict")
    assert code == 1
    assert f"WARNING: upstream.password_file: {secret} is empty" in err


def test_strict_fails_on_a_listener_certificate_that_does_not_load(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("x")
    key.write_text("y")
    extra = f'tls_cert_file = "{cert}"\ntls_key_file = "{key}"\n'
    code, err = check(tmp_path, capsys, good(tmp_path).replace("[spool]", extra + "[spool]"), "--strict")
    assert code == 1
    assert "WARNING: listen.tls_cert_file/tls_key_file: not a usable certificate and key" in err


def test_strict_fails_on_any_plain_warning_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = f'[spool]\npath = "{tmp_path / "spool"}"\n[policy]\nalignment = "off"\n'
    assert check(tmp_path, capsys, toml)[0] == 0
    code, err = check(tmp_path, capsys, toml, "--strict")
    assert code == 1 and "policy.alignment = off" in err
