"""relay.config: the TOML surface, env overrides, secrets files, and one clear line per bad setting."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from relay.config import ConfigError, PolicyRule, Settings, UpstreamSettings, load_settings
from relay.core.policy import MessageFacts, expand
from tests.helpers import clear_relay_env, env_without_relay

# The example in DESIGN.md, as ops would write it (TOML inline tables are one line, however long).
DESIGN_RULE_HEADERS = r"""headers = { "X-IB-Tracking-Url" = "https://hooks.example.com/ib/track", "X-IB-Callback-Data" = "{\"app\":\"erp\",\"queue_id\":\"{queue_id}\"}" }"""  # noqa: E501
DESIGN_TOML = r"""
[listen]
host = "0.0.0.0"
port = 2525
hostname = "relay.example.internal"
allowed_networks = ["127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"]
max_message_size = 20971520
max_recipients = 1000
max_connections = 200

[upstream]
host = "smtp-api.infobip.com"
port = 587
tls = "starttls"
username = ""
password = ""
ca_file = ""
pool_size = 4

[spool]
enabled = true
path = "/var/spool/relay"
sync_wait = 5.0
max_age = 432000

[policy]
alignment = "reject"
allowed_sender_domains = []

[[policy.rules]]
sender_domain = "erp.example.com"
{DESIGN_RULE_HEADERS}
replace_existing = false

[limits]
client_messages_per_minute = 0
messages_per_minute = 0
client_recipients_per_hour = 0
memory_budget = 268435456

[http]
host = "0.0.0.0"
port = 9090

[log]
format = "json"
level = "info"
""".replace("{DESIGN_RULE_HEADERS}", DESIGN_RULE_HEADERS)


@pytest.fixture(autouse=True)
def no_relay_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """The developer's own RELAY_* variables must not leak into these tests."""
    clear_relay_env(monkeypatch)


def write(tmp_path: Path, text: str, name: str = "relay.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def config_error(path: Path | None) -> str:
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    message = str(info.value)
    assert "\n" not in message  # one line, whatever went wrong
    return message


# --- loading ------------------------------------------------------------------------------------


def test_the_design_example_loads(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, DESIGN_TOML))
    assert settings.listen.port == 2525
    assert settings.listen.hostname == "relay.example.internal"
    assert settings.listen.allowed_networks == [
        ipaddress.ip_network(n) for n in ("127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
    ]
    assert (settings.listen.max_message_size, settings.listen.max_recipients) == (20971520, 1000)
    assert (settings.upstream.host, settings.upstream.port, settings.upstream.tls) == (
        "smtp-api.infobip.com",
        587,
        "starttls",
    )
    assert settings.upstream.ca_file is None  # "" means none
    assert settings.spool.path == Path("/var/spool/relay")
    assert settings.policy.alignment == "reject"
    assert settings.policy.rules == [
        PolicyRule(
            sender_domain="erp.example.com",
            headers={
                "X-IB-Tracking-Url": "https://hooks.example.com/ib/track",
                "X-IB-Callback-Data": '{"app":"erp","queue_id":"{queue_id}"}',
            },
            replace_existing=False,
        )
    ]
    facts = MessageFacts(
        queue_id="q1", message_id="<m@x>", sender="a@erp.example.com", client_ip="10.0.0.1", recipients=()
    )
    assert expand(settings.policy.rules[0].headers["X-IB-Callback-Data"], facts) == '{"app":"erp","queue_id":"q1"}'
    assert (settings.http.port, settings.log.format, settings.log.level) == (9090, "json", "info")


def test_no_file_gives_the_defaults() -> None:
    settings = load_settings(None)
    assert settings.model_dump() == Settings().model_dump()
    assert settings.listen.port == 2525
    assert settings.listen.max_message_size == 20971520
    assert settings.listen.max_recipients == 1000
    assert settings.upstream.host == "smtp-api.infobip.com"
    assert settings.upstream.password.get_secret_value() == ""


def test_keys_are_lower_cased_where_they_are_compared(tmp_path: Path) -> None:
    text = """
[policy]
allowed_sender_domains = [" ERP.Example.com "]
[[policy.rules]]
sender = "Billing@ERP.example.com"
recipient_domain = "Example.ORG"
client_network = "10.0.0.0/8"
"""
    policy = load_settings(write(tmp_path, text)).policy
    assert policy.allowed_sender_domains == ["erp.example.com"]
    rule = policy.rules[0]
    assert (rule.sender, rule.recipient_domain) == ("billing@erp.example.com", "example.org")
    assert rule.client_network == ipaddress.ip_network("10.0.0.0/8")


# --- env overrides and secrets ------------------------------------------------------------------


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, '[upstream]\nusername = "from-file"\npassword = "from-file"\n[listen]\nport = 2600\n')
    monkeypatch.setenv("RELAY_UPSTREAM__PASSWORD", "from-env")
    monkeypatch.setenv("RELAY_LISTEN__ALLOWED_NETWORKS", '["10.9.0.0/16"]')
    settings = load_settings(path)
    assert settings.upstream.password.get_secret_value() == "from-env"
    assert settings.upstream.username.get_secret_value() == "from-file"  # the rest of the section still loads
    assert settings.listen.port == 2600
    assert settings.listen.allowed_networks == [ipaddress.ip_network("10.9.0.0/16")]


