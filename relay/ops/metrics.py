"""Prometheus metrics, one registry per relay (so tests and reloads never share counters).

Every family here is named in the README and used by deploy/prometheus/relay-rules.yml and
deploy/grafana/relay-dashboard.json; tests/test_metrics.py scrapes a running relay and checks that each
name those files query is exported.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable, Mapping
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as distribution_version
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector


def relay_version() -> str:
    """The installed package's version (pyproject.toml), as `relay --version` and relay_build_info say."""
    try:
        return distribution_version("relay")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series beside each counter
        self.registry = CollectorRegistry()
        r = self.registry
        # The standard process_* and python_* families under prometheus-client's own names, so stock
        # dashboards and alerts (memory, open fds, CPU) work unchanged.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        build = Gauge("relay_build_info", "Always 1; its labels say what runs", ["version", "python"], registry=r)
        build.labels(relay_version(), platform.python_version()).set(1)
        self.received = Counter("relay_messages_received", "Messages whose DATA was received", registry=r)
        self.relayed = Counter(
            "relay_messages_relayed", "Messages Infobip accepted (at least one recipient)", registry=r
        )
        self.rejected = Counter(
            "relay_messages_rejected", "Messages or commands refused, by reason", ["reason"], registry=r
        )
        self.rejected.labels("history_behind")  # at 0 from start-up: an alert's increase() sees the first ones
        self.upstream_replies = Counter(
            "relay_upstream_replies", "Infobip's end-of-transaction replies, by code", ["code"], registry=r
        )
        self.deferred = Counter("relay_delivery_deferred", "Attempts that left recipients to retry", registry=r)
        self.dead = Counter("relay_delivery_dead_lettered", "Messages with recipients moved to dead/", registry=r)
        self.upstream_connects = Counter(
            "relay_upstream_connections_opened", "Upstream connections opened (reconnects included)", registry=r
        )
        self.upstream_failures = Counter(
            "relay_upstream_connection_failures", "Failed attempts to connect, TLS or authenticate", registry=r
        )
        self.delivery_seconds = Histogram(
            "relay_delivery_seconds",
            "From the end of DATA to Infobip's verdict (first attempt) or each retry's verdict",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=r,
        )
        self.profile_relayed = Counter(
            "relay_profile_messages_relayed", "Messages Infobip accepted, by profile", ["profile"], registry=r
        )
        self.profile_deferred = Counter(
            "relay_profile_delivery_deferred",
            "Attempts that left recipients to retry, by profile",
            ["profile"],
            registry=r,
        )
        self.reloads = Counter(
            "relay_config_reloads", "SIGHUP reloads, by result (success, failure)", ["result"], registry=r
        )
        for result in ("success", "failure"):  # present at 0 from start-up, so rate() and alerts see them
            self.reloads.labels(result)
        self.last_reload_ok = Gauge(
            "relay_config_last_reload_successful", "0 while the last reload failed (the old config runs)", registry=r
        )
        self.last_reload_ok.set(1)

    def per_profile(self, name: str, documentation: str, read: Callable[[], Mapping[str, float]]) -> None:
        """A gauge with a `profile` label, read when scraped (each profile's breaker, upstream, queue)."""
        self.registry.register(_PerProfile(name, documentation, read))

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        """A value read when scraped (spool depth, pool size): no bookkeeping on the hot path."""
        Gauge(name, documentation, registry=self.registry).set_function(read)

    def reloaded(self, ok: bool) -> None:
        """Count a SIGHUP reload; a failed one keeps the old config, which the gauge says until one works."""
        self.reloads.labels("success" if ok else "failure").inc()
        self.last_reload_ok.set(1 if ok else 0)

    def spool_disk(self, path: Path) -> None:
        """Free and total bytes of the file system holding the spool: the disk-nearly-full alert."""
        self.gauge("relay_spool_free_bytes", "Bytes free to the relay on the spool's disk", lambda: _disk(path)[0])
        self.gauge("relay_spool_size_bytes", "Size in bytes of the spool's file system", lambda: _disk(path)[1])


def _disk(path: Path) -> tuple[float, float]:
    try:
        stat = os.statvfs(path)
    except OSError:  # gone or unreadable: NaN, so an alert on the ratio neither fires nor clears on garbage
        return float("nan"), float("nan")
    return float(stat.f_bavail * stat.f_frsize), float(stat.f_blocks * stat.f_frsize)


class _Envelope(Protocol):
    @property
    def received_at(self) -> float: ...


class _Job(Protocol):
    @property
    def envelope(self) -> _Envelope: ...

    @property
    def in_journal(self) -> bool: ...


class _Queue(Protocol):
    @property
    def jobs(self) -> Mapping[str, _Job]: ...

    @property
    def busy(self) -> set[str]: ...

    @property
    def unloaded(self) -> int: ...


def waiting_jobs(queues: Iterable[_Queue], queue_dir: Path) -> list[_Job]:
    """The scheduler's waiting jobs (every lane's) whose message is still on disk: `relay queue delete`
    removes the file of a message the running relay has scheduled, and the relay only notices when it
    comes due."""
    try:
        on_disk = {entry.name[: -len(".msg")] for entry in os.scandir(queue_dir) if entry.name.endswith(".msg")}
    except OSError:
        on_disk = set()
    return [
        job for queue in queues for queue_id, job in list(queue.jobs.items()) if job.in_journal or queue_id in on_disk
    ]


def spool_depth(queues: Iterable[_Queue], queue_dir: Path) -> int:
    """relay_spool_depth: waiting on disk (or in the journal), plus those a worker has now, plus those
    start-up has listed and not read yet."""
    queues = list(queues)
    return len(waiting_jobs(queues, queue_dir)) + sum(len(queue.busy) + queue.unloaded for queue in queues)


def oldest_received(queues: Iterable[_Queue], queue_dir: Path) -> float | None:
    """Arrival time (epoch) of the oldest message still waiting, for relay_spool_oldest_age_seconds."""
    return min((job.envelope.received_at for job in waiting_jobs(queues, queue_dir)), default=None)


class _PerProfile:
    """A custom collector: one sample per profile, from `read()` at scrape time."""

    def __init__(self, name: str, documentation: str, read: Callable[[], Mapping[str, float]]) -> None:
        self._name, self._documentation, self._read = name, documentation, read

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(self._name, self._documentation, labels=["profile"])
        for profile, value in sorted(self._read().items()):
            family.add_metric([profile], value)
        yield family
