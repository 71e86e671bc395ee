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


def test_a_profile_shadowed_by_an_earlier_one_is_found() -> None:
    from relay.core.profiles import unreachable

    profiles = [
        ProfileMatch("erp", sender_domain="erp.example.com"),
        ProfileMatch("erp-lan", sender_domain="erp.example.com", client_network=ipaddress.ip_network("10.0.0.0/8")),
        ProfileMatch("hr", sender_domain="hr.example.com"),
    ]
    assert unreachable(profiles) == [("erp-lan", "erp")]
    assert unreachable(list(reversed(profiles))) == []  # the narrower one first: both reachable


def test_check_config_warns_about_exposure_and_unreachable_profiles() -> None:
    from relay.config import Settings
    from relay.ops.config_warnings import config_warnings

    settings = Settings(
        http={"host": "0.0.0.0"},
        policy={"rules": [{"headers": {"X-IB-Callback-Data": '{"id": "{message_id}"}'}}]},
        profiles=[
            {"name": "erp", "sender_domain": "erp.example.com", "username": "u", "password": "p"},
            {"name": "erp-2", "sender_domain": "erp.example.com", "user": "x", "username": "u", "password": "p"},
        ],
    )
    warnings = "\n".join(config_warnings(settings))
    assert "http.host = 0.0.0.0: /metrics, /upstream and /messages answer anyone" in warnings
    assert "policy.rules[0]: X-IB-Callback-Data carries {message_id} or {sender}" in warnings
    assert "profiles 'erp-2': no message can reach it: 'erp' comes first" in warnings
    quiet = "\n".join(config_warnings(Settings()))
    assert "http.host" not in quiet and "X-IB-Callback-Data" not in quiet and "no message can reach" not in quiet
