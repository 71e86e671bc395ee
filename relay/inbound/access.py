"""Who may send, from where, and how much: the checks made before a message's bytes arrive.

Each check says no with a `Refusal`: the reply the client gets and the reason counted in
relay_messages_rejected_total, decided together so nobody has to recover one from the other.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from relay.config import IPNetwork
from relay.core.alignment import domain_of
from relay.core.prepare import is_safe_address, within_smtp_limits
from relay.core.replies import (
    RECIPIENT_MALFORMED,
    SENDER_MALFORMED,
    Reply,
    client_not_allowed,
    proxy_not_trusted,
    sender_domain_not_allowed,
    too_many_recipients,
)


@dataclass(frozen=True, slots=True)
class Refusal:
    """A check's no: the metric reason (the `reason` label of relay_messages_rejected_total) and the reply."""

    reason: str
    reply: Reply


def client_address(peer: object) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The client's IP from a socket peername; IPv4-mapped IPv6 addresses count as IPv4."""
    if not isinstance(peer, tuple) or not peer:
        return None
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def check_client(peer: object, allowed: Sequence[IPNetwork]) -> Refusal | None:
    address = client_address(peer)
    if address is None or not any(address in network for network in allowed):
        shown = str(address) if address is not None else "unknown"
        return Refusal("client_refused", client_not_allowed(shown))
    return None


def check_proxy(peer: object, trusted: Sequence[IPNetwork]) -> Refusal | None:
    """Behind a balancer: only a trusted proxy may say, in its PROXY header, who the client is."""
    address = client_address(peer)
    if address is None or not any(address in network for network in trusted):
        return Refusal("untrusted_proxy", proxy_not_trusted(str(address) if address is not None else "unknown"))
    return None


def check_sender(address: str, allowed_domains: Sequence[str]) -> Refusal | None:
    if not (is_safe_address(address) and within_smtp_limits(address, local_part=False)):
        return Refusal("sender", SENDER_MALFORMED)
    domain = domain_of(address)
    if allowed_domains and domain not in allowed_domains:
        return Refusal("sender", sender_domain_not_allowed(domain))
    return None


def check_recipient(address: str, accepted_so_far: int, max_recipients: int) -> Refusal | None:
    if accepted_so_far >= max_recipients:
        return Refusal("too_many_recipients", too_many_recipients(max_recipients))
    if not (is_safe_address(address) and within_smtp_limits(address)):
        return Refusal("recipient", RECIPIENT_MALFORMED)
    return None
