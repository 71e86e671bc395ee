"""relay.inbound.access: who may connect, which senders may send, how many recipients a message may have."""

from __future__ import annotations

import ipaddress

import pytest

from relay.config import IPNetwork, LimitsSettings, ListenSettings
from relay.core.replies import Reply
from relay.inbound.access import Refusal, check_client, check_recipient, check_sender, client_address
from relay.inbound.limits import RateLimits

LAN: list[IPNetwork] = [
    ipaddress.ip_network(n) for n in ("127.0.0.0/8", "::1/128", "10.0.0.0/8", "192.168.0.0/16", "2001:db8:1::/48")
]


def refused(shown: str) -> Refusal:
    return Refusal(
        "client_refused", Reply(554, "5.7.1", f"Client address {shown} is not allowed to relay through this server")
    )


# --- client_address -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("peer", "expected"),
    [
        (("10.1.2.3", 40000), ipaddress.IPv4Address("10.1.2.3")),
        (("::1", 40000, 0, 0), ipaddress.IPv6Address("::1")),
        (("::ffff:10.1.2.3", 40000, 0, 0), ipaddress.IPv4Address("10.1.2.3")),  # IPv4-mapped counts as IPv4
        (("2001:db8:1::5", 40000, 0, 0), ipaddress.IPv6Address("2001:db8:1::5")),
        (("not-an-ip", 1), None),
        ((), None),
        (None, None),
        ("10.1.2.3", None),
    ],
)
def test_client_address(peer: object, expected: object) -> None:
    assert client_address(peer) == expected


# --- check_client -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "peer",
    [
        ("127.0.0.1", 1),
        ("10.255.255.255", 1),
        ("192.168.7.9", 1),
        ("::1", 1, 0, 0),
        ("::ffff:10.1.2.3", 1, 0, 0),
        ("::ffff:127.0.0.1", 1, 0, 0),
        ("::ffff:7f00:1", 1, 0, 0),  # the same address, written in hex
        ("2001:db8:1:ffff::1", 1, 0, 0),
    ],
)
def test_allowed_clients(peer: tuple[object, ...]) -> None:
    assert check_client(peer, LAN) is None


@pytest.mark.parametrize(
    ("peer", "shown"),
    [
        (("203.0.113.7", 1), "203.0.113.7"),
        (("11.0.0.1", 1), "11.0.0.1"),
        (("172.16.0.1", 1), "172.16.0.1"),  # not in this list
        (("::ffff:203.0.113.7", 1, 0, 0), "203.0.113.7"),  # shown as the IPv4 address it is
        (("2001:db8:2::1", 1, 0, 0), "2001:db8:2::1"),
        (("::2", 1, 0, 0), "::2"),
        (("bogus", 1), "unknown"),
        (None, "unknown"),
    ],
)
def test_refused_clients_get_554_5_7_1(peer: object, shown: str) -> None:
    assert check_client(peer, LAN) == refused(shown)


def test_no_allowed_networks_refuses_everyone() -> None:
    assert check_client(("127.0.0.1", 1), []) == refused("127.0.0.1")


def test_an_ipv4_mapped_client_is_checked_against_ipv4_networks_only() -> None:
    # ::ffff:0:0/96 written as an IPv6 network does not let every IPv4 client in.
    assert check_client(("::ffff:203.0.113.7", 1, 0, 0), [ipaddress.ip_network("::ffff:0:0/96")]) == refused(
        "203.0.113.7"
    )


def test_default_networks_are_loopback_and_private_only() -> None:
    defaults = ListenSettings().allowed_networks
    assert check_client(("127.0.0.1", 1), defaults) is None
    assert check_client(("::1", 1, 0, 0), defaults) is None
    assert check_client(("172.31.0.1", 1), defaults) is None
    assert check_client(("8.8.8.8", 1), defaults) == refused("8.8.8.8")
    assert check_client(("2001:4860::1", 1, 0, 0), defaults) == refused("2001:4860::1")


# --- check_sender -------------------------------------------------------------------------------


def test_any_domain_when_the_list_is_empty() -> None:
    assert check_sender("app@example.com", []) is None


