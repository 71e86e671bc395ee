"""The stand-in's delivery reports endpoint: `GET /email/1/reports` over HTTPS, as seed 004 describes.

Every message the stand-in accepts gets one report per recipient: DELIVERED, except for any address at
`bounce.example` (UNDELIVERABLE, a permanent error). A report is handed out once, then it is gone, and
a request without `bulkId` or `messageId` gets everyone's reports, as Infobip's does: which is why the
relay never sends one (tests assert on `requests`). Reports belong to the account the message was sent
with: `api_key` opens the main account's, `account_keys` the other accounts' (the stand-in's extra SMTP
users, as for per-app profiles). `push()` POSTs the waiting reports to the message's X-IB-Notify-Url
instead, as Infobip does when that header is set, and `track()` POSTs a tracking notification (seed 000,
"Tracking notifications") to its X-IB-Tracking-Url. Error names are our guess: the seeds give only NO_ERROR.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import aiohttp
import trustme
from aiohttp import web

from relay.core.headers import find_field, parse_header_fields

BOUNCE_DOMAIN = "bounce.example"  # every recipient here bounces (documented in the README's demo)
DELIVERED = {"groupId": 3, "groupName": "DELIVERED", "id": 5, "name": "DELIVERED_TO_HANDSET",
             "description": "Message delivered to handset"}  # fmt: skip
UNDELIVERABLE = {"groupId": 2, "groupName": "UNDELIVERABLE", "id": 9, "name": "UNDELIVERABLE_NOT_DELIVERED",
                 "description": "Message sent not delivered"}  # fmt: skip
NO_ERROR = {"groupId": 0, "groupName": "OK", "id": 0, "name": "NO_ERROR", "description": "No Error", "permanent": False}
NO_MAILBOX = {"groupId": 1, "groupName": "HANDSET_ERRORS", "id": 5001, "name": "EC_MAILBOX_DOES_NOT_EXIST",
              "description": "The recipient's mailbox does not exist", "permanent": True}  # fmt: skip


@dataclass(frozen=True)
class ReportsRequest:
    method: str
    path: str
    query: dict[str, str]
    authorized: bool
    api_key: str  # as sent in `Authorization: App <key>` ("" without one): which key fetched which bulkId
    account: str | None  # the account that key opens: None for the main one, else its SMTP user


@dataclass
class ReportsBehaviour:
    rate_limited: int = 0  # the next N requests get 429
    retry_after: int = 1  # seconds, in the 429's Retry-After
    failing: int = 0  # the next N requests get 500
    holding: bool = False  # reports exist but are not handed out yet (Infobip still delivering)
    charset: str = "utf-8"  # of the JSON: "latin-1" writes its words as a misconfigured server would
    answer: asyncio.Event | None = None  # set: a page, once handed out, is answered only when the event is set


@dataclass
class _Waiting:
    report: dict[str, Any]
    notify_url: str | None
    account: str | None
    pushed: bool = False


@dataclass(frozen=True)
class _Sent:
    """What `track()` needs of a message: where its events go, and the fields they repeat."""

    tracking_url: str | None
    bulk_id: str | None
    sender: str
    sent_at: int  # epoch milliseconds, as sendDateTime


@dataclass
class ReportsEndpoint:
    ca: trustme.CA
    api_key: str = "demo-api-key"  # the main account's
    account_keys: dict[str, str] = field(default_factory=dict)  # another account's SMTP user -> its API key
    behaviour: ReportsBehaviour = field(default_factory=ReportsBehaviour)
    requests: list[ReportsRequest] = field(default_factory=list)
    # (account, bulk id) -> its reports, oldest first
    _by_bulk: dict[tuple[str | None, str | None], list[_Waiting]] = field(default_factory=dict)
    _sent: dict[str, _Sent] = field(default_factory=dict)  # Infobip message id -> for track()
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Condition | None = None

    @property
    def waiting(self) -> list[_Waiting]:
        """Every report not handed out yet (pulled, or pushed without `keep`)."""
        return [item for items in self._by_bulk.values() for item in items]

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert("localhost", "127.0.0.1").configure_cert(tls)
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port, ssl_context=tls).start()
        self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def sent(
        self, message_id: str, data: bytes, recipients: list[str], account: str | None = None, sender: str = ""
    ) -> None:
        """The stand-in accepted a message (sent with `account`: None for the main one): its reports wait now."""
        fields = parse_header_fields(data)
        bulk, notify = find_field(fields, "X-IB-Bulk-Id"), find_field(fields, "X-IB-Notify-Url")
        tracking = find_field(fields, "X-IB-Tracking-Url")
        when = datetime.now(UTC)
        now = when.strftime("%Y-%m-%dT%H:%M:%S.000+0000")
        bulk_id = bulk.value if bulk else None
        sent_at = int(when.timestamp() * 1000)
        self._sent[message_id] = _Sent(tracking.value if tracking else None, bulk_id, sender, sent_at)
        for rcpt in recipients:
            bounces = rcpt.lower().endswith("@" + BOUNCE_DOMAIN)
            report: dict[str, Any] = {
                "bulkId": bulk_id,
                "messageId": message_id,
                "to": rcpt,
                "sentAt": now,
                "doneAt": now,
                "messageCount": 1,
                "price": {"pricePerMessage": 0, "currency": "UNKNOWN"},
                "status": UNDELIVERABLE if bounces else DELIVERED,
                "error": NO_MAILBOX if bounces else NO_ERROR,
                "channel": "EMAIL",
            }
            waiting = _Waiting(report, notify.value if notify else None, account)
            self._by_bulk.setdefault((account, bulk_id), []).append(waiting)

    async def wait_for_requests(self, count: int, timeout: float = 10.0) -> list[ReportsRequest]:
        condition = self._condition()
        async with condition:
            await asyncio.wait_for(condition.wait_for(lambda: len(self.requests) >= count), timeout)
        return self.requests

    def _condition(self) -> asyncio.Condition:
        if self._arrived is None:
            self._arrived = asyncio.Condition()
        return self._arrived

    async def push(self, *, keep: bool = False, to: str | None = None) -> int:
        """POST each waiting report (only those for `to`, if given) to its message's notify URL, as Infobip
        pushes them; `keep` leaves a copy to be pulled too (a report seen twice). Returns how many pushes
        were answered 200."""
        ok = 0
        chosen = [w for w in self.waiting if w.notify_url and not w.pushed and to in (None, w.report["to"])]
        async with aiohttp.ClientSession() as session:
            for item in chosen:
                async with session.post(item.notify_url or "", json={"results": [item.report]}) as response:
                    ok += response.status == 200
                item.pushed = True
                if not keep:
                    self._by_bulk[item.account, item.report["bulkId"]].remove(item)
        return ok

    async def track(self, message_id: str, recipient: str, kind: str, url: str = "", event_id: str = "") -> int:
        """POST one tracking notification (`kind`: OPENED, CLICKED, UNSUBSCRIBED, COMPLAINED, LATE_BOUNCE;
        `url` for a click; `event_id` to send one event twice) to the message's X-IB-Tracking-Url, shaped as
        seed 000's examples. Returns the HTTP status (0: the message has no tracking URL, so Infobip would
        send nothing)."""
        sent = self._sent[message_id]
        if sent.tracking_url is None:
            return 0
        event: dict[str, Any] = {
            "notificationType": kind,
            "eventId": event_id or str(uuid.uuid4()),
            "domain": sent.sender.rpartition("@")[2],
            "recipient": recipient,
            "sendDateTime": sent.sent_at,
            "messageId": message_id,
            "bulkId": sent.bulk_id,
            "callbackData": None,
        }
        if kind == "CLICKED":
            event["url"] = url
        if kind in ("COMPLAINED", "LATE_BOUNCE"):
            event["sender"] = sent.sender
        if kind in ("OPENED", "CLICKED", "UNSUBSCRIBED"):
            event["recipientInfo"] = {"deviceType": "Phone", "os": "iOS 12", "deviceName": "Apple"}
        async with aiohttp.ClientSession() as session, session.post(sent.tracking_url, json=event) as response:
            return response.status

    async def _handle(self, request: web.Request) -> web.Response:
        key = request.headers.get("Authorization", "").removeprefix("App ")
        accounts = {self.api_key: None, **{k: user for user, k in self.account_keys.items()}}
        known = request.headers.get("Authorization", "").startswith("App ") and key in accounts
        record = ReportsRequest(
            request.method, request.path, dict(request.query), known, key, accounts.get(key) if known else None
        )
        condition = self._condition()
        async with condition:
            self.requests.append(record)
            condition.notify_all()
        if request.method != "GET" or request.path != "/email/1/reports":
            return web.json_response({"requestError": {"serviceException": {"text": "not found"}}}, status=404)
        if not record.authorized:
            return web.json_response({"requestError": {"serviceException": {"text": "Unauthorized"}}}, status=401)
        if self.behaviour.rate_limited > 0:
            self.behaviour.rate_limited -= 1
            return web.json_response({}, status=429, headers={"Retry-After": str(self.behaviour.retry_after)})
        if self.behaviour.failing > 0:
            self.behaviour.failing -= 1
            return web.Response(status=500, text="internal error")
        results = {"results": self._take(record.query, record.account)}
        if self.behaviour.answer is not None:  # handed out (Infobip's side is done); the answer is slow
            await self.behaviour.answer.wait()
        body = json.dumps(results, ensure_ascii=False).encode(self.behaviour.charset, "replace")
        return web.Response(body=body, content_type="application/json")

    def _take(self, query: dict[str, str], account: str | None) -> list[dict[str, Any]]:
        """The account's waiting reports the filter matches (another account's are never seen)."""
        if self.behaviour.holding:
            return []
        limit = int(query.get("limit", "50") or 50)
        mine = [bucket for bucket in self._by_bulk if bucket[0] == account]
        buckets = [(account, query["bulkId"])] if "bulkId" in query else mine  # no filter: all the account's
        chosen: list[dict[str, Any]] = []
        for bulk in buckets:
            kept: list[_Waiting] = []
            for item in self._by_bulk.get(bulk, []):
                wanted = query.get("messageId", item.report["messageId"]) == item.report["messageId"]
                if wanted and len(chosen) < limit:
                    chosen.append(item.report)
                else:
                    kept.append(item)
            if bulk in self._by_bulk:
                self._by_bulk[bulk] = kept
        return chosen  # handed out once: nothing keeps them to change
