"""Infobip's relaxed alignment: envelope sender and header From must share an organizational domain.

The organizational domain is the registrable domain by the Public Suffix List (bundled with the
`publicsuffixlist` package, so nothing is fetched at run time): mail.erp.example.co.uk -> example.co.uk.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Literal

from publicsuffixlist import PublicSuffixList

AlignmentMode = Literal["reject", "rewrite", "off"]


@cache
def _psl() -> PublicSuffixList:
    return PublicSuffixList()


def domain_of(address: str) -> str:
    """The domain of an address, lower-cased, without a trailing dot ('' when there is none)."""
    _, at, domain = address.rpartition("@")
    return domain.strip().rstrip(".").lower() if at else ""


@lru_cache(maxsize=4096)  # a LAN's apps use a handful of domains; this runs twice per message
def organizational_domain(domain: str) -> str:
    """example.co.uk for a.b.example.co.uk; the domain itself when it is a public suffix or unknown."""
    domain = domain.rstrip(".").lower()
    if _is_address_literal(domain):
        return domain  # the PSL knows no IPs: "[10.0.3.4]" must not shrink to "3.4]" and match "[192.0.3.4]"
    try:
        ascii_domain = domain.encode("idna").decode("ascii")
    except UnicodeError:
        ascii_domain = domain
    return _psl().privatesuffix(ascii_domain) or ascii_domain


def _is_address_literal(domain: str) -> bool:
    if domain.startswith("["):
        return True
    try:
        ipaddress.ip_address(domain)
    except ValueError:
        return False
    return True


def aligned(envelope_domain: str, header_domain: str) -> bool:
    if not envelope_domain or not header_domain:
        return False
    return organizational_domain(envelope_domain) == organizational_domain(header_domain)


@dataclass(frozen=True, slots=True)
class AlignmentVerdict:
    mail_from: str  # the envelope sender to use upstream (rewritten in "rewrite" mode)
    misaligned: bool  # True only in "reject" mode when the domains differ


def check_alignment(mode: AlignmentMode, mail_from: str, header_from: str) -> AlignmentVerdict:
    if mode == "off" or aligned(domain_of(mail_from), domain_of(header_from)):
        return AlignmentVerdict(mail_from=mail_from, misaligned=False)
    if mode == "rewrite":
        return AlignmentVerdict(mail_from=header_from, misaligned=False)
    return AlignmentVerdict(mail_from=mail_from, misaligned=True)
