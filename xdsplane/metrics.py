"""Prometheus metrics of one server, in a registry of its own (several servers can share a
process, as in tests); served by the admin server at ``/metrics``.

Counters move where requests, responses and reloads flow (ads.py, watch.py); what
describes the served snapshot (sizes, certificate expiry) is read from the cache at scrape
time, so a group or secret that is gone is gone from ``/metrics`` too.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector

from xdsplane.redact import escape_control
from xdsplane.snapshot import SnapshotSet
from xdsplane.tlsfiles import CertSummary
from xdsplane.types import PUSH_ORDER, ResourceType

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # what generate_latest writes
MAX_STREAM_SERIES = 10_000  # (node, variant) series kept at 0 after their streams close

# Propagation is milliseconds on a healthy host; a stuck Envoy takes seconds.
PROPAGATION_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
RELOAD_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The server's metrics; ``snapshots`` returns what is served now (for sizes and certs)."""

    def __init__(self, snapshots: Callable[[], SnapshotSet | None] = lambda: None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.connected = Gauge(
            "xdsplane_connected_streams",
            "ADS streams connected now, by node id and protocol variant (sotw, delta)",
            ["node", "variant"],
            registry=r,
        )
        self.responses = Counter(
            "xdsplane_responses", "xDS responses sent, by type", ["type"], registry=r
        )
        self.acks = Counter("xdsplane_acks", "ACKs received, by type", ["type"], registry=r)
        self.nacks = Counter("xdsplane_nacks", "NACKs received, by type", ["type"], registry=r)
        self.reload_successes = Counter(
            "xdsplane_reload_successes", "loads that changed what is served", registry=r
        )
        self.reload_failures = Counter(
            "xdsplane_reload_failures",
            "loads refused (the last good snapshot stays served)",
            registry=r,
        )
        self.reload_seconds = Histogram(
            "xdsplane_reload_duration_seconds",
            "time to load, check and install a changed folder",
            buckets=RELOAD_BUCKETS,
            registry=r,
        )
        self.propagation_seconds = Histogram(
            "xdsplane_propagation_seconds",
            "time from a snapshot being installed to a stream's ACK of the response it caused",
            ["type"],
            buckets=PROPAGATION_BUCKETS,
            registry=r,
        )
        self.refused = Counter(
            "xdsplane_streams_refused",
            "ADS streams refused or ended by the server, by reason (max_streams, max_names, "
            "node_too_long, bad_request, and the node identity checks)",
            ["reason"],
            registry=r,
        )
        self.throttled_requests = Counter(
            "xdsplane_requests_throttled",
            "requests read late because their stream was over its request rate",
            registry=r,
        )
        r.register(_SnapshotCollector(snapshots))
        r.register(_TaskCollector())
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends
        self._streams: dict[tuple[str, str], int] = {}

    # -- streams ------------------------------------------------------------------------------

    def stream_opened(self, node: str, variant: str) -> None:
        node = escape_control(node)  # a client's id: `curl /metrics` must not drive a terminal
        key = (node, variant)
        count = self._streams.pop(key, 0) + 1
        self._streams[key] = count  # most recently seen last
        self.connected.labels(node, variant).set(count)
        if len(self._streams) > MAX_STREAM_SERIES:
            self._forget_idle()

    def stream_closed(self, node: str, variant: str) -> None:
        node = escape_control(node)
        key = (node, variant)
        count = max(self._streams.get(key, 0) - 1, 0)
        self._streams[key] = count
        self.connected.labels(node, variant).set(count)

    def _forget_idle(self) -> None:
        for key in [k for k, n in self._streams.items() if n == 0]:
            if len(self._streams) <= MAX_STREAM_SERIES:
                break
            del self._streams[key]
            self.connected.remove(*key)

    def stream_refused(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def throttled(self) -> None:
        self.throttled_requests.inc()

    def response_sent(self, rtype: ResourceType) -> None:
        self.responses.labels(rtype.short).inc()

    def ack(self, rtype: ResourceType) -> None:
        self.acks.labels(rtype.short).inc()

    def nack(self, rtype: ResourceType) -> None:
        self.nacks.labels(rtype.short).inc()

    def propagated(self, rtype: ResourceType, installed_at: float) -> None:
        """A stream ACKed a response caused by the snapshot installed at ``installed_at``
        (``Snapshot.installed_at``, monotonic seconds)."""
        self.propagation_seconds.labels(rtype.short).observe(time.monotonic() - installed_at)

    # -- reloads ------------------------------------------------------------------------------

    def installed(self) -> None:
        """A snapshot set was installed (at startup or by a reload): a success, as in
        /status. The install time travels with the snapshots (``Snapshot.installed_at``)."""
        self.reload_successes.inc()

    def reload_took(self, seconds: float) -> None:
        self.reload_seconds.observe(seconds)

    def reload_failed(self) -> None:
        self.reload_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _TaskCollector(Collector):
    """asyncio tasks alive in the serving loop: one per stream and its reader, plus a few
    of the server's own; growth with no streams open would be a leak."""

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        try:
            family.add_metric([], len(asyncio.all_tasks()))
        except RuntimeError:  # scraped outside a running loop (tests): nothing to count
            return []
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily("xdsplane_asyncio_tasks", "asyncio tasks alive in the server")


class _SnapshotCollector(Collector):
    """Sizes of the served snapshot and seconds until each served certificate expires."""

    def __init__(self, snapshots: Callable[[], SnapshotSet | None]) -> None:
        self.snapshots = snapshots

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterable[Metric]:
        current = self.snapshots()
        families = self._families()
        resources, size, expiry, staple = families
        if current is not None:
            for g in current.groups:
                for t in PUSH_ORDER:
                    named = g.snapshot.of(t)
                    resources.add_metric([g.name, t.short], len(named))
                    size.add_metric([g.name, t.short], sum(r.size for r in named.values()))
            seen: set[tuple[str, str]] = set()
            for cert in current.certificates:
                labels = (str(cert.secret), str(cert.serial))
                if labels not in seen:
                    seen.add(labels)
                    expiry.add_metric(
                        [*labels, str(cert.subject), str(cert.not_after.isoformat())],
                        cert.seconds_left(),
                    )
                    _add_staple(staple, cert)
        return families

    @staticmethod
    def _families() -> list[GaugeMetricFamily]:
        return [
            GaugeMetricFamily(
                "xdsplane_snapshot_resources",
                "resources served, by node group and type",
                labels=["group", "type"],
            ),
            GaugeMetricFamily(
                "xdsplane_snapshot_bytes",
                "serialized size of the resources served, by node group and type",
                labels=["group", "type"],
            ),
            GaugeMetricFamily(
                "xdsplane_certificate_expiry_seconds",
                "seconds until a served certificate expires (negative: expired)",
                labels=["secret", "serial", "subject", "not_after"],
            ),
            GaugeMetricFamily(
                "xdsplane_ocsp_staple_next_update_seconds",
                "seconds until a certificate secret's OCSP staple reaches its nextUpdate "
                "(negative: expired, and no longer stapled unless a host has must_staple)",
                labels=["secret", "next_update", "stapled"],
            ),
        ]


def _add_staple(family: GaugeMetricFamily, cert: CertSummary) -> None:
    """The certificate secret's OCSP staple, if it has one: seconds to its nextUpdate."""
    left = cert.ocsp_seconds_left()
    if left is None or cert.ocsp_next_update is None:
        return
    stapled = "true" if cert.ocsp_stapled else "false"
    family.add_metric([str(cert.secret), cert.ocsp_next_update.isoformat(), stapled], left)
