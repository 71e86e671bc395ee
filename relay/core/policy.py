"""Policy rules: which `X-IB-*` (or other) headers a message gets, decided from plain data.

Every matching rule applies, in order; a later rule's header wins over an earlier one's of the same
name. Values may use the placeholders below; anything built from client input is cleaned so it can
never start a new header line.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from relay.config import PolicyRule
from relay.core.alignment import domain_of
from relay.core.headers import clean_value

PLACEHOLDERS = ("queue_id", "message_id", "sender", "sender_domain", "client_ip")
_PLACEHOLDER_RE = re.compile(r"\{(" + "|".join(PLACEHOLDERS) + r")\}")


@dataclass(frozen=True, slots=True)
class MessageFacts:
    """What rules can match on and placeholders can expand to."""

    queue_id: str
    message_id: str
    sender: str
    client_ip: str
    recipients: Sequence[str]

    @property
    def sender_domain(self) -> str:
        return domain_of(self.sender)


@dataclass(frozen=True, slots=True)
class HeaderAction:
    name: str
    value: str
    replace_existing: bool


def rule_matches(rule: PolicyRule, facts: MessageFacts) -> bool:
    if rule.sender_domain is not None and facts.sender_domain != rule.sender_domain:
        return False
    if rule.sender is not None and facts.sender.lower() != rule.sender:
        return False
    if rule.recipient_domain is not None and not any(domain_of(r) == rule.recipient_domain for r in facts.recipients):
        return False
    if rule.client_network is not None:
        try:
            if ipaddress.ip_address(facts.client_ip) not in rule.client_network:
                return False
        except ValueError:
            return False
    return True


def expand(template: str, facts: MessageFacts) -> str:
    """Replace known placeholders only, so literal JSON braces in a value stay as written.

    Expanded values are JSON-string escaped (a `"` in a Message-ID becomes `\\"`), because the usual
    home of a placeholder is the JSON in X-IB-Callback-Data; plain addresses and ids are unchanged.
    """
    values: Mapping[str, str] = {
        "queue_id": facts.queue_id,
        "message_id": facts.message_id,
        "sender": facts.sender,
        "sender_domain": facts.sender_domain,
        "client_ip": facts.client_ip,
    }
    return _PLACEHOLDER_RE.sub(lambda m: json.dumps(clean_value(values[m.group(1)]))[1:-1], template)


def header_actions(rules: Sequence[PolicyRule], facts: MessageFacts) -> list[HeaderAction]:
    """The headers to add, one per name (case-insensitive), in first-seen order."""
    chosen: dict[str, HeaderAction] = {}
    for rule in rules:
        if not rule_matches(rule, facts):
            continue
        for name, template in rule.headers.items():
            action = HeaderAction(name, expand(template, facts), rule.replace_existing)
            chosen[name.lower()] = action
    return list(chosen.values())
