"""The outcome families, on the relay's own registry (only registered while reports or bounces are on)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REPORT_RESULTS = ("delivered", "bounced", "pending", "duplicate", "unknown")
BOUNCE_RESULTS = ("sent", "retried", "dropped", "not_sent")
POLL_ERRORS = ("rate_limited", "http_error", "connection", "bad_response", "history")
TRACKING_KINDS = ("opened", "clicked", "unsubscribed", "complained", "late_bounce", "other")


def tracking_label(kind: str) -> str:
    """A notificationType as a metric label: the seeds' five, anything else `other` (the labels stay few)."""
    label = kind.lower()
    return label if label in TRACKING_KINDS else "other"


class OutcomeMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.reports = Counter(
            "relay_reports",
            "Infobip delivery reports taken, by result (status group or why ignored)",
            ["result"],
            registry=r,
        )
        self.outcome_seconds = Histogram(
            "relay_outcome_seconds",
            "From Infobip's acceptance (250) to the recipient's final report",
            buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400, 172800),
            registry=r,
        )
        self.bounces = Counter(
            "relay_bounces", "Bounce attempts to the company mail server, by result", ["result"], registry=r
        )
        self.poll_errors = Counter(
            "relay_reports_poll_errors", "Failed polls of Infobip's reports endpoint, by reason", ["reason"], registry=r
        )
        self.tracking = Counter(
            "relay_tracking_events",
            "Tracking events Infobip pushed to the relay's X-IB-Tracking-Url, by kind",
            ["kind"],
            registry=r,
        )
        self.history_errors = Counter("relay_history_write_errors", "History write tries that failed", registry=r)
        self.next_poll = Gauge(
            "relay_reports_next_poll_timestamp_seconds", "When the next poll for reports goes (epoch)", registry=r
        )
        for name in REPORT_RESULTS:  # present at 0 from start-up, so rate() and alerts see them
            self.reports.labels(name)
        for name in BOUNCE_RESULTS:
            self.bounces.labels(name)
        for name in POLL_ERRORS:
            self.poll_errors.labels(name)
        for name in TRACKING_KINDS:
            self.tracking.labels(name)