def test_env_alone_without_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_UPSTREAM__USERNAME", "user")
    monkeypatch.setenv("RELAY_UPSTREAM__PASSWORD", "secret")
    monkeypatch.setenv("RELAY_LISTEN__PORT", "2526")
    settings = load_settings(None)
    settings.upstream.require_credentials()
    assert (settings.upstream.username.get_secret_value(), settings.listen.port) == ("user", 2526)


def test_bad_env_value_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_LISTEN__PORT", "not-a-port")
    assert config_error(None) == (
        "listen.port: Input should be a valid integer, unable to parse string as an integer (from RELAY_LISTEN__PORT)"
    )


def test_unknown_env_key_names_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_LISTEN__PROT", "2526")
    assert config_error(None) == (
        "listen.prot: unknown setting (check the spelling against config.example.toml) (from RELAY_LISTEN__PROT)"
    )


def test_password_file(tmp_path: Path) -> None:
    secret = write(tmp_path, "s3cr3t with spaces \n", "password")
    user = write(tmp_path, "ib-user\r\n", "username")
    path = write(tmp_path, f'[upstream]\nusername_file = "{user}"\npassword_file = "{secret}"\npassword = "ignored"\n')
    upstream = load_settings(path).upstream
    assert upstream.password.get_secret_value() == "s3cr3t with spaces "  # only the line ending is removed
    assert upstream.username.get_secret_value() == "ib-user"
    upstream.require_credentials()


def test_password_file_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = write(tmp_path, "from-docker-secret\n", "password")
    monkeypatch.setenv("RELAY_UPSTREAM__PASSWORD_FILE", str(secret))
    assert load_settings(None).upstream.password.get_secret_value() == "from-docker-secret"


def test_unreadable_password_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    message = config_error(write(tmp_path, f'[upstream]\npassword_file = "{missing}"\n'))
    assert message == f"upstream.password_file: '{missing}' cannot be read: No such file or directory"


def test_secrets_never_show_in_reprs(tmp_path: Path) -> None:
    settings = load_settings(write(tmp_path, '[upstream]\nusername = "ib-user"\npassword = "hunter2"\n'))
    assert "hunter2" not in repr(settings) and "hunter2" not in str(settings.upstream)
    assert "ib-user" not in repr(settings)
    assert str(settings.upstream.password) == "**********"


# --- one clear line naming the key ----------------------------------------------------------------


def test_unknown_key(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "[listen]\nprot = 2526\n"))
    assert message == "listen.prot: unknown setting (check the spelling against config.example.toml)"


def test_unknown_section(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, "[upstraem]\nhost = 'x'\n"))
    assert message == "upstraem: unknown setting (check the spelling against config.example.toml)"


def test_unknown_key_in_a_rule(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, '[[policy.rules]]\nsender_domian = "x.com"\n'))
    assert message == "policy.rules.0.sender_domian: unknown setting (check the spelling against config.example.toml)"


@pytest.mark.parametrize(
    ("network", "why"),
    [
        ("10.0.0.1/8", "10.0.0.1/8 has host bits set"),
        ("10.0.0.0/33", "'10.0.0.0/33' does not appear to be an IPv4 or IPv6 network"),
        ("lan", "'lan' does not appear to be an IPv4 or IPv6 network"),
    ],
)
def test_invalid_allowed_network(tmp_path: Path, network: str, why: str) -> None:
    message = config_error(write(tmp_path, f'[listen]\nallowed_networks = ["127.0.0.0/8", "{network}"]\n'))
    assert message == f"listen.allowed_networks: '{network}' is not a network: {why}"


@pytest.mark.parametrize(
    ("network", "why"),
    [
        ("10.0.0.1/8", "10.0.0.1/8 has host bits set"),
        ("lan", "'lan' does not appear to be an IPv4 or IPv6 network"),
    ],
)
def test_invalid_rule_network(tmp_path: Path, network: str, why: str) -> None:
    message = config_error(write(tmp_path, f'[[policy.rules]]\nclient_network = "{network}"\n'))
    assert message == f"policy.rules.0.client_network: '{network}' is not a network: {why}"


