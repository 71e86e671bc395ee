"""Why delivery got no verdict from Infobip, one class per failure, in the spirit of aiosmtplib's errors.

A refusal (5xx or 4xx to MAIL, RCPT or the end of data) is a verdict and comes back as a DeliveryResult;
these exceptions mean there was no verdict. Callers catch `UpstreamError` and tell their client `reply`;
`relay doctor` reads the class to name the step that failed.

    UpstreamError
    ├── UpstreamUnreachable          4.4.1: no session, nothing of a message was sent
    │   ├── UpstreamConnectError     DNS or TCP (or its timeout)
    │   ├── UpstreamGreetingError    the greeting or EHLO was wrong or never came
    │   ├── UpstreamTLSError         no STARTTLS, or the TLS handshake or certificate failed
    │   └── UpstreamAuthError        no AUTH mechanism we use, or the credentials were refused
    └── UpstreamLost                 4.4.2: the session broke during a transaction (`data_sent` says how far)
        ├── UpstreamDisconnected     closed, reset, or a 421 (also a ConnectionError)
        ├── UpstreamTimeout          a reply or a write took too long (also a TimeoutError)
        └── UpstreamProtocolError    a reply we cannot pair with a command, or not SMTP at all
"""

from __future__ import annotations

from relay.core.replies import Reply, upstream_lost, upstream_unreachable
from relay.core.smtp_client import ServerReply


class UpstreamError(Exception):
    """Delivery did not get a verdict from Infobip; `reply` is what our client is told (always 4xx).

    `code` and `text` are the server's reply when it gave one (`code` is None when it said nothing and
    `text` is then our own words); `why` is the phrase our client sees inside `reply`.
    """

    def __init__(self, reply: Reply, why: str, server: ServerReply | None = None, *, data_sent: bool = False) -> None:
        super().__init__(str(reply))
        self.reply = reply
        self.why = why
        self.code: int | None = server.code if server is not None else None
        self.text = server.text if server is not None else why
        self.data_sent = data_sent  # the body's final dot went out: Infobip may have the message


class UpstreamUnreachable(UpstreamError):
    """No authenticated session: nothing of a message was sent, so trying again is always safe."""

    def __init__(self, host: str, port: int, why: str, server: ServerReply | None = None) -> None:
        super().__init__(upstream_unreachable(host, port, why), why, server)
        self.host = host
        self.port = port


class UpstreamConnectError(UpstreamUnreachable):
    """DNS, TCP connect or its timeout failed: Infobip never answered."""


class UpstreamGreetingError(UpstreamUnreachable):
    """The server answered the connection, but its greeting or EHLO reply was not SMTP as we need it."""


class UpstreamTLSError(UpstreamUnreachable):
    """STARTTLS missing or refused, or the TLS handshake or certificate check failed: no credentials sent."""


class UpstreamAuthError(UpstreamUnreachable):
    """Infobip refused our credentials, or offers no AUTH mechanism we speak."""


class UpstreamLost(UpstreamError):
    """The session broke during a transaction; `data_sent` tells whether Infobip may have the message."""

    def __init__(self, why: str, server: ServerReply | None = None, *, data_sent: bool = False) -> None:
        super().__init__(upstream_lost(why), why, server, data_sent=data_sent)


class UpstreamDisconnected(UpstreamLost, ConnectionError):
    """Infobip closed or reset the connection, or announced it would (421)."""


class UpstreamTimeout(UpstreamLost, TimeoutError):
    """Infobip did not answer (or take our bytes) within the configured timeout."""


class UpstreamProtocolError(UpstreamLost):
    """A reply out of step with our commands, or bytes that are not an SMTP reply: the session is unusable."""
