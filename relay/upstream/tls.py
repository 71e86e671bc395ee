"""TLS towards Infobip: certificates and host names are always verified unless the operator says otherwise."""

from __future__ import annotations

import ssl

import structlog

from relay.config import UpstreamSettings

log = structlog.get_logger("relay.upstream.tls")


def make_tls_context(settings: UpstreamSettings) -> ssl.SSLContext:
    """System trust store plus `ca_file`. Only the explicit `insecure_skip_verify` turns checks off."""
    context = ssl.create_default_context()
    if settings.ca_file is not None:
        context.load_verify_locations(cafile=str(settings.ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        log.warning(
            "upstream_tls_verification_disabled",
            warning="upstream.insecure_skip_verify = true: ANY certificate is accepted and the Infobip credentials "
            "can be stolen by whoever intercepts the connection. Never use this in production.",
        )
    return context


def describe_tls_failure(exc: ssl.SSLError) -> str:
    """A handshake failure in words an operator can act on (an untrusted certificate says why)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    return str(exc.reason or exc)


def describe_certificate(cert: object) -> str:
    """Subject, names and expiry of the server's certificate, for `relay doctor`."""
    if not isinstance(cert, dict):
        return "TLS established"
    subject = ", ".join(f"{k}={v}" for rdn in cert.get("subject", ()) for k, v in rdn)
    names = ", ".join(v for _, v in cert.get("subjectAltName", ()))
    return f"certificate {subject or '(no subject)'}; names {names or '-'}; expires {cert.get('notAfter', '?')}"
