"""[reports] and [bounces]: what is refused at load, secrets from files and the environment, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.cli import main
from relay.config import ConfigError, load_settings


def load(tmp_path: Path, text: str) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(text)
    load_settings(config)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            '[reports]\nbase_url = "http://api.infobip.com"',
            "reports: base_url 'http://api.infobip.com' must start with https://",
        ),
        ('[reports]\nnotify_url = "https://relay.example.com/ib"', "notify_url and notify_listen go together"),
        ('[reports]\nnotify_url = "https://r/ib"\nnotify_listen = "8080"', "notify_listen '8080' is not host:port"),
        ('[reports]\nnotify_url = "ftp://r/ib"\nnotify_listen = "0.0.0.0:8080"', "is not an http(s) URL"),
        ("[reports]\npoll_interval = 0", "reports.poll_interval: Input should be greater than 0"),
        ('[reports]\napi_key_file = "/nonexistent/key"', "api_key_file '/nonexistent/key' cannot be read"),
        ("[bounces]\nenabled = true", "smtp_host: needed when bounces are enabled"),
        ('[bounces]\nto = "postmaster"', "to 'postmaster' is not an address"),
        ('[bounces]\ndelay_warning = "soon"', "'soon' is not a duration"),
    ],
)
def test_bad_values_are_refused_with_the_key(tmp_path: Path, text: str, error: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load(tmp_path, text)
    assert error in str(refused.value)


@pytest.mark.parametrize(("value", "seconds"), [('"4h"', 14400), ('"30m"', 1800), ('"1d"', 86400), ("90", 90)])
def test_delay_warning_durations(tmp_path: Path, value: str, seconds: float) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(f'[bounces]\nsmtp_host = "mail"\ndelay_warning = {value}\n')
    assert load_settings(config).bounces.delay_warning == seconds


def test_the_api_key_comes_from_a_file_or_the_environment_and_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "key"
    key_file.write_text("file-secret-key\n")
    config = tmp_path / "relay.toml"
    config.write_text(f'[reports]\nenabled = true\napi_key_file = "{key_file}"\n')
    assert load_settings(config).reports.api_key.get_secret_value() == "file-secret-key"
    assert main(["check-config", "--config", str(config)]) == 0
    assert "file-secret-key" not in capsys.readouterr().out
    monkeypatch.setenv("RELAY_REPORTS__API_KEY", "env-secret-key")
    config.write_text("[reports]\nenabled = true\n")
    assert load_settings(config).reports.api_key.get_secret_value() == "env-secret-key"


def test_serve_refuses_reports_without_an_api_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "relay.toml"
    config.write_text('[upstream]\nusername = "u"\npassword = "p"\n[reports]\nenabled = true\n')
    assert main(["serve", "--config", str(config)]) == 2
    assert "reports.api_key: missing; set RELAY_REPORTS__API_KEY" in capsys.readouterr().err


def test_a_profiles_reports_key_comes_from_a_file_or_the_environment_and_is_never_shown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = tmp_path / "hr-reports-key"
    key_file.write_text("hr-file-secret\n")
    config = tmp_path / "relay.toml"
    profile = '[[profiles]]\nname = "hr"\nsender_domain = "hr.example.com"\n'
    reports = '[reports]\nenabled = true\napi_key = "main-key"\n'
    config.write_text(f'{reports}{profile}reports_api_key_file = "{key_file}"\n')
    [hr] = load_settings(config).profiles
    assert hr.reports_api_key is not None and hr.reports_api_key.get_secret_value() == "hr-file-secret"
    assert main(["check-config", "--config", str(config)]) == 0
    assert "hr-file-secret" not in capsys.readouterr().out
    # As every profile secret: in the environment, RELAY_PROFILES holds the whole list as JSON.
    config.write_text(reports)
    hr_json = '{"name": "hr", "sender_domain": "hr.example.com", "reports_api_key": "hr-env-secret"}'
    monkeypatch.setenv("RELAY_PROFILES", f"[{hr_json}]")
    [hr] = load_settings(config).profiles
    assert hr.reports_api_key is not None and hr.reports_api_key.get_secret_value() == "hr-env-secret"
    assert main(["check-config", "--config", str(config)]) == 0
    assert "hr-env-secret" not in capsys.readouterr().out


def test_an_unreadable_profile_reports_key_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        profile = '[[profiles]]\nname = "hr"\nsender_domain = "h.example"\n'
        load(tmp_path, f'{profile}reports_api_key_file = "/nonexistent/k"\n')
    assert "profiles.0: reports_api_key_file '/nonexistent/k' cannot be read" in str(refused.value)


def test_a_sqlite_too_old_for_the_history_is_refused_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The history needs SQLite 3.35 (UPDATE ... RETURNING, UPDATE ... FROM): an older library (the Python build of an
    older distribution) is said at load, not as a failed poll or bounce each round. PostgreSQL's history needs none."""
    monkeypatch.setattr("sqlite3.sqlite_version_info", (3, 34, 1))  # Debian 11's
    monkeypatch.setattr("sqlite3.sqlite_version", "3.34.1")
    with pytest.raises(ConfigError, match=r"needs SQLite 3\.35\.0 or newer, and this Python has 3\.34\.1"):
        load(tmp_path, '[bounces]\nenabled = true\nsmtp_host = "mail"\n')
    load(tmp_path, '[bounces]\nenabled = true\nsmtp_host = "mail"\n[reports]\nhistory_url = "postgresql://db/relay"\n')
    load(tmp_path, "[reports]\nenabled = false\n")  # no history: nothing needed
