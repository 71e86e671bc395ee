"""Which profile a message goes out with: the first whose match keys all fit wins, else the default.

A profile is one Infobip account (or region, or API key) with its own connections, breaker and limits:
billing, HR and marketing each with their own credentials, so one's wrong password stops only its mail.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT = "default"


@dataclass(frozen=True, slots=True)
class ProfileMatch:
    name: str
    sender_domain: str | None = None  # the envelope sender's domain, exactly (case-insensitive)
    sender: str | None = None  # the whole envelope sender address (case-insensitive)
    client_network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None
    user: str | None = None  # the inbound AUTH user

    def fits(self, sender: str, client_ip: str, user: str | None) -> bool:
        domain = sender.rpartition("@")[2].lower()
        if self.sender_domain is not None and domain != self.sender_domain.lower():
            return False
        if self.sender is not None and sender.lower() != self.sender.lower():
            return False
        if self.user is not None and user != self.user:
            return False
        if self.client_network is not None:
            try:
                return ipaddress.ip_address(client_ip) in self.client_network
            except ValueError:
                return False
        return True


def select_profile(profiles: Sequence[ProfileMatch], *, sender: str, client_ip: str, user: str | None) -> str:
    for profile in profiles:
        if profile.fits(sender, client_ip, user):
            return profile.name
    return DEFAULT


def unreachable(profiles: Sequence[ProfileMatch]) -> list[tuple[str, str]]:
    """(profile, earlier profile) pairs where the earlier one matches everything the later one would:
    first match wins, so the later one never gets a message."""
    found = []
    for index, later in enumerate(profiles):
        for earlier in profiles[:index]:
            if all(
                getattr(earlier, key) is None or getattr(earlier, key) == getattr(later, key)
                for key in ("sender_domain", "sender", "client_network", "user")
            ):
                found.append((later.name, earlier.name))
                break
    return found
