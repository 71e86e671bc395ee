"""Minimised logs and the hipaa mode (issue 15): addresses as keyed hashes, no Subject, the checks
`privacy.mode = "hipaa"` makes at start-up (and check-config shows in any mode), and listen.require_tls.
The marker test in test_encryption.py searches a real relay's log and `relay queue list` with redaction on."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main as relay_main
from relay.config import ConfigError, Settings, load_settings
from relay.core.hipaa import PrivacyFacts, violations
from relay.core.redaction import AddressHasher
from relay.store.sealing import new_key
from relay.testing.standin import InfobipStandIn
from tests.conftest import Dialog, StartRelay
from tests.helpers import SENDER, send_one, toml_text
from tests.inbound_helpers import inbound_tls
from tests.outcomes import messages, reports_on

ROOT = Path(__file__).resolve().parent.parent


def test_an_address_hash_is_keyed_stable_and_case_blind() -> None:
    one, other = AddressHasher(b"k" * 32), AddressHasher(b"j" * 32)
    assert one.address("John.Doe@Clinic.example") == one.address("john.doe@clinic.example")
    assert one.address("john.doe@clinic.example") != other.address("john.doe@clinic.example")
    assert one.address("a@x.example").startswith("h:") and len(one.address("a@x.example")) == 18


def test_redaction_reaches_addresses_in_any_field_and_drops_every_subject() -> None:
    hasher = AddressHasher(b"k" * 32)
    rcpt = "john.doe@clinic.example"
    reply = f"550 5.1.1 <{rcpt}>: no such user"
    assert hasher.value("reply", reply) == f"550 5.1.1 <{hasher.address(rcpt)}>: no such user"
    assert hasher.value("refused", {rcpt: reply}) == {hasher.address(rcpt): hasher.text(reply)}
    assert hasher.value("recipients", [rcpt]) == [hasher.address(rcpt)]
    assert hasher.value("message_id", "<appt-4711-john.doe-dob-1970-01-01@clinic.example>") == (
        f"<{hasher.address('appt-4711-john.doe-dob-1970-01-01@clinic.example')}>"
    )
    assert hasher.value("subject", "HIV test results") == "[redacted]"
    assert hasher.text("bad header line 'Subject: HIV test results'") == "bad header line 'Subject: [redacted]"
    assert hasher.value("size", 42) == 42


def test_redact_without_a_key_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, privacy={"redact": True})
    assert "privacy.redact needs privacy.redact_key_file or spool.encryption_key_file" in str(error.value)
    key = tmp_path / "hash.key"
    key.write_text(new_key())
    assert load_settings(None, privacy={"redact": True, "redact_key_file": str(key)}).address_hash_key()


# the hipaa mode


def compliant() -> PrivacyFacts:
    return PrivacyFacts(
        spool_enabled=True,
        spool_encrypted=True,
        upstreams=[("upstream.host", "hipaa.example.infobip.com", True)],
        hipaa_upstream_host="hipaa.example.infobip.com",
        header_rules=[("policy.rules[0]", "X-IB-Tracking-Url", "https://hooks.example.com/{queue_id}")],
        redact=True,
        require_tls=False,
        listen_host="127.0.0.1",
        http_enabled=True,
        http_host="127.0.0.1",
        history=False,
    )


def test_each_hipaa_rule_names_what_breaks_it() -> None:
    assert violations(compliant()) == []
    cases: dict[str, dict[str, Any]] = {
        "spool.encryption_key_file": {"spool_encrypted": False},
        "message history": {"history": True, "spool_enabled": False, "spool_encrypted": False},
        "privacy.hipaa_upstream_host is not set": {"hipaa_upstream_host": "", "upstreams": []},
        "is not privacy.hipaa_upstream_host": {"upstreams": [("upstream.host", "smtp-api.infobip.com", True)]},
        "insecure_skip_verify": {"upstreams": [("upstream.host", "hipaa.example.infobip.com", False)]},
        "writes X-IB-Callback-Data": {
            "header_rules": [("policy.rules[0]", "X-IB-Callback-Data", '{"q":"{queue_id}"}')]
        },
        "client-controlled placeholder into X-Ref": {"header_rules": [("policy.rules[1]", "X-Ref", "{message_id}")]},
        "privacy.redact is off": {"redact": False},
        "listen.require_tls is off": {"listen_host": "0.0.0.0"},
        "http.host '0.0.0.0'": {"http_host": "0.0.0.0"},
    }
    fields = {name: getattr(compliant(), name) for name in PrivacyFacts.__slots__}
    for expected, change in cases.items():
        found = violations(PrivacyFacts(**{**fields, **change}))
        assert len(found) == 1 and expected in found[0], (expected, found)
    assert violations(PrivacyFacts(**{**fields, "listen_host": "0.0.0.0", "require_tls": True})) == []
    assert violations(PrivacyFacts(**{**fields, "spool_enabled": False, "spool_encrypted": False})) == []
    assert violations(PrivacyFacts(**{**fields, "history": True})) == []  # sealed with the spool's key
    assert violations(PrivacyFacts(**{**fields, "history": True, "spool_encrypted": False})) == [
        "spool.encryption_key_file is not set: queued messages and the message history would be stored in the clear"
    ]  # one line for the one setting that fixes both


def hipaa_config(tmp_path: Path, **changes: dict[str, Any]) -> dict[str, dict[str, Any]]:
    key = tmp_path / "spool.key"
    if not key.exists():
        key.write_text(new_key())
    sections: dict[str, dict[str, Any]] = {
        "listen": {"host": "127.0.0.1"},
        "upstream": {"host": "hipaa.example.infobip.com", "username": "u", "password": "p"},
        "spool": {"path": str(tmp_path / "spool"), "encryption_key_file": str(key)},
        "privacy": {"mode": "hipaa", "redact": True, "hipaa_upstream_host": "hipaa.example.infobip.com"},
    }
    for name, values in changes.items():
        sections.setdefault(name, {}).update(values)
    return sections


def test_hipaa_mode_accepts_a_compliant_config_and_refuses_each_violation_by_name(tmp_path: Path) -> None:
    assert Settings(**hipaa_config(tmp_path)).privacy.mode == "hipaa"
    history = {"reports": {"enabled": True, "api_key": "k"}, "bounces": {"enabled": True, "smtp_host": "127.0.0.1"}}
    assert Settings(**hipaa_config(tmp_path, **history)).reports.enabled  # the history is sealed with the spool key
    with pytest.raises(ConfigError) as refused:
        load_settings(
            None,
            **hipaa_config(
                tmp_path,
                upstream={"host": "smtp-api.infobip.com"},
                spool={"encryption_key_file": ""},
                privacy={"redact": False},
                http={"host": "0.0.0.0"},
            ),
        )
    message = str(refused.value)
    for named in ("spool.encryption_key_file", "upstream.host 'smtp-api.infobip.com'", "privacy.redact", "http.host"):
        assert named in message, message


async def run_cli(*args: str) -> tuple[int, str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        *args,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.slow  # a relay process: .ci/run runs it
async def test_relay_serve_in_hipaa_mode_exits_2_naming_each_violation_and_touches_no_spool(tmp_path: Path) -> None:
    config = tmp_path / "relay.toml"
    config.write_text(toml_text(hipaa_config(tmp_path, listen={"host": "0.0.0.0"}, policy={})))
    with config.open("a") as toml:
        toml.write('\n[[policy.rules]]\nheaders = { "X-IB-Callback-Data" = "{\\"id\\":\\"{message_id}\\"}" }\n')
    code, _, err = await run_cli("serve", "--config", str(config))
    assert code == 2, err
    assert "config error" in err and 'privacy.mode = "hipaa" refuses to start' in err
    assert "listen.require_tls is off" in err and "policy.rules[0] writes X-IB-Callback-Data" in err
    assert not (tmp_path / "spool").exists()


def test_check_config_shows_what_hipaa_mode_would_refuse_in_the_standard_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in list(os.environ):
        if name.startswith("RELAY_"):
            monkeypatch.delenv(name)
    config = tmp_path / "relay.toml"
    config.write_text(toml_text(hipaa_config(tmp_path, privacy={"mode": "standard", "redact": False})))
    assert relay_main(["check-config", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert 'HIPAA: privacy.mode = "hipaa" would refuse this: privacy.redact is off' in err
    assert err.count("HIPAA:") == 1


# listen.require_tls


async def test_require_tls_refuses_mail_before_starttls_except_from_loopback(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path
) -> None:
    listen, context = inbound_tls(tmp_path)
    relay = await start_relay(
        listen={
            **listen,
            "require_tls": True,
            "proxy_protocol": True,  # the PROXY header says where the client is: 10.9.9.9 is not loopback
            "trusted_proxies": ["127.0.0.1/32"],
            "allowed_networks": ["10.0.0.0/8", "127.0.0.0/8"],
        }
    )
    remote = await Dialog.open(relay.port)
    remote.writer.write(b"PROXY TCP4 10.9.9.9 127.0.0.1 5555 25\r\n")
    assert (await remote.hello()).startswith("250")
    assert (
        await remote.send(f"MAIL FROM:<{SENDER}>")
        == "530 5.7.0 Must issue a STARTTLS command first (listen.require_tls)"
    )
    assert (await remote.send("STARTTLS")).startswith("220")
    await remote.writer.start_tls(context, server_hostname="localhost")
    assert (await remote.send("EHLO app.test")).startswith("250")
    assert (await remote.mail(SENDER, ["a@example.org"], b"From: <billing@erp.example.com>\r\n\r\nhi\r\n")).startswith(
        "250"
    )
    await remote.close()

    sidecar = await Dialog.open(relay.port)
    sidecar.writer.write(b"PROXY TCP4 127.0.0.9 127.0.0.1 5555 25\r\n")
    assert (await sidecar.hello()).startswith("250")
    assert (await sidecar.send(f"MAIL FROM:<{SENDER}>")).startswith("250")
    await sidecar.close()
    assert len(standin.messages) == 1


def test_require_tls_needs_a_certificate() -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(None, listen={"require_tls": True})
    assert "listen: require_tls needs tls_cert_file" in str(error.value)


async def test_get_messages_and_relay_trace_show_addresses_as_keyed_hashes_unless_revealed(
    standin: InfobipStandIn, start_relay: StartRelay, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key = tmp_path / "hash.key"
    key.write_text(new_key())
    relay = await start_relay(**reports_on(standin, tmp_path), privacy={"redact": True, "redact_key_file": str(key)})
    rcpt = "patient.4711@example.org"
    data = f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nMessage-ID: <appt-4711@erp.example.com>\r\n\r\nhi\r\n".encode()
    assert (await send_one(relay.port, SENDER, [rcpt], data)).startswith("250")
    found: list[dict[str, Any]] = []

    async def looked_up() -> bool:
        found[:] = await messages(relay, rcpt)  # ops still search by the address itself
        return bool(found)

    for _ in range(500):
        if await looked_up():
            break
        await asyncio.sleep(0.01)
    shown = json.dumps(found)
    hasher = AddressHasher(relay.settings.address_hash_key() or b"")
    assert rcpt not in shown and SENDER not in shown and "appt-4711" not in shown, shown
    assert hasher.address(rcpt) in shown and hasher.address(SENDER) in shown
    trace_config = tmp_path / "trace.toml"
    sections = reports_on(standin, tmp_path)
    trace_config.write_text(
        toml_text(
            {**sections, "privacy": {"redact": True, "redact_key_file": str(key)}, "spool": {"path": str(tmp_path)}}
        )
    )
    for flags, hidden in (((), True), (("--json",), True), (("--reveal",), False)):
        capsys.readouterr()
        assert relay_main(["trace", "--config", str(trace_config), *flags, rcpt]) == 0
        out = capsys.readouterr().out
        assert (rcpt not in out and hasher.address(rcpt) in out) is hidden, (flags, out)