def test_allowed_sender_domain() -> None:
    assert check_sender("app@erp.example.com", ["example.com", "erp.example.com"]) is None
    assert check_sender("App@ERP.Example.COM", ["erp.example.com"]) is None  # domains compare lower-cased


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("app@example.net", "example.net"),
        ("app@sub.erp.example.com", "sub.erp.example.com"),  # exact domains, not subdomains
        ("app@EVIL.example.org", "evil.example.org"),
    ],
)
def test_other_sender_domains_get_550_5_7_1_naming_the_domain(address: str, domain: str) -> None:
    assert check_sender(address, ["erp.example.com"]) == Refusal(
        "sender", Reply(550, "5.7.1", f"Sender domain {domain} is not allowed to send through this relay")
    )


@pytest.mark.parametrize("address", ["", "no-at-sign", "a b@example.com", "a@example.com\r\nRCPT TO:<x@y>", "a@<b>"])
def test_malformed_sender_is_553(address: str) -> None:
    refusal = Refusal("sender", Reply(553, "5.1.7", "Sender address must look like user@example.com"))
    assert check_sender(address, []) == refusal
    assert check_sender(address, ["example.com"]) == refusal


# --- check_recipient ----------------------------------------------------------------------------


def test_recipients_within_the_limit() -> None:
    assert check_recipient("a@example.org", 0, 1000) is None
    assert check_recipient("a@example.org", 999, 1000) is None


@pytest.mark.parametrize(("so_far", "limit"), [(1000, 1000), (1001, 1000), (1, 1), (5, 3)])
def test_one_recipient_too_many_is_452_4_5_3(so_far: int, limit: int) -> None:
    assert check_recipient("a@example.org", so_far, limit) == Refusal(
        "too_many_recipients",
        Reply(452, "4.5.3", f"Too many recipients: at most {limit} per message; send the rest separately"),
    )


@pytest.mark.parametrize("address", ["a@-bad-.example", "a@example..com", "a@" + "d" * 300 + ".com"])
def test_a_sender_domain_past_rfc_5321s_limits_is_553(address: str) -> None:
    assert check_sender(address, []) == Refusal(
        "sender", Reply(553, "5.1.7", "Sender address must look like user@example.com")
    )


def test_a_sender_local_part_may_run_past_64_characters() -> None:  # VERP, SRS
    assert check_sender("bounces+" + "x" * 80 + "@erp.example.com", []) is None


def test_the_limit_comes_before_the_address_check() -> None:
    refusal = check_recipient("not an address", 3, 3)
    assert refusal is not None and refusal.reason == "too_many_recipients"


@pytest.mark.parametrize(
    "address",
    ["", "bob", "a b@example.org", "<a@example.org>", "a@example.org\nDATA", "b" * 300 + "@example.org", "u@-bad-.com"],
)
def test_malformed_recipient_is_553(address: str) -> None:
    assert check_recipient(address, 0, 1000) == Refusal(
        "recipient", Reply(553, "5.1.3", "Recipient address must look like user@example.com")
    )


# --- rate limits --------------------------------------------------------------------------------


def rate_limit(text: str) -> Refusal:
    return Refusal("rate_limit", Reply(451, "4.7.0", f"Rate limit: {text}; try again later"))


def test_client_messages_per_minute_is_a_burst_then_a_steady_rate() -> None:
    limits = RateLimits(LimitsSettings(client_messages_per_minute=2))
    assert limits.message("10.0.0.1", 0.0) is None
    assert limits.message("10.0.0.1", 0.0) is None
    assert limits.message("10.0.0.1", 0.0) == rate_limit("10.0.0.1 sent more than 2 messages a minute")
    assert limits.message("10.0.0.2", 0.0) is None  # per client
    assert limits.message("10.0.0.1", 30.0) is None  # one token back after half a minute


def test_messages_per_minute_counts_every_client() -> None:
    limits = RateLimits(LimitsSettings(messages_per_minute=1))
    assert limits.message("10.0.0.1", 0.0) is None
    assert limits.message("10.0.0.2", 0.0) == rate_limit("this relay takes at most 1 messages a minute")


def test_client_recipients_per_hour() -> None:
    limits = RateLimits(LimitsSettings(client_recipients_per_hour=1))
    assert limits.recipient("10.0.0.1", 0.0) is None
    assert limits.recipient("10.0.0.1", 1.0) == rate_limit("10.0.0.1 sent to more than 1 recipients an hour")


def test_zero_is_unlimited() -> None:
    limits = RateLimits(LimitsSettings())
    assert all(
        limits.message("10.0.0.1", 0.0) is None and limits.recipient("10.0.0.1", 0.0) is None for _ in range(500)
    )
