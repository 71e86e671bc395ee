"""What `privacy.mode = "hipaa"` requires of a config, as plain values in, a list of violations out.

The list is the same in any mode: in hipaa mode each item stops start-up (a config error, exit 2); in the
standard mode `relay check-config` prints them as warnings. Each item names the setting to change. The
reasons are Infobip's HIPAA-eligible Email API terms (docs/HIPAA.md): PHI only through the dedicated
endpoint, CallbackData is not HIPAA-eligible, content encrypted at rest and in transit, logs minimised.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

CALLBACK_HEADER = "x-ib-callback-data"
CLIENT_PLACEHOLDERS = ("{message_id}", "{sender}", "{sender_domain}")  # what the sending app controls


@dataclass(frozen=True, slots=True)
class PrivacyFacts:
    spool_enabled: bool
    spool_encrypted: bool
    upstreams: Sequence[tuple[str, str, bool]]  # (where, host, certificate verified): [upstream] and each profile
    hipaa_upstream_host: str
    header_rules: Sequence[tuple[str, str, str]]  # (where, header name, value template)
    redact: bool
    require_tls: bool
    listen_host: str
    http_enabled: bool
    http_host: str
    history: bool  # reports or bounces keep a message history (sealed with the spool key when there is one)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def violations(facts: PrivacyFacts) -> list[str]:
    found: list[str] = []
    kept = (("queued messages", facts.spool_enabled), ("the message history", facts.history))
    in_clear = [what for what, on in kept if on]
    if in_clear and not facts.spool_encrypted:  # the history is sealed with the spool's key
        found.append(f"spool.encryption_key_file is not set: {' and '.join(in_clear)} would be stored in the clear")
    found += _upstream(facts)
    for where, name, template in facts.header_rules:
        if name.lower() == CALLBACK_HEADER:
            found.append(f"{where} writes X-IB-Callback-Data, which is not HIPAA-eligible")
        elif any(p in template for p in CLIENT_PLACEHOLDERS):
            found.append(f"{where} puts a client-controlled placeholder into {name} (PHI could reach a header)")
    if not facts.redact:
        found.append("privacy.redact is off: addresses would be written to logs")
    if not facts.require_tls and not is_loopback(facts.listen_host):
        found.append("listen.require_tls is off and listen.host is not loopback: messages could arrive in clear")
    if facts.http_enabled and not is_loopback(facts.http_host):
        found.append(f"http.host {facts.http_host!r} is not loopback: the ops endpoints would be reachable")
    return found


def _upstream(facts: PrivacyFacts) -> list[str]:
    found = []
    if not facts.hipaa_upstream_host:
        found.append("privacy.hipaa_upstream_host is not set (the dedicated endpoint Infobip gives after onboarding)")
    for where, host, verified in facts.upstreams:
        if facts.hipaa_upstream_host and host.lower() != facts.hipaa_upstream_host.lower():
            found.append(f"{where} {host!r} is not privacy.hipaa_upstream_host {facts.hipaa_upstream_host!r}")
        if not verified:
            found.append(f"{where}: insecure_skip_verify is on: TLS to Infobip must be verified (TLS 1.2 or later)")
    return found