@pytest.mark.parametrize("name", ["X IB Tracking", "X-IB:Url", "Caf\u00e9", ""])
def test_bad_header_name_in_a_rule(tmp_path: Path, name: str) -> None:
    text = f'[[policy.rules]]\nheaders = {{ "X-Good" = "1" }}\n[[policy.rules]]\nheaders = {{ "{name}" = "1" }}\n'
    message = config_error(write(tmp_path, text))
    assert message == (
        f"policy.rules.1.headers: header name {name!r} is not valid: "
        "use 1-76 printable ASCII characters without ':' or spaces"
    )


@pytest.mark.parametrize("escaped", [r"a\nBcc: victim@example.org", r"a\r\nb", r"a\rb", r"a\u0000b", r"a\u001bb"])
def test_header_value_with_a_line_break_or_control(tmp_path: Path, escaped: str) -> None:
    message = config_error(write(tmp_path, f'[[policy.rules]]\nheaders = {{ "X-IB-Tracking-Url" = "{escaped}" }}\n'))
    assert message == (
        "policy.rules.0.headers: header 'X-IB-Tracking-Url': the value contains a line break or control character"
    )


def test_header_value_too_long_to_fold(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, f'[[policy.rules]]\nheaders = {{ "X-A" = "{"x" * 1200}" }}\n'))
    assert message.startswith("policy.rules.0.headers: header 'X-A': the value has a run of more than 998 characters")


@pytest.mark.parametrize("hostname", ["relay example", "relay\\r\\nMAIL FROM:<x@y>", "", "-relay"])
def test_bad_hostname(tmp_path: Path, hostname: str) -> None:
    # The hostname goes into the EHLO we send Infobip and the Message-IDs we add.
    message = config_error(write(tmp_path, f'[listen]\nhostname = "{hostname}"\n'))
    assert message.startswith("listen.hostname: ")
    assert "is not a host name" in message


def test_several_problems_in_one_line(tmp_path: Path) -> None:
    message = config_error(
        write(tmp_path, '[listen]\nport = 70000\n[policy]\nalignment = "strict"\n[upstream]\ntls = "none"\n')
    )
    assert message == (
        "listen.port: Input should be less than or equal to 65535; "
        "upstream.tls: Input should be 'starttls' or 'implicit'; "
        "policy.alignment: Input should be 'reject', 'rewrite' or 'off'"
    )


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[listen\nport = 1\n")
    assert config_error(path).startswith(f"{path}: ")


def test_missing_config_file() -> None:
    assert (
        config_error(Path("/nonexistent/relay.toml"))
        == "--config: /nonexistent/relay.toml does not exist or is not a file"
    )


def test_missing_ca_file(tmp_path: Path) -> None:
    message = config_error(write(tmp_path, '[upstream]\nca_file = "/nonexistent/ca.pem"\n'))
    assert message == "upstream.ca_file: '/nonexistent/ca.pem' cannot be read: No such file or directory"


# --- credentials --------------------------------------------------------------------------------


def test_require_credentials_names_the_missing_key() -> None:
    with pytest.raises(ConfigError) as info:
        UpstreamSettings().require_credentials()
    assert str(info.value) == (
        "upstream.username: missing; set RELAY_UPSTREAM__USERNAME or upstream.username_file "
        "(your Infobip SMTP API credentials)"
    )
    with pytest.raises(ConfigError) as info:
        UpstreamSettings(username="user").require_credentials()
    assert str(info.value) == (
        "upstream.password: missing; set RELAY_UPSTREAM__PASSWORD or upstream.password_file "
        "(your Infobip SMTP API credentials)"
    )
    UpstreamSettings(username="user", password="pw").require_credentials()


# --- the real command line -----------------------------------------------------------------------


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = env_without_relay()
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_cli_refuses_to_start_without_credentials(tmp_path: Path) -> None:
    path = write(tmp_path, f'[listen]\nport = 0\nhost = "127.0.0.1"\n[spool]\npath = "{tmp_path / "spool"}"\n')
    done = run_cli(tmp_path, "serve", "--config", str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    lines = done.stderr.splitlines()
    assert lines == [  # one line, naming each key missing
        "relay: config error: upstream.username: missing; set RELAY_UPSTREAM__USERNAME or "
        "upstream.username_file (your Infobip SMTP API credentials); upstream.password: missing; set "
        "RELAY_UPSTREAM__PASSWORD or upstream.password_file (your Infobip SMTP API credentials)"
    ]
    assert done.stdout == ""


def test_cli_names_the_bad_key(tmp_path: Path) -> None:
    path = write(tmp_path, '[listen]\nallowed_networks = ["10.0.0.1/8"]\n')
    done = run_cli(tmp_path, "serve", "--config", str(path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.splitlines() == [
        "relay: config error: listen.allowed_networks: '10.0.0.1/8' is not a network: 10.0.0.1/8 has host bits set"
    ]


def test_check_config_warns_about_empty_credentials(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[listen]\nport = 2525\n")
    env = env_without_relay()
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert result.returncode == 0
    assert "WARNING: `relay serve` refuses this config here: upstream.username: missing; set" in result.stderr
