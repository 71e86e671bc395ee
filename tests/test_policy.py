"""relay.core.policy: which rules match a message, and the headers they add, with placeholders expanded."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.config import PolicyRule
from relay.core.headers import fold_header, parse_header_fields
from relay.core.policy import PLACEHOLDERS, HeaderAction, MessageFacts, expand, header_actions, rule_matches

DESIGN_CALLBACK = '{"app":"erp","queue_id":"{queue_id}"}'  # the example value in DESIGN.md


def facts(**changes: Any) -> MessageFacts:
    values: dict[str, Any] = {
        "queue_id": "0190abcdef01234567890",
        "message_id": "<inv-42@erp.example.com>",
        "sender": "billing@erp.example.com",
        "client_ip": "10.1.2.3",
        "recipients": ("customer@example.org", "audit@corp.example.net"),
    }
    values.update(changes)
    return MessageFacts(**values)


def rule(**values: Any) -> PolicyRule:
    values.setdefault("headers", {"X-Rule": "1"})
    return PolicyRule(**values)


# --- matching -----------------------------------------------------------------------------------


def test_rule_without_keys_matches_every_message() -> None:
    assert rule_matches(rule(), facts())
    assert rule_matches(rule(), facts(sender="", client_ip="unknown", recipients=()))


@pytest.mark.parametrize(
    ("key", "value", "matching", "other"),
    [
        ("sender_domain", "erp.example.com", {"sender": "x@erp.example.com"}, {"sender": "x@example.com"}),
        ("sender_domain", "ERP.Example.com", {"sender": "x@Erp.EXAMPLE.com"}, {"sender": "x@erp.example.com.evil"}),
        (
            "sender",
            "billing@erp.example.com",
            {"sender": "billing@erp.example.com"},
            {"sender": "sales@erp.example.com"},
        ),
        ("sender", "Billing@ERP.example.com", {"sender": "BILLING@erp.example.com"}, {"sender": "billing@example.com"}),
        ("recipient_domain", "example.org", {"recipients": ("a@x.net", "b@EXAMPLE.org")}, {"recipients": ("a@x.net",)}),
        ("recipient_domain", "example.org", {"recipients": ("a@example.org",)}, {"recipients": ("a@sub.example.org",)}),
        ("client_network", "10.0.0.0/8", {"client_ip": "10.200.0.1"}, {"client_ip": "192.168.0.1"}),
        ("client_network", "192.168.1.0/24", {"client_ip": "192.168.1.255"}, {"client_ip": "192.168.2.0"}),
        ("client_network", "2001:db8::/32", {"client_ip": "2001:db8::5"}, {"client_ip": "2001:db9::5"}),
        ("client_network", "2001:db8::/32", {"client_ip": "2001:db8::5"}, {"client_ip": "10.0.0.1"}),
        ("client_network", "10.0.0.0/8", {"client_ip": "10.0.0.1"}, {"client_ip": "unknown"}),
        ("client_network", "10.0.0.0/8", {"client_ip": "10.0.0.1"}, {"client_ip": ""}),
    ],
)
def test_each_match_key(key: str, value: str, matching: dict[str, Any], other: dict[str, Any]) -> None:
    r = rule(**{key: value})
    assert rule_matches(r, facts(**matching)) is True
    assert rule_matches(r, facts(**other)) is False


def test_all_keys_of_a_rule_must_match() -> None:
    r = rule(
        sender_domain="erp.example.com",
        sender="billing@erp.example.com",
        client_network="10.0.0.0/8",
        recipient_domain="example.org",
    )
    assert rule_matches(r, facts()) is True
    assert rule_matches(r, facts(sender="other@erp.example.com")) is False
    assert rule_matches(r, facts(client_ip="172.16.0.1")) is False
    assert rule_matches(r, facts(recipients=("a@example.net",))) is False
    assert rule_matches(r, facts(sender="billing@example.com")) is False


def test_sender_without_domain_does_not_match_a_domain_rule() -> None:
    assert rule_matches(rule(sender_domain="example.com"), facts(sender="example.com")) is False


# --- expansion ----------------------------------------------------------------------------------


def test_every_placeholder_expands() -> None:
    template = "{queue_id}|{message_id}|{sender}|{sender_domain}|{client_ip}"
    assert expand(template, facts()) == (
        "0190abcdef01234567890|<inv-42@erp.example.com>|billing@erp.example.com|erp.example.com|10.1.2.3"
    )
    assert set(PLACEHOLDERS) == {"queue_id", "message_id", "sender", "sender_domain", "client_ip"}


def test_design_example_keeps_literal_json_braces() -> None:
    assert expand(DESIGN_CALLBACK, facts()) == '{"app":"erp","queue_id":"0190abcdef01234567890"}'


@pytest.mark.parametrize(
    "template",
    ["{}", "{unknown}", "{{queue_id}}x", '[{"id": 1, "desc": "Callback Data"}]', "{ queue_id }", "{QUEUE_ID}"],
)
def test_unknown_or_literal_braces_stay_as_written(template: str) -> None:
    expected = template.replace("{queue_id}", "0190abcdef01234567890")
    assert expand(template, facts()) == expected


def test_expansion_is_a_single_pass() -> None:
    # A client-controlled value that looks like a placeholder is not expanded again.
    tricky = facts(sender="{queue_id}@example.com", message_id="<{client_ip}@x>")
    assert expand("{sender} {message_id}", tricky) == "{queue_id}@example.com <{client_ip}@x>"


@pytest.mark.parametrize("evil", ["\r\nBcc: victim@example.org", "\nX-Evil: 1", "\rX-Evil: 1", "a\x00b\x0bc\x7f"])
def test_client_values_never_carry_line_breaks_or_controls(evil: str) -> None:
    dirty = facts(message_id=f"<id{evil}@x>", sender=f"a{evil}@example.com", client_ip=f"10.0.0.1{evil}")
    value = expand("{message_id};{sender};{sender_domain};{client_ip};{queue_id}", dirty)
    assert not any(ch in value for ch in "\r\n\x00\x0b\x7f")
    folded = fold_header("X-IB-Callback-Data", value)
    assert len(parse_header_fields(folded + b"\r\n")) == 1
    assert all(line[:1] in (b" ", b"\t") for line in folded[:-2].split(b"\r\n")[1:])


@settings(max_examples=200, deadline=None)
@given(
    message_id=st.text(max_size=120),
    sender=st.text(max_size=120),
    client_ip=st.text(max_size=40),
)
def test_expanded_client_values_always_make_exactly_one_header_field(
    message_id: str, sender: str, client_ip: str
) -> None:
    value = expand(
        DESIGN_CALLBACK + " {message_id} {sender} {sender_domain} {client_ip}",
        facts(message_id=message_id, sender=sender, client_ip=client_ip),
    )
    folded = fold_header("X-IB-Callback-Data", value)
    lines = folded[:-2].split(b"\r\n")
    assert [line for line in lines if line[:1] not in (b" ", b"\t")] == [lines[0]]
    assert b"\r" not in b"".join(lines) and b"\n" not in b"".join(lines)


# --- header_actions -----------------------------------------------------------------------------


def test_every_matching_rule_applies_in_order() -> None:
    rules = [
        rule(headers={"X-IB-Tracking-Url": "https://hooks.example.com/all"}),
        rule(sender_domain="example.com", headers={"X-Not-Me": "no"}),
        rule(sender_domain="erp.example.com", headers={"X-IB-Callback-Data": DESIGN_CALLBACK}),
        rule(client_network="10.0.0.0/8", headers={"X-IB-Notify-Url": "https://n.example.com/{client_ip}"}),
    ]
    assert header_actions(rules, facts()) == [
        HeaderAction("X-IB-Tracking-Url", "https://hooks.example.com/all", False),
        HeaderAction("X-IB-Callback-Data", '{"app":"erp","queue_id":"0190abcdef01234567890"}', False),
        HeaderAction("X-IB-Notify-Url", "https://n.example.com/10.1.2.3", False),
    ]


def test_a_later_rule_wins_for_the_same_header_name_in_first_seen_position() -> None:
    rules = [
        rule(headers={"X-IB-Tracking-Url": "https://first.example.com", "X-IB-Bulk-Id": "a"}),
        rule(headers={"x-ib-tracking-url": "https://second.example.com"}, replace_existing=True),
    ]
    assert header_actions(rules, facts()) == [
        HeaderAction("x-ib-tracking-url", "https://second.example.com", True),
        HeaderAction("X-IB-Bulk-Id", "a", False),
    ]


def test_no_matching_rule_no_headers() -> None:
    assert header_actions([rule(sender_domain="example.net")], facts()) == []
    assert header_actions([], facts()) == []


def test_replace_existing_is_carried_per_rule() -> None:
    rules = [rule(headers={"A": "1"}, replace_existing=True), rule(headers={"B": "2"})]
    assert [(a.name, a.replace_existing) for a in header_actions(rules, facts())] == [("A", True), ("B", False)]
