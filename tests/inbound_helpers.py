"""Inbound STARTTLS (and AUTH) for the hardening tests: a throwaway CA, the relay's certificate, listen settings."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
from pathlib import Path
from typing import Any

import trustme

CLIENT_PASSWORD = "client-pass-4711"


def inbound_tls(tmp_path: Path, users: list[dict[str, Any]] | None = None) -> tuple[dict[str, Any], ssl.SSLContext]:
    """listen settings for STARTTLS with a trustme certificate (and `users` for AUTH), and a client context."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cert_file, key_file = tmp_path / "relay.crt", tmp_path / "relay.key"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    cert.private_key_pem.write_to_path(str(key_file))
    listen: dict[str, Any] = {"tls_cert_file": str(cert_file), "tls_key_file": str(key_file)}
    if users:
        listen["users"] = users
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return listen, context


def plain(user: str, password: str) -> str:
    """An AUTH PLAIN initial response."""
    return base64.b64encode(f"\0{user}\0{password}".encode()).decode()


async def closed_after(reader: asyncio.StreamReader) -> bytes:
    """What the relay still sends before it closes (a reset counts as closed: it may close with our bytes
    unread); fails if it stays open for 5 s."""
    received = bytearray()
    with contextlib.suppress(ConnectionResetError):
        while chunk := await asyncio.wait_for(reader.read(65536), 5):
            received += chunk
    return bytes(received)
