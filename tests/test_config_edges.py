"""Values a new user typed that the config used to take and the relay then tripped over (a new-user review):
each is now a config error naming its key, where the file or the environment gave it."""

from __future__ import annotations

import errno
import socket
from pathlib import Path

import pytest

from relay.config import ConfigError, Settings, load_settings
from relay.ops import config_warnings
from relay.ops.config_warnings import listen_problems
from tests.helpers import clear_relay_env


@pytest.fixture(autouse=True)
def no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_relay_env(monkeypatch)


def config_error(tmp_path: Path, toml: str = "") -> str:
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    return str(info.value)


def test_an_empty_spool_path_is_an_error_not_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = "spool.path: empty: set the spool directory, e.g. /var/spool/relay"
    assert config_error(tmp_path, '[spool]\npath = ""\n') == expected
    assert config_error(tmp_path, '[spool]\npath = "  "\n') == expected
    monkeypatch.setenv("RELAY_SPOOL__PATH", "")
    assert config_error(tmp_path) == f"{expected} (from RELAY_SPOOL__PATH)"


def test_other_empty_paths_mean_not_set_or_are_named(tmp_path: Path) -> None:
    profile = '[[profiles]]\nname = "hr"\nsender_domain = "hr.example.com"\n'
    path = tmp_path / "relay.toml"
    path.write_text(f'{profile}username_file = ""\npassword_file = ""\napi_key_file = ""\nreports_api_key_file = ""\n')
    [hr] = load_settings(path).profiles
    assert (hr.username_file, hr.password_file, hr.api_key_file, hr.reports_api_key_file) == (None,) * 4
    assert config_error(tmp_path, '[spool]\nold_key_files = [""]\n') == (
        "spool.old_key_files: an empty path: list the old key files, or leave the list empty"
    )


@pytest.mark.parametrize(
    ("toml", "expected"),
    [
        ('[upstream]\nhost = ""\n', "upstream.host: empty: give a host name or an IP address"),
        (
            '[upstream]\nhost = "bad host"\n',
            "upstream.host: 'bad host' is neither an IP address nor a host name (letters, digits, '-', '.')",
        ),
        ('[listen]\nhost = "999.1.1.1"\n', "listen.host: '999.1.1.1' is not an IP address"),
        ('[upstream]\nhost = ""\n', "upstream.host: empty: give a host name or an IP address"),
        ('[http]\nhost = "1.2.3"\n', "http.host: '1.2.3' is not an IP address"),
        (
            '[bounces]\nsmtp_host = "mail server"\n',
            "bounces.smtp_host: 'mail server' is neither an IP address nor a host name (letters, digits, '-', '.')",
        ),
        (
            '[[profiles]]\nname = "hr"\nsender_domain = "hr.example.com"\nhost = "smtp api.example"\n',
            "profiles.0.host: 'smtp api.example' is neither an IP address nor a host name (letters, digits, '-', '.')",
        ),
    ],
)
def test_a_host_that_cannot_be_one_names_its_key(tmp_path: Path, toml: str, expected: str) -> None:
    assert config_error(tmp_path, toml) == expected


@pytest.mark.parametrize("host", ["smtp-api.infobip.com", "localhost", "mail_1.corp.example.", "::1", "0.0.0.0"])
def test_names_and_addresses_still_pass(tmp_path: Path, host: str) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(f'[upstream]\nhost = "{host}"\n[listen]\nhost = "{host}"\n')
    assert load_settings(path).upstream.host == host


def test_an_empty_listen_or_http_host_is_every_address(tmp_path: Path) -> None:
    """ "" listens on IPv4 and IPv6 at once (`::` takes IPv6 only): the one way to say both, and valid before."""
    path = tmp_path / "relay.toml"
    path.write_text('[listen]\nhost = ""\n[http]\nhost = ""\n')
    settings = load_settings(path)
    assert (settings.listen.host, settings.http.host) == ("", "")
    assert listen_problems(settings) == []


def test_an_address_family_the_kernel_lacks_is_skipped_as_asyncio_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """IPv6 off, and ::1 still beside 127.0.0.1 for localhost in /etc/hosts: asyncio binds 127.0.0.1; the
    check must not refuse to start (it did, on EAFNOSUPPORT from creating the IPv6 socket)."""
    real = socket.socket

    def no_ipv6(family: int = socket.AF_INET, *args: object) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real(family, *args)  # type: ignore[arg-type]

    both = [
        (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", 0, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", 0)),
    ]
    monkeypatch.setattr(config_warnings.socket, "socket", no_ipv6)
    monkeypatch.setattr(config_warnings.socket, "getaddrinfo", lambda *args, **kwargs: both)
    settings = Settings.model_validate({"listen": {"host": "localhost"}})
    assert listen_problems(settings) == []


@pytest.mark.parametrize(
    ("toml", "key"),
    [
        ('[policy]\nallowed_sender_domains = ["@example.com"]\n', "policy.allowed_sender_domains"),
        ('[policy]\nallowed_sender_domains = ["erp example.com"]\n', "policy.allowed_sender_domains"),
        ('[policy]\nallowed_sender_domains = [""]\n', "policy.allowed_sender_domains"),
        ('[[policy.rules]]\nsender_domain = "@erp.example.com"\n', "policy.rules.0.sender_domain"),
        ('[[policy.rules]]\nrecipient_domain = "a@b.example"\n', "policy.rules.0.recipient_domain"),
        ('[[profiles]]\nname = "hr"\nsender_domain = "@hr.example.com"\n', "profiles.0.sender_domain"),
    ],
)
def test_a_sender_domain_that_could_never_match_is_refused(tmp_path: Path, toml: str, key: str) -> None:
    message = config_error(tmp_path, toml)
    assert message.startswith(f"{key}: ")
    assert "is not a domain: write the domain alone" in message


def test_the_domain_error_shows_the_fix(tmp_path: Path) -> None:
    assert config_error(tmp_path, '[policy]\nallowed_sender_domains = ["@Example.com"]\n') == (
        "policy.allowed_sender_domains: '@Example.com' is not a domain: write the domain alone, e.g. 'example.com'"
        " (matched exactly)"
    )


def test_a_client_users_domains_are_checked_the_same_way(tmp_path: Path) -> None:
    toml = '[[listen.users]]\nusername = "erp"\npassword = "x"\nallowed_sender_domains = ["@erp.example.com"]\n'
    assert "listen.users.0.allowed_sender_domains: '@erp.example.com' is not a domain" in config_error(tmp_path, toml)


def test_domains_are_still_trimmed_and_lower_cased(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[policy]\nallowed_sender_domains = [" ERP.Example.com "]\n')
    assert load_settings(path).policy.allowed_sender_domains == ["erp.example.com"]


def test_relay_profiles_that_is_not_json_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_PROFILES", "notjson")
    message = config_error(tmp_path)
    assert message.startswith("profiles: RELAY_PROFILES is not valid JSON (")
    assert """lists and tables in environment variables are JSON, e.g. '[{"name": "hr", """ in message
    monkeypatch.setenv("RELAY_PROFILES", "[]")
    monkeypatch.setenv("RELAY_LISTEN", "port=2600")
    assert config_error(tmp_path).startswith("listen: RELAY_LISTEN is not valid JSON (")
    monkeypatch.setenv("RELAY_LISTEN", '{"port": 2600}')
    monkeypatch.setenv("RELAY_EVENT_LOOP", "asyncio")  # not a section: not config, not JSON
    assert load_settings(None).listen.port == 2600
