"""`relay healthcheck`: ask this relay's own /healthz at the address its config gives (the container's
HEALTHCHECK), instead of a port hard-wired in the image that a config or RELAY_HTTP__PORT can move."""

from __future__ import annotations

import ipaddress
import json
import urllib.error
import urllib.request

from relay.config import Settings


def health_url(settings: Settings) -> str:
    """A wildcard bind is asked on loopback; a specific address on itself."""
    host = settings.http.host or "0.0.0.0"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:  # a host name
        return f"http://{host}:{settings.http.port}/healthz"
    if address.is_unspecified:
        address = ipaddress.ip_address("::1" if address.version == 6 else "127.0.0.1")
    shown = f"[{address}]" if address.version == 6 else str(address)
    return f"http://{shown}:{settings.http.port}/healthz"


def healthcheck(settings: Settings, timeout: float = 4.0) -> tuple[int, str]:
    """(exit status, one line): 0 when /healthz answers 200, 1 otherwise."""
    if not settings.http.enabled:
        return 1, "http.enabled = false: there is no /healthz to ask (turn the container's HEALTHCHECK off)"
    if settings.http.port == 0:
        return 1, "http.port = 0: the port is chosen at start-up, so there is no fixed /healthz to ask"
    url = health_url(settings)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # http only, our own URL
            body = json.loads(response.read() or b"{}")
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return 1, f"{url}: {reason}"
    return 0, f"{url}: {body.get('status', 'ok')}"
