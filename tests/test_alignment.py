"""relay.core.alignment: Infobip's relaxed alignment by organizational domain (Public Suffix List)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.alignment import AlignmentVerdict, aligned, check_alignment, domain_of, organizational_domain


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("billing@erp.example.com", "erp.example.com"),
        ("Billing@ERP.Example.COM", "erp.example.com"),
        ("a@example.com.", "example.com"),
        ("odd@local@example.org", "example.org"),  # the last @ separates the domain
        ("no-domain", ""),
        ("", ""),
        ("a@", ""),
    ],
)
def test_domain_of(address: str, expected: str) -> None:
    assert domain_of(address) == expected


@pytest.mark.parametrize(
    ("domain", "expected"),
    [
        ("example.com", "example.com"),
        ("mail.erp.example.com", "example.com"),
        ("example.co.uk", "example.co.uk"),
        ("mail.erp.example.co.uk", "example.co.uk"),
        ("a.b.c.example.com.au", "example.com.au"),
        # Private-section suffixes: each github.io user is its own organization.
        ("alice.github.io", "alice.github.io"),
        ("www.alice.github.io", "alice.github.io"),
        ("bob.herokuapp.com", "bob.herokuapp.com"),
        # Case and the trailing dot of an absolute name do not matter.
        ("MAIL.Example.CO.UK", "example.co.uk"),
        ("mail.example.com.", "example.com"),
        ("MAIL.EXAMPLE.COM.", "example.com"),
        # IDN: compared in their ASCII (punycode) form, whichever form the address used.
        ("mail.b\u00fccher.de", "xn--bcher-kva.de"),
        ("MAIL.B\u00dcCHER.DE", "xn--bcher-kva.de"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("shop.\u4f8b\u3048.jp", "xn--r8jz45g.jp"),
        # A public suffix or an unknown name is its own organizational domain.
        ("co.uk", "co.uk"),
        ("github.io", "github.io"),
        ("com", "com"),
        ("localhost", "localhost"),
        ("", ""),
    ],
)
def test_organizational_domain(domain: str, expected: str) -> None:
    assert organizational_domain(domain) == expected


@pytest.mark.parametrize("literal", ["[192.0.2.4]", "192.0.2.4", "[IPv6:2001:db8::1]", "10.0.3.4"])
def test_organizational_domain_of_an_address_literal_is_the_literal(literal: str) -> None:
    # The PSL knows nothing of IP addresses: "[10.0.3.4]" must not shrink to "3.4]" and so match "[192.168.3.4]".
    assert organizational_domain(literal) == literal.lower()


def test_address_literals_in_the_same_last_octets_are_not_aligned() -> None:
    assert not aligned("[10.0.3.4]", "[192.168.3.4]")
    assert not aligned("10.0.3.4", "192.168.3.4")
    assert aligned("[192.0.2.4]", "[192.0.2.4]")


@pytest.mark.parametrize(
    ("envelope", "header", "expected"),
    [
        ("erp.example.com", "example.com", True),
        ("bounces.example.com", "news.example.com", True),
        ("example.com", "example.org", False),
        ("example.co.uk", "other.co.uk", False),  # co.uk is a public suffix, not an organization
        ("mail.example.co.uk", "example.co.uk", True),
        ("alice.github.io", "bob.github.io", False),
        ("www.alice.github.io", "alice.github.io", True),
        ("EXAMPLE.com.", "mail.example.COM", True),
        ("b\u00fccher.de", "mail.xn--bcher-kva.de", True),
        ("", "example.com", False),
        ("example.com", "", False),
        ("", "", False),
    ],
)
def test_aligned(envelope: str, header: str, expected: bool) -> None:
    assert aligned(envelope, header) is expected
    assert aligned(header, envelope) is expected


# --- check_alignment in each mode ----------------------------------------------------------------


def test_reject_mode_aligned() -> None:
    assert check_alignment("reject", "bounce@mail.example.com", "app@example.com") == AlignmentVerdict(
        mail_from="bounce@mail.example.com", misaligned=False
    )


def test_reject_mode_misaligned() -> None:
    assert check_alignment("reject", "app@example.org", "app@example.com") == AlignmentVerdict(
        mail_from="app@example.org", misaligned=True
    )


def test_rewrite_mode_misaligned_uses_the_header_from_address() -> None:
    assert check_alignment("rewrite", "app@example.org", "app@example.com") == AlignmentVerdict(
        mail_from="app@example.com", misaligned=False
    )


def test_rewrite_mode_keeps_an_aligned_envelope_sender() -> None:
    assert check_alignment("rewrite", "bounce@mail.example.com", "app@example.com") == AlignmentVerdict(
        mail_from="bounce@mail.example.com", misaligned=False
    )


def test_off_mode_never_checks() -> None:
    assert check_alignment("off", "app@example.org", "app@example.com") == AlignmentVerdict(
        mail_from="app@example.org", misaligned=False
    )


def test_envelope_without_domain_is_misaligned() -> None:
    assert check_alignment("reject", "postmaster", "app@example.com").misaligned is True
    assert check_alignment("rewrite", "", "app@example.com") == AlignmentVerdict("app@example.com", False)


@settings(max_examples=150, deadline=None)
@given(
    sub=st.from_regex(r"[a-z0-9]{1,10}(\.[a-z0-9]{1,10}){0,3}", fullmatch=True),
    org=st.sampled_from(["example.com", "example.co.uk", "alice.github.io", "xn--bcher-kva.de"]),
)
def test_any_subdomain_aligns_with_its_organization(sub: str, org: str) -> None:
    assert organizational_domain(f"{sub}.{org}") == org
    assert aligned(f"{sub}.{org}", org)
    assert check_alignment("reject", f"x@{sub}.{org}", f"y@{org}").misaligned is False


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=60), st.text(max_size=60))
def test_arbitrary_text_never_raises(envelope: str, header: str) -> None:
    for mode in ("reject", "rewrite", "off"):
        verdict = check_alignment(mode, envelope, header)
        assert verdict.mail_from in (envelope, header)
