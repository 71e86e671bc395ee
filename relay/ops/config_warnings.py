"""`relay check-config`: what is dangerous in a valid config, and the effective config with secrets masked."""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import ssl
import tempfile
from pathlib import Path

from relay.config import IPNetwork, Settings
from relay.core.profiles import ProfileMatch, unreachable

TRACKING_HEADERS = {"x-ib-tracking-url", "x-ib-notify-url", "x-ib-callback-data", "x-ib-notify-content-type"}
_PRIVATE = [
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
]


def is_private_network(network: IPNetwork) -> bool:
    """Inside loopback, RFC 1918, CGNAT, unique-local or link-local space: not the open internet."""
    return any(
        network.version == private.version and network.subnet_of(private)  # type: ignore[arg-type]
        for private in _PRIVATE
    )


def config_warnings(settings: Settings) -> list[str]:
    warnings = [
        f"listen.allowed_networks: {network} includes public address space: anyone there can send through "
        "your Infobip account (an open relay)"
        for network in settings.listen.allowed_networks
        if not is_private_network(network)
    ]
    if settings.policy.alignment == "off":
        warnings.append(
            "policy.alignment = off: misaligned senders reach Infobip, which refuses them; apps get a 5xx "
            "from Infobip instead of a clear one from the relay"
        )
    for index, rule in enumerate(settings.policy.rules):
        overridden = sorted(name for name in rule.headers if name.lower() in TRACKING_HEADERS)
        if rule.replace_existing and overridden:
            warnings.append(
                f"policy.rules[{index}]: replace_existing = true overrides the app's own tracking headers "
                f"({', '.join(overridden)}): its webhooks will stop receiving events"
            )
    if settings.upstream.insecure_skip_verify:
        warnings.append(
            "upstream.insecure_skip_verify = true: certificates are not verified; anyone in the path can take "
            "your Infobip credentials"
        )
    if not settings.spool.enabled:
        warnings.append("spool.enabled = false: a temporary Infobip failure is answered 451 and apps must retry")
    if settings.listen.max_recipients > 1000:
        warnings.append("listen.max_recipients > 1000: messages are split into several Infobip transactions")
    warnings += [
        f"listen.users {user.username!r}: its password is in plain text here; put what `relay hash-password` "
        "prints in password_hash instead (and remove password), so a leaked config gives away no password"
        for user in settings.listen.users
        if user.password is not None
    ]
    return warnings + _exposure_warnings(settings)


def _exposure_warnings(settings: Settings) -> list[str]:
    """What an attacker or a mistake could use: an open ops port, client-controlled data in callback
    data, a profile no message can reach."""
    warnings = []
    if settings.http.enabled and not ipaddress.ip_address(_host_address(settings.http.host)).is_loopback:
        warnings.append(
            f"http.host = {settings.http.host}: /metrics, /upstream and /messages answer anyone who can reach the "
            "port (they ignore listen.allowed_networks); restrict it (firewall, NetworkPolicy) or bind to 127.0.0.1"
        )
    rules = [(f"policy.rules[{i}]", r) for i, r in enumerate(settings.policy.rules)] + [
        (f"profiles {p.name!r} rules[{i}]", r) for p in settings.profiles for i, r in enumerate(p.rules)
    ]
    for where, rule in rules:
        value = next((v for k, v in rule.headers.items() if k.lower() == "x-ib-callback-data"), "")
        if "{message_id}" in value or "{sender}" in value:
            warnings.append(
                f"{where}: X-IB-Callback-Data carries {{message_id}} or {{sender}}, which the sending app controls "
                "(and which may carry personal data): prefer {queue_id}"
            )
    matches = [ProfileMatch(p.name, p.sender_domain, p.sender, p.client_network, p.user) for p in settings.profiles]
    warnings += [
        f"profiles {name!r}: no message can reach it: {earlier!r} comes first and matches everything it would"
        for name, earlier in unreachable(matches)
    ]
    return warnings


def _host_address(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return "127.0.0.1" if host == "localhost" else "0.0.0.0"  # a name: assume it is reachable
    return host


def effective_config(settings: Settings) -> str:
    """The config as the relay sees it, secrets masked (SecretStr dumps as '**********')."""
    return json.dumps(settings.model_dump(mode="json"), indent=2, sort_keys=False)


def serve_refusals(settings: Settings) -> list[str]:
    """What `relay serve` refuses to start with although the file is valid, each naming its key: the one
    list serve and `check-config --strict` both go by. Secrets missing here, an address it cannot listen on."""
    return settings.missing_secrets() + listen_problems(settings)


def listen_problems(settings: Settings) -> list[str]:
    """listen.host and http.host as `relay serve` would bind them, tried on port 0 (so a port in use is not
    a problem here): a name that does not resolve, an address not on this machine."""
    hosts = [("listen.host", settings.listen.host)]
    if settings.http.enabled:
        hosts.append(("http.host", settings.http.host))
    problems = []
    for key, host in hosts:
        try:
            _try_bind(host)
        except OSError as exc:
            problems.append(f"{key}: cannot listen on {host!r}: {exc.strerror or exc}")
    return problems


def _try_bind(host: str) -> None:
    """Bind each address `host` resolves to, as asyncio's create_server does (which skips an address family
    the machine lacks, EADDRNOTAVAIL, as long as another address binds)."""
    bound, unavailable = False, None
    for family, kind, proto, _, address in socket.getaddrinfo(
        host or None, 0, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    ):
        try:
            with socket.socket(family, kind, proto) as probe:
                probe.bind(address)
                bound = True
        except OSError as exc:  # a family the kernel lacks (IPv6 off, ::1 still in /etc/hosts), as asyncio skips
            if exc.errno not in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT, errno.EPROTONOSUPPORT):
                raise
            unavailable = exc
    if not bound and unavailable is not None:
        raise unavailable


def strict_warnings(settings: Settings) -> list[str]:
    """`check-config --strict`: what `serve` would trip over on this machine, tried without changing
    anything: the spool directory, the CA bundle, the listener's certificate, the credential files."""
    warnings = []
    if settings.spool.enabled and (problem := _spool_problem(settings.spool.path)):
        warnings.append(f"spool.path: {problem}")
    if settings.upstream.ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(settings.upstream.ca_file))
        except (ssl.SSLError, OSError) as exc:
            warnings.append(f"upstream.ca_file: {settings.upstream.ca_file} is not a usable PEM CA bundle: {exc}")
    listen = settings.listen
    if listen.tls_cert_file is not None and listen.tls_key_file is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
                listen.tls_cert_file, listen.tls_key_file
            )
        except (ssl.SSLError, OSError) as exc:
            warnings.append(f"listen.tls_cert_file/tls_key_file: not a usable certificate and key: {exc}")
    for name in ("username", "password"):
        path: Path | None = getattr(settings.upstream, f"{name}_file")
        if path is not None and not getattr(settings.upstream, name).get_secret_value():
            warnings.append(f"upstream.{name}_file: {path} is empty")
    return warnings


def _spool_problem(path: Path) -> str | None:
    """Why `relay serve` could not use `path` as its spool (it creates it, so a missing one is fine when
    its nearest existing parent is writable), or None."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if existing == path:
        try:
            with tempfile.TemporaryFile(dir=path):
                pass
        except OSError as exc:
            return f"cannot write in {path}: {exc.strerror or exc}"
        return None
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"cannot create {path}: {existing} is not writable by this user"
    return None
