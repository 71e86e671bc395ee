"""Profile selection, as plain values: first match wins, every key of a profile must fit."""

from __future__ import annotations

import ipaddress

from relay.core.profiles import DEFAULT, ProfileMatch, select_profile

PROFILES = [
    ProfileMatch("hr", sender_domain="hr.example.com"),
    ProfileMatch("erp-lan", sender_domain="erp.example.com", client_network=ipaddress.ip_network("10.1.0.0/16")),
    ProfileMatch("erp", sender_domain="erp.example.com"),
    ProfileMatch("ceo", sender="Boss@Example.com"),
    ProfileMatch("crm", user="crm"),
]


def pick(sender: str, client_ip: str = "192.0.2.1", user: str | None = None) -> str:
    return select_profile(PROFILES, sender=sender, client_ip=client_ip, user=user)


def test_first_match_wins_and_every_key_must_fit() -> None:
    assert pick("payroll@HR.example.com") == "hr"
    assert pick("billing@erp.example.com", "10.1.2.3") == "erp-lan"
    assert pick("billing@erp.example.com", "10.2.0.1") == "erp"
    assert pick("boss@example.com") == "ceo"
    assert pick("app@other.example", user="crm") == "crm"


def test_nothing_fits_means_the_default_profile() -> None:
    assert pick("app@other.example") == DEFAULT
    assert pick("app@sub.hr.example.com") == DEFAULT  # a domain, not its subdomains
    assert select_profile([], sender="a@b.example", client_ip="x", user=None) == DEFAULT
    assert pick("billing@erp.example.com", "not an address") == "erp"  # erp-lan's network cannot fit
