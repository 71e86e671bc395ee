"""Who may send, from where, and how much: the checks made before a message's bytes arrive."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from relay.config import IPNetwork
from relay.core.alignment import domain_of
from relay.core.prepare import is_safe_address
from relay.core.replies import Reply


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


def check_client(peer: object, allowed: Sequence[IPNetwork]) -> Reply | None:
    address = client_address(peer)
    if address is None or not any(address in network for network in allowed):
        shown = address if address is not None else "unknown"
        return Reply(554, "5.7.1", f"Client address {shown} is not allowed to relay through this server")
    return None


def check_sender(address: str, allowed_domains: Sequence[str]) -> Reply | None:
    if not is_safe_address(address):
        return Reply(553, "5.1.7", "Sender address must look like user@example.com")
    domain = domain_of(address)
    if allowed_domains and domain not in allowed_domains:
        return Reply(550, "5.7.1", f"Sender domain {domain} is not allowed to send through this relay")
    return None


def check_recipient(address: str, accepted_so_far: int, max_recipients: int) -> Reply | None:
    if accepted_so_far >= max_recipients:
        return Reply(
            452, "4.5.3", f"Too many recipients: at most {max_recipients} per message; send the rest separately"
        )
    if not is_safe_address(address):
        return Reply(553, "5.1.3", "Recipient address must look like user@example.com")
    return None
