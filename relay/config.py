"""The TOML config surface (see DESIGN.md), loaded with pydantic-settings.

Precedence: RELAY_<SECTION>__<KEY> environment variables, then the TOML file, then defaults.
Secrets are SecretStr and may also come from files (`password_file`, for Docker/Kubernetes secrets).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sqlite3
from pathlib import Path
from typing import Any, Literal, get_origin

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from relay.core.headers import HeaderError, validate_header_name, validate_header_value
from relay.core.hipaa import PrivacyFacts, violations
from relay.core.keys import derive, parse_key
from relay.core.passwords import parse_password_hash

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

INFOBIP_MAX_MESSAGE_SIZE = 20971520  # the SIZE Infobip advertises (seed 002)
INFOBIP_MAX_RECIPIENTS = 1000  # "limited to 1000 recipients" per transaction (seed 002)
_HOSTNAME_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,252})")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_DNS_NAME_RE = re.compile(rf"(?:{_LABEL}\.)*{_LABEL}\.?")


def host_problem(value: str) -> str | None:
    """Why `value` can be neither an IP address nor a DNS host name, or None. Caught here, a typo names its
    key; left to the resolver, it deferred every message or stopped start-up naming no key."""
    if not value.strip():
        return "empty: give a host name or an IP address"
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return None
    if len(value) > 253 or not _DNS_NAME_RE.fullmatch(value):
        return f"{value!r} is neither an IP address nor a host name (letters, digits, '-', '.')"
    if value.rstrip(".").rpartition(".")[2].isdigit():  # 999.1.1.1: no name ends in a number
        return f"{value!r} is not an IP address"
    return None


def _a_host(value: str) -> str:
    if problem := host_problem(value):
        raise ValueError(problem)
    return value


def _a_listen_host(value: str) -> str:
    """An address to listen on: "" is every address, IPv4 and IPv6 (as asyncio's create_server takes it;
    `::` alone takes IPv6 only, `0.0.0.0` IPv4 only)."""
    return value if value == "" else _a_host(value)


def domain_list(value: list[str]) -> list[str]:
    """Sender domains as compared (lower case, trimmed); '@example.com' or 'a b' could never match one."""
    return [_a_domain(d) for d in value]


def _a_domain(value: str) -> str:
    domain = value.strip().lower()
    if not domain or "@" in domain or any(c.isspace() for c in domain):
        bare = domain.rpartition("@")[2] or "example.com"
        raise ValueError(f"{value!r} is not a domain: write the domain alone, e.g. {bare!r} (matched exactly)")
    return domain


def _none_if_blank(value: Any) -> Any:
    """An empty file setting means "not set", as in config.example.toml (never the current directory)."""
    return None if isinstance(value, str) and not value.strip() else value


class ConfigError(Exception):
    """A setting is missing or invalid; the message names the key and says why."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClientUser(_Section):
    """A client that can AUTH to the relay (over our STARTTLS), limited to its own sender domains."""

    username: str
    password_hash: SecretStr | None = None  # what `relay hash-password` prints (scrypt); used when set
    password: SecretStr | None = None  # plain text: still accepted, with a check-config warning
    allowed_sender_domains: list[str] = Field(default_factory=list)  # empty: any the policy allows

    @field_validator("allowed_sender_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return domain_list(value)

    @field_validator("password_hash")
    @classmethod
    def _a_hash(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            parse_password_hash(value.get_secret_value())
        return value

    @model_validator(mode="after")
    def _a_password(self) -> ClientUser:
        if self.password_hash is None and self.password is None:
            raise ValueError(f"user {self.username!r}: set password_hash (the output of `relay hash-password`)")
        return self


class ListenSettings(_Section):
    host: str = "0.0.0.0"
    port: int = Field(2525, ge=0, le=65535)
    hostname: str = "relay.example.internal"
    allowed_networks: list[IPNetwork] = Field(
        default_factory=lambda: [
            ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16")
        ]
    )
    max_message_size: int = Field(INFOBIP_MAX_MESSAGE_SIZE, gt=0)
    max_recipients: int = Field(INFOBIP_MAX_RECIPIENTS, gt=0)
    max_connections: int = Field(200, gt=0)
    # Connections at once from one client address (behind a balancer, the PROXY source): None is a quarter of
    # max_connections, 0 no cap. One busy or broken app cannot hold every slot.
    max_connections_per_client: int | None = Field(None, ge=0)
    # AUTH guessing: each failure waits longer before its 535 (auth_failure_delay, doubling per recent failure
    # of that address, at most 16 times); a connection is closed after auth_failures_per_connection; an address
    # with auth_failures_per_client failures within auth_lockout seconds gets 454 4.7.0 for that long.
    auth_failure_delay: float = Field(1.0, ge=0)
    auth_failures_per_connection: int = Field(3, ge=1)
    auth_failures_per_client: int = Field(10, ge=1)
    auth_lockout: float = Field(300.0, gt=0)
    max_line_length: int = Field(1048576, ge=1001)  # legacy apps send unwrapped HTML
    max_header_fields: int = Field(1000, gt=0)  # fields in one message's header block (a long To: is one)
    max_header_bytes: int = Field(262144, ge=1000)  # bytes of one message's header block
    timeout: float = Field(300.0, gt=0)  # seconds a client may stay silent (between commands, or in DATA)
    data_timeout: float = Field(900.0, gt=0)  # the whole DATA phase, however steadily the bytes trickle in
    tls_cert_file: Path | None = None  # optional STARTTLS for clients that can do it (PEM)
    tls_key_file: Path | None = None
    auth_required: bool = False  # clients must AUTH (after STARTTLS) before MAIL
    users: list[ClientUser] = Field(default_factory=list)
    proxy_protocol: bool = False  # behind a load balancer that sends PROXY v1/v2: use its client address
    trusted_proxies: list[IPNetwork] = Field(default_factory=list)  # the only peers a PROXY header is taken from
    require_tls: bool = False  # MAIL before STARTTLS gets 530 5.7.0, except from loopback (a sidecar)

    @field_validator("tls_cert_file", "tls_key_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("tls_cert_file", "tls_key_file")
    @classmethod
    def _file_exists(cls, value: Path | None) -> Path | None:
        if value is not None and not value.is_file():
            raise ValueError(f"{str(value)!r} does not exist")
        return value

    @model_validator(mode="after")
    def _tls_and_auth_fit(self) -> ListenSettings:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if (self.auth_required or self.users) and self.tls_cert_file is None:
            raise ValueError("auth_required and users need tls_cert_file and tls_key_file: passwords never go in clear")
        if self.auth_required and not self.users:
            raise ValueError("auth_required needs at least one entry in listen.users")
        return self

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _a_listen_host(value)

    @field_validator("hostname")
    @classmethod
    def _valid_hostname(cls, value: str) -> str:
        # It goes into our banner, the EHLO we send Infobip and every Message-ID we add: a name, nothing else.
        if not _HOSTNAME_RE.fullmatch(value):
            raise ValueError(f"{value!r} is not a host name: use letters, digits, '.', '-' (at most 253)")
        return value

    @model_validator(mode="after")
    def _tls_to_require(self) -> ListenSettings:
        if self.require_tls and self.tls_cert_file is None:
            raise ValueError("require_tls needs tls_cert_file and tls_key_file: clients must be able to STARTTLS")
        return self

    @model_validator(mode="after")
    def _proxies_named(self) -> ListenSettings:
        if self.proxy_protocol and not self.trusted_proxies:
            raise ValueError(
                "proxy_protocol needs trusted_proxies: the load balancers' addresses, the only peers whose PROXY"
                " header may say who the client is"
            )
        return self

    @property
    def connections_per_client(self) -> int:
        """The per-address cap in force (0: none)."""
        if self.max_connections_per_client is not None:
            return self.max_connections_per_client
        return max(1, self.max_connections // 4)

    @field_validator("allowed_networks", "trusted_proxies", mode="before")
    @classmethod
    def _strict_networks(cls, value: Any) -> Any:
        # "10.0.0.1/8" is a typo for 10.0.0.0/8; say so rather than guess.
        if isinstance(value, list):
            for item in value:
                if isinstance(item, str):
                    try:
                        ipaddress.ip_network(item, strict=True)
                    except ValueError as exc:
                        raise ValueError(f"{item!r} is not a network: {exc}") from None
        return value


class UpstreamSettings(_Section):
    host: str = "smtp-api.infobip.com"
    port: int = Field(587, ge=1, le=65535)
    tls: Literal["starttls", "implicit"] = "starttls"
    username: SecretStr = SecretStr("")
    password: SecretStr = SecretStr("")
    username_file: Path | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    insecure_skip_verify: bool = False  # never in production: accepts any certificate (logged loudly)
    pool_size: int = Field(4, gt=0, le=100)
    connect_timeout: float = Field(15.0, gt=0)
    command_timeout: float = Field(30.0, gt=0)  # per reply before DATA
    data_timeout: float = Field(300.0, gt=0)  # for the final reply after the body
    idle_timeout: float = Field(60.0, gt=0)  # an idle pooled connection older than this is not reused

    @field_validator("ca_file", "username_file", "password_file", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _a_host(value)

    @field_validator("ca_file", "username_file", "password_file")
    @classmethod
    def _readable(cls, value: Path | None) -> Path | None:
        """Checked per key, so the error names upstream.ca_file rather than the section."""
        if value is not None:
            try:
                value.read_bytes()
            except OSError as exc:
                raise ValueError(f"{str(value)!r} cannot be read: {exc.strerror}") from None
        return value

    @model_validator(mode="after")
    def _read_secret_files(self) -> UpstreamSettings:
        for name in ("username", "password"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is None:
                continue
            try:
                secret = path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"{name}_file {str(path)!r} cannot be read: {exc.strerror}") from None
            setattr(self, name, SecretStr(secret))
        return self

    def missing_credentials(self) -> list[str]:
        """Each credential missing, named: Infobip would refuse every message without them."""
        return [
            f"upstream.{name}: missing; set RELAY_UPSTREAM__{name.upper()} "
            f"or upstream.{name}_file (your Infobip SMTP API credentials)"
            for name in ("username", "password")
            if not getattr(self, name).get_secret_value()
        ]

    def require_credentials(self) -> None:
        """Refuse to start without credentials (the first one missing)."""
        if missing := self.missing_credentials():
            raise ConfigError(missing[0])


class ProfileSettings(_Section):
    """One app's (or sender domain's) own way to Infobip: credentials, endpoint, pool, extra rules.

    Match keys (all that are set must fit; first matching profile wins): sender_domain, sender,
    client_network, user (inbound AUTH). Anything not set here comes from [upstream].
    """

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    sender_domain: str | None = None
    sender: str | None = None
    client_network: IPNetwork | None = None
    user: str | None = None
    username: SecretStr | None = None
    password: SecretStr | None = None
    username_file: Path | None = None
    password_file: Path | None = None
    api_key: SecretStr | None = None  # sent as Infobip's API-key login: username "App", password the key
    api_key_file: Path | None = None
    host: str | None = None
    port: int | None = Field(None, ge=1, le=65535)
    pool_size: int | None = Field(None, gt=0, le=100)
    messages_per_minute: int = Field(0, ge=0)  # this profile's own rate limit at MAIL (0 = none)
    rules: list[PolicyRule] = Field(default_factory=list)  # added to [policy] rules for this profile's mail
    # The Infobip API key its messages' delivery reports are fetched with (its own account); None: [reports]'s.
    reports_api_key: SecretStr | None = None
    reports_api_key_file: Path | None = None

    @field_validator("sender_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        return _a_domain(value) if value is not None else None

    @field_validator("host")
    @classmethod
    def _host(cls, value: str | None) -> str | None:
        return value if value is None else _a_host(value)

    @field_validator("username_file", "password_file", "api_key_file", "reports_api_key_file", mode="before")
    @classmethod
    def _no_file(cls, value: Any) -> Any:
        return _none_if_blank(value)

    @model_validator(mode="after")
    def _checked(self) -> ProfileSettings:
        if not any((self.sender_domain, self.sender, self.client_network, self.user)):
            raise ValueError(f"profile {self.name!r}: set at least one of sender_domain, sender, client_network, user")
        if self.name == "default":
            raise ValueError("profile name 'default' is taken by [upstream]")
        for name in ("username", "password", "api_key", "reports_api_key"):
            path: Path | None = getattr(self, f"{name}_file")
            if path is not None:
                try:
                    setattr(self, name, SecretStr(path.read_text(encoding="utf-8").rstrip("\r\n")))
                except OSError as exc:
                    raise ValueError(f"{name}_file {str(path)!r} cannot be read: {exc.strerror}") from None
        return self

    def upstream(self, base: UpstreamSettings) -> UpstreamSettings:
        """[upstream] with this profile's own settings over it."""
        update: dict[str, Any] = {}
        if self.api_key is not None:
            update.update(username=SecretStr("App"), password=self.api_key)
        for key in ("username", "password", "host", "port", "pool_size"):
            if getattr(self, key) is not None and key not in update:
                update[key] = getattr(self, key)
        return base.model_copy(update=update)


class SpoolSettings(_Section):
    enabled: bool = True
    path: Path = Path("/var/spool/relay")
    sync_wait: float = Field(5.0, ge=0)
    max_age: float = Field(432000, gt=0)
    retry_initial: float = Field(60.0, gt=0)  # first retry after about this long, doubling each time
    retry_max: float = Field(3600.0, gt=0)  # longest wait between attempts
    breaker_threshold: int = Field(5, gt=0)  # consecutive connection failures before pausing all delivery
    drain_timeout: float = Field(5.0, ge=0)  # on SIGTERM: seconds to finish sessions and deliveries
    # Encryption at rest (relay/store/sealing.py): the current key (what `relay keygen` prints) seals every new
    # record; old_key_files still open records sealed before a rotation, until `relay queue rekey`.
    encryption_key_file: Path | None = None
    old_key_files: list[Path] = Field(default_factory=list)
    _keys: list[bytes] = PrivateAttr(default_factory=list)

    @field_validator("path", mode="before")
    @classmethod
    def _a_path(cls, value: Any) -> Any:
        if isinstance(value, str) and not value.strip():  # Path("") is the current directory, made 0700
            raise ValueError("empty: set the spool directory, e.g. /var/spool/relay")
        return value

    @field_validator("old_key_files", mode="before")
    @classmethod
    def _no_empty_key_files(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(v, str) and not v.strip() for v in value):
            raise ValueError("an empty path: list the old key files, or leave the list empty")
        return value

    @field_validator("encryption_key_file", mode="before")
    @classmethod
    def _no_key_file(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("encryption_key_file")
    @classmethod
    def _a_key(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_key_file(value)
        return value

    @field_validator("old_key_files")
    @classmethod
    def _old_keys(cls, value: list[Path]) -> list[Path]:
        for path in value:
            read_key_file(path)
        return value

    @model_validator(mode="after")
    def _load_keys(self) -> SpoolSettings:
        if self.old_key_files and self.encryption_key_file is None:
            raise ValueError("old_key_files needs encryption_key_file: the key new records are sealed with")
        paths = [self.encryption_key_file, *self.old_key_files] if self.encryption_key_file else []
        self._keys = [read_key_file(path) for path in paths]
        return self

    @property
    def encryption_keys(self) -> list[bytes]:
        """The current key first, then the old ones; empty: no encryption."""
        return list(self._keys)


def read_key_file(path: Path) -> bytes:
    """A key file's 32 bytes; the ValueError names the file and what is wrong, never the key."""
    try:
        text = path.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(path)!r} cannot be read: {getattr(exc, 'strerror', None) or exc}") from None
    try:
        return parse_key(text)
    except ValueError as exc:
        raise ValueError(f"{str(path)!r} {exc}") from None


class PolicyRule(_Section):
    """Every matching rule applies, in order. A rule with no match keys matches every message."""

    sender_domain: str | None = None
    sender: str | None = None
    client_network: IPNetwork | None = None
    recipient_domain: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    replace_existing: bool = False

    @field_validator("sender")
    @classmethod
    def _lower(cls, value: str | None) -> str | None:
        return value.strip().lower() if value is not None else None

    @field_validator("sender_domain", "recipient_domain")
    @classmethod
    def _domain(cls, value: str | None) -> str | None:
        return _a_domain(value) if value is not None else None

    @field_validator("client_network", mode="before")
    @classmethod
    def _strict_network(cls, value: Any) -> Any:
        # As for listen.allowed_networks; and one clear line instead of pydantic's per-union-member errors.
        if isinstance(value, str):
            try:
                ipaddress.ip_network(value, strict=True)
            except ValueError as exc:
                raise ValueError(f"{value!r} is not a network: {exc}") from None
        return value

    @field_validator("headers")
    @classmethod
    def _valid_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            try:
                validate_header_name(name)
                validate_header_value(name, value)
            except HeaderError as exc:
                raise ValueError(str(exc)) from None
        return headers


class PolicySettings(_Section):
    alignment: Literal["reject", "rewrite", "off"] = "reject"
    allowed_sender_domains: list[str] = Field(default_factory=list)
    rules: list[PolicyRule] = Field(default_factory=list)

    @field_validator("allowed_sender_domains")
    @classmethod
    def _domains(cls, value: list[str]) -> list[str]:
        return domain_list(value)


class LimitsSettings(_Section):
    client_messages_per_minute: int = Field(0, ge=0)
    messages_per_minute: int = Field(0, ge=0)
    client_recipients_per_hour: int = Field(0, ge=0)
    memory_budget: int = Field(268435456, ge=0)


class HttpSettings(_Section):
    enabled: bool = True
    host: str = "127.0.0.1"  # loopback unless set: the endpoints ignore allowed_networks (the image sets 0.0.0.0)
    port: int = Field(9090, ge=0, le=65535)
    ready_upstream_window: float = Field(600.0, gt=0)  # /readyz: a failing upstream is tolerated this long

    @field_validator("host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _a_listen_host(value)


class ReportsSettings(_Section):
    """Infobip's delivery reports (relay/outcomes): pulled with the relay's own bulkId filter, or pushed."""

    enabled: bool = False
    base_url: str = "https://api.infobip.com"  # the account's API base URL
    api_key: SecretStr = SecretStr("")  # prefer RELAY_REPORTS__API_KEY or api_key_file; never logged
    api_key_file: Path | None = None
    ca_file: Path | None = None  # extra CA bundle, as upstream.ca_file
    poll_interval: float = Field(30.0, gt=0)  # seconds; doubled per error or 429, up to ten minutes
    notify_url: str = ""  # public URL Infobip can POST reports to (push); empty: pull only
    notify_listen: str = ""  # host:port of the push listener (not the ops port)
    history_path: Path | None = None  # default: history.sqlite3 in spool.path
    # postgresql://user:password@host/db: one history for every replica (relay/outcomes/postgres.py);
    # empty: SQLite at history_path. A secret (it may carry the password): never logged.
    history_url: SecretStr = SecretStr("")
    # seconds a write may wait for SQLite's lock (5 at most: relay/outcomes/sqlite.py); on PostgreSQL a statement may
    # take (lock waits included), and the network's silence before the connection counts as broken; then it fails
    history_timeout: float = Field(30.0, ge=1)
    history_days: float = Field(30.0, gt=0)
    # notes waiting behind a history write held up for HELD_UP seconds (a hung server, or failing and tried again) at
    # which MAIL gets 451 4.3.0 until the write is done: memory does not grow for ever (relay/outcomes/writer.py)
    history_backlog: int = Field(100_000, ge=1)
    # ... or once the header blocks they hold (kept for bounces) reach this many bytes: each may be up to 64 KiB
    history_backlog_bytes: int = Field(64 * 1024 * 1024, ge=1)

    @field_validator("api_key_file", "ca_file", "history_path", mode="before")
    @classmethod
    def _empty_is_none(cls, value: Any) -> Any:
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> ReportsSettings:
        if self.api_key_file is not None:
            try:
                self.api_key = SecretStr(self.api_key_file.read_text(encoding="utf-8").strip())
            except OSError as exc:
                raise ValueError(f"api_key_file {str(self.api_key_file)!r} cannot be read: {exc.strerror}") from None
        if self.ca_file is not None and not self.ca_file.is_file():
            raise ValueError(f"ca_file {str(self.ca_file)!r} does not exist")
        if not self.base_url.startswith("https://"):
            raise ValueError(f"base_url {self.base_url!r} must start with https:// (the API key goes with it)")
        if self.history_url.get_secret_value() and not self.history_url.get_secret_value().startswith(
            ("postgresql://", "postgres://")
        ):
            raise ValueError("history_url must start with postgresql:// (it is not shown here: it may hold a password)")
        if bool(self.notify_url) != bool(self.notify_listen):
            raise ValueError("notify_url and notify_listen go together (the public URL and the listener behind it)")
        if self.notify_url and not self.notify_url.startswith(("https://", "http://")):
            raise ValueError(f"notify_url {self.notify_url!r} is not an http(s) URL")
        if self.notify_listen:
            host, _, port = self.notify_listen.rpartition(":")
            if not host or not port.isdigit() or not 0 <= int(port) <= 65535:
                raise ValueError(f"notify_listen {self.notify_listen!r} is not host:port")
        return self

    def missing_api_key(self) -> list[str]:
        if self.enabled and not self.api_key.get_secret_value():
            return ["reports.api_key: missing; set RELAY_REPORTS__API_KEY or reports.api_key_file (an Infobip API key)"]
        return []


_DURATION_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhd]?)")


class BouncesSettings(_Section):
    """RFC 3464 bounces to the app's sender, through the company's own mail server (relay/outcomes)."""

    enabled: bool = False
    smtp_host: str = ""  # the server holding the senders' mailboxes (e.g. Exchange); plain SMTP, STARTTLS if offered
    smtp_port: int = Field(25, ge=1, le=65535)
    to: str = ""  # a fixed address for every bounce instead of the envelope sender
    delay_warning: float = Field(0.0, ge=0)  # "4h": one Action: delayed report per message queued that long; 0 off
    timeout: float = Field(30.0, gt=0)  # seconds per SMTP step towards smtp_host

    @field_validator("delay_warning", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if isinstance(value, str):
            found = _DURATION_RE.fullmatch(value.strip())
            if found is None:
                raise ValueError(f'{value!r} is not a duration such as "4h", "30m", "1d" or seconds')
            return float(found.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]
        return value

    @field_validator("smtp_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _a_host(value) if value else value  # empty: bounces off (checked below)

    @model_validator(mode="after")
    def _check(self) -> BouncesSettings:
        if self.enabled and not self.smtp_host:
            raise ValueError("smtp_host: needed when bounces are enabled (the mail server of the senders' mailboxes)")
        if self.to and "@" not in self.to:
            raise ValueError(f"to {self.to!r} is not an address")
        return self


class ClusterSettings(_Section):
    """Replicas sharing state through Redis (relay/cluster): the rate budget, the breakers, the members.
    Empty `redis_url`: one relay on its own, exactly as without this section."""

    redis_url: SecretStr = SecretStr("")  # redis://[:password@]host:6379/0; may carry a password: never logged
    node_name: str = ""  # this replica's name among the members; default: the host name (the pod name)
    key_prefix: str = Field("relay", min_length=1)  # several clusters can share one Redis
    heartbeat: float = Field(1.0, gt=0)  # seconds between heartbeats; a member silent for 3 of them is gone
    timeout: float = Field(0.5, gt=0)  # seconds a Redis call may take before the replica falls back to its share

    @field_validator("redis_url", mode="after")
    @classmethod
    def _redis_scheme(cls, value: SecretStr) -> SecretStr:
        url = value.get_secret_value()
        if url and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("redis_url must start with redis://, rediss:// or unix://")
        return value


class PrivacySettings(_Section):
    """Protected health information (docs/HIPAA.md): redaction, and the hipaa mode's start-up checks."""

    redact: bool = False  # addresses in logs and listings as keyed hashes; never a Subject
    redact_key_file: Path | None = None  # the hash's key (`relay keygen`); default: derived from the spool key
    mode: Literal["standard", "hipaa"] = "standard"  # hipaa: refuse to start unless relay/core/hipaa.py agrees
    hipaa_upstream_host: str = ""  # the dedicated HIPAA endpoint Infobip gives after onboarding

    @field_validator("redact_key_file", mode="before")
    @classmethod
    def _no_key_file(cls, value: Any) -> Any:
        return None if value == "" else value

    @field_validator("redact_key_file")
    @classmethod
    def _a_key(cls, value: Path | None) -> Path | None:
        if value is not None:
            read_key_file(value)
        return value


class LogSettings(_Section):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


HISTORY_SQLITE = (3, 35, 0)  # UPDATE ... RETURNING (the bounce outbox) and UPDATE ... FROM (a page of reports)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="RELAY_",
        env_nested_delimiter="__",
        extra="forbid",
        toml_file=None,
    )

    listen: ListenSettings = Field(default_factory=ListenSettings)
    upstream: UpstreamSettings = Field(default_factory=UpstreamSettings)
    spool: SpoolSettings = Field(default_factory=SpoolSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    log: LogSettings = Field(default_factory=LogSettings)
    privacy: PrivacySettings = Field(default_factory=PrivacySettings)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    reports: ReportsSettings = Field(default_factory=ReportsSettings)
    bounces: BouncesSettings = Field(default_factory=BouncesSettings)
    profiles: list[ProfileSettings] = Field(default_factory=list)

    @field_validator("profiles")
    @classmethod
    def _unique_profiles(cls, value: list[ProfileSettings]) -> list[ProfileSettings]:
        names = [profile.name for profile in value]
        if len(set(names)) != len(names):
            raise ValueError(f"profile names must be unique: {names}")
        return value

    @model_validator(mode="after")
    def _history(self) -> Settings:
        sqlite_history = (self.reports.enabled or self.bounces.enabled) and not self.reports.history_url
        if sqlite_history and sqlite3.sqlite_version_info < HISTORY_SQLITE:
            raise ValueError(
                f"the message history ([reports] or [bounces] on) needs SQLite {'.'.join(map(str, HISTORY_SQLITE))} or"
                f" newer, and this Python has {sqlite3.sqlite_version}: run a newer Python build (the container's),"
                " or set reports.history_url (PostgreSQL)"
            )
        return self

    @model_validator(mode="after")
    def _privacy(self) -> Settings:
        if self.privacy.redact and self.address_hash_key() is None:
            raise ValueError(
                "privacy.redact needs privacy.redact_key_file or spool.encryption_key_file: the key of the address"
                " hash (`relay keygen` prints one)"
            )
        if self.privacy.mode == "hipaa" and (found := self.hipaa_violations()):
            raise ValueError('privacy.mode = "hipaa" refuses to start: ' + "; ".join(found))
        return self

    def missing_secrets(self) -> list[str]:
        """The secrets `relay serve` refuses to start without, each named: the one list serve, a reload and
        check-config go by. They may come from the environment, so they are checked after loading."""
        return self.upstream.missing_credentials() + self.reports.missing_api_key()

    def address_hash_key(self) -> bytes | None:
        """The key of privacy.redact's hash: its own file, else derived from the current spool key."""
        if self.privacy.redact_key_file is not None:
            return read_key_file(self.privacy.redact_key_file)
        keys = self.spool.encryption_keys
        return derive(keys[0], "address hash") if keys else None

    def hipaa_violations(self) -> list[str]:
        """What privacy.mode = "hipaa" refuses in this config (check-config warns of it in any mode)."""
        verified = not self.upstream.insecure_skip_verify
        upstreams = [("upstream.host", self.upstream.host, verified)]
        upstreams += [(f"profiles[{p.name}].host", p.host or self.upstream.host, verified) for p in self.profiles]
        rules = [
            (f"policy.rules[{i}]", name, value)
            for i, r in enumerate(self.policy.rules)
            for name, value in r.headers.items()
        ]
        rules += [
            (f"profiles[{p.name}].rules[{i}]", name, value)
            for p in self.profiles
            for i, r in enumerate(p.rules)
            for name, value in r.headers.items()
        ]
        return violations(
            PrivacyFacts(
                spool_enabled=self.spool.enabled,
                spool_encrypted=bool(self.spool.encryption_keys),
                upstreams=upstreams,
                hipaa_upstream_host=self.privacy.hipaa_upstream_host,
                header_rules=rules,
                redact=self.privacy.redact,
                require_tls=self.listen.require_tls,
                listen_host=self.listen.host,
                http_enabled=self.http.enabled,
                http_host=self.http.host,
                history=self.reports.enabled or self.bounces.enabled,
            )
        )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls))


def _describe(error: Any) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "config"
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "missing":
        message = "missing"
    elif error["type"] == "extra_forbidden":
        message = "unknown setting (check the spelling against config.example.toml)"
    source = _env_variable(error["loc"])
    return f"{key}: {message}" + (f" (from {source})" if source else "")


def _env_variable(loc: tuple[Any, ...]) -> str | None:
    """The RELAY_<SECTION>__<KEY> (or RELAY_<SECTION>) variable that set the value at `loc`, if one did."""
    for depth in (2, 1):
        parts = loc[:depth]
        if len(parts) == depth and all(isinstance(part, str) for part in parts):
            wanted = ("RELAY_" + "__".join(parts)).upper()
            found = next((name for name in os.environ if name.upper() == wanted), None)
            if found:
                return found
    return None


def _env_problems() -> list[str]:
    """RELAY_<SECTION>__<KEY> variables pydantic-settings would ignore (an unknown section) or cannot
    parse (not JSON where a list or table is expected), each named with the key it was meant for."""
    sections = Settings.model_fields
    problems = []
    for name, value in sorted(os.environ.items()):
        section, _, key = name.upper().removeprefix("RELAY_").lower().partition("__")
        if not name.upper().startswith("RELAY_"):
            continue
        if not key:  # RELAY_PROFILES, RELAY_LISTEN: a whole list or table; others (RELAY_EVENT_LOOP) are not config
            if section in sections and (problem := _not_json(name, value, section)):
                problems.append(f"{section}: {problem}")
            continue
        model = sections[section].annotation if section in sections else None
        if model is None:
            problems.append(f"{name}: unknown section {section!r} (sections: {', '.join(sections)})")
            continue
        field = getattr(model, "model_fields", {}).get(key)
        if field is not None and get_origin(field.annotation) in (list, dict) and (problem := _not_json(name, value)):
            problems.append(f"{section}.{key}: {problem}")
    return problems


_JSON_EXAMPLES = {"profiles": """'[{"name": "hr", "sender_domain": "hr.example.com"}]'""", "": """'["10.0.0.0/8"]'"""}


def _not_json(name: str, value: str, field: str = "") -> str | None:
    """Why pydantic-settings cannot parse `value` (its own error names neither the variable nor JSON), or None."""
    try:
        json.loads(value)
    except ValueError as exc:
        example = _JSON_EXAMPLES.get(field, """'{"port": 2525}'""")
        return f"{name} is not valid JSON ({exc}); lists and tables in environment variables are JSON, e.g. {example}"
    return None


def load_settings(path: Path | None, **overrides: Any) -> Settings:
    """Load the TOML file (if any) under env overrides; raise ConfigError with one line per problem."""
    if path is not None and not path.is_file():
        raise ConfigError(f"--config: {path} does not exist or is not a file")

    class _FromFile(Settings):
        model_config = SettingsConfigDict(toml_file=path)

    if problems := _env_problems():
        raise ConfigError("; ".join(problems))
    try:
        loaded = _FromFile(**overrides)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None
    except SettingsError as exc:  # an environment variable pydantic-settings could not parse
        raise ConfigError(f"environment: {exc}") from None
    except (OSError, ValueError) as exc:  # TOML syntax errors arrive as ValueError
        raise ConfigError(f"{path}: {exc}") from None
    return loaded
