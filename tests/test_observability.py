"""Observability: /metrics (Prometheus), the status page at / and ``xdsplane status``.

End to end against ``xdsplane serve`` on a tmp folder: a real Envoy (reload, ACKs,
propagation, an Envoy-rejected route, disconnect) and a scripted delta gRPC client (a NACK
sent with error_detail, a node id that must be escaped on the page). Plus unit checks of the
snapshot/certificate gauges and of the page's escaping.
"""

from __future__ import annotations

import datetime
import json
import queue
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from harness import (
    HOST,
    Envoy,
    ProcessGroup,
    Upstream,
    XdsServer,
    answers,
    direct,
    eds_cluster,
    endpoints,
    free_port,
    listener,
    regex_direct,
    route_config,
    to_cluster,
    wait_until,
    write_snapshot,
    xdsplane_argv,
)
from prometheus_client.parser import text_string_to_metric_families

from xdsplane import statuspage
from xdsplane.cache import SnapshotCache
from xdsplane.metrics import Metrics
from xdsplane.snapshot import NodeGroup, Snapshot, SnapshotSet, make_resource
from xdsplane.tlsfiles import CertSummary
from xdsplane.types import ResourceType

CDS_URL = ResourceType.CLUSTER.value


# -- helpers ----------------------------------------------------------------------------------


def fetch(port: int, path: str) -> tuple[str, str]:
    """GET ``path`` on the admin server with urllib: (content type, body)."""
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as r:
        return str(r.headers.get("Content-Type", "")), r.read().decode("utf-8")


class Scrape:
    """One scrape of /metrics, parsed; a series that is absent reads as 0."""

    def __init__(self, port: int) -> None:
        content_type, text = fetch(port, "/metrics")
        assert content_type.startswith("text/plain"), content_type
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples


def metric(port: int, name: str, **labels: str) -> float:
    return Scrape(port).get(name, **labels)


def resources(port: int, upstream_port: int, hello: str) -> list[dict[str, Any]]:
    return [
        listener("http", port),
        route_config("http", [to_cluster("/app", "alpha"), direct("/hello", hello)]),
        eds_cluster("alpha"),
        endpoints("alpha", [upstream_port]),
    ]


def run_status(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        xdsplane_argv("status", *args), capture_output=True, text=True, timeout=30, check=False
    )


# -- a real Envoy -----------------------------------------------------------------------------


@pytest.mark.envoy
@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_metrics_page_and_status_follow_envoy_through_reload_nack_and_disconnect(
    variant: str, procs: ProcessGroup, tmp_path: Path, upstream: Callable[[str], Upstream]
) -> None:
    cfg = tmp_path / "snapshots"
    port = free_port()
    alpha = upstream("alpha")
    write_snapshot(cfg / "edge.yaml", resources(port, alpha.port, "hello v1"))
    server = XdsServer(procs, cfg).launch()
    envoy = Envoy(procs, tmp_path, "edge-a", server.xds_address, delta=variant == "delta")
    server.wait_ready()
    envoy.start()
    admin = server.admin_port
    wait_until(lambda: server.settled("edge-a"), 10, what="all types ACKed")

    # Connected, and every type was sent and ACKed.
    m = Scrape(admin)
    assert m.get("xdsplane_connected_streams", node="edge-a", variant=variant) == 1
    for t in ("CDS", "EDS", "LDS", "RDS"):
        assert m.get("xdsplane_responses_total", type=t) >= 1, t
        assert m.get("xdsplane_acks_total", type=t) >= 1, t
        assert m.get("xdsplane_nacks_total", type=t) == 0, t
    assert m.get("xdsplane_reload_successes_total") == 1  # the startup load
    assert m.get("xdsplane_reload_failures_total") == 0
    assert any(
        name == "xdsplane_snapshot_resources" and ("type", "CDS") in labels and value == 1
        for (name, labels), value in m.samples.items()
    )
    assert any(
        name == "xdsplane_snapshot_bytes" and value > 0 for (name, _), value in m.samples.items()
    )

    # A reload that changes the routes: +1 success, one more RDS response, its ACK observed
    # as a propagation latency.
    write_snapshot(cfg / "edge.yaml", resources(port, alpha.port, "hello v2"))
    wait_until(answers(port, "/hello", "hello v2"), 10, what="Envoy serves the edit")
    wait_until(lambda: server.settled("edge-a"), 10, what="the edit ACKed")
    m2 = wait_until(
        lambda: (
            s
            if (s := Scrape(admin)).get("xdsplane_propagation_seconds_count", type="RDS") >= 1
            else None
        ),
        10,
        what="propagation observed",
    )
    assert m2.get("xdsplane_reload_successes_total") == 2
    assert m2.get("xdsplane_reload_duration_seconds_count") == 1
    assert (
        m2.get("xdsplane_responses_total", type="RDS")
        == m.get("xdsplane_responses_total", type="RDS") + 1
    )
    assert m2.get("xdsplane_acks_total", type="RDS") == m.get("xdsplane_acks_total", type="RDS") + 1
    assert m2.get("xdsplane_propagation_seconds_count", type="RDS") == 1
    assert 0 < m2.get("xdsplane_propagation_seconds_sum", type="RDS") < 10
    assert m2.get("xdsplane_propagation_seconds_count", type="CDS") == 0  # CDS did not change

    # A route Envoy rejects (RE2 does not compile it): the NACK is counted for RDS.
    bad = resources(port, alpha.port, "bad")
    bad[1]["virtual_hosts"][0]["routes"].append(regex_direct("/(unclosed", "never"))
    write_snapshot(cfg / "edge.yaml", bad)
    wait_until(lambda: metric(admin, "xdsplane_nacks_total", type="RDS") == 1, 10, what="RDS NACK")
    m3 = Scrape(admin)
    assert m3.get("xdsplane_reload_successes_total") == 3
    assert m3.get("xdsplane_propagation_seconds_count", type="RDS") == 1  # a NACK is not one

    # The page for people: the node, its types, the rejection.
    content_type, page = fetch(admin, "/")
    assert content_type.startswith("text/html"), content_type
    assert "edge-a" in page
    assert "<th>RDS</th>" in page and "<th>CDS</th>" in page
    assert "NACK" in page and "unclosed" in page
    assert "http-equiv='refresh'" in page

    # The terminal view lists the node and the NACK; --json is /status.
    out = run_status("--admin-address", f"{HOST}:{admin}")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["NODE", "CLIENT", "VARIANT", "GROUP"]
    (row,) = [line for line in lines if line.startswith("edge-a")]
    assert row.split()[1] == "envoy"  # the client kind, from node.user_agent_name
    assert variant in row.split() and "NACK" in row
    assert any(line.startswith("NACK edge-a RDS") for line in lines), out.stdout
    assert any(line.startswith("reload: ready") for line in lines), out.stdout
    js = run_status("--admin-address", f"{HOST}:{admin}", "--json")
    assert js.returncode == 0, js.stderr
    assert [s["node"] for s in json.loads(js.stdout)["streams"]] == ["edge-a"]

    # Envoy goes away: its connected gauge returns to 0.
    envoy.stop()
    wait_until(
        lambda: (
            Scrape(admin).has("xdsplane_connected_streams", node="edge-a", variant=variant)
            and metric(admin, "xdsplane_connected_streams", node="edge-a", variant=variant) == 0
        ),
        10,
        what="connected gauge back to 0",
    )
    _, page = fetch(admin, "/")
    assert "No Envoy is connected" in page
    assert "edge-a" in page  # its NACK is remembered


# -- a scripted delta client ------------------------------------------------------------------


class DeltaClient:
    """A delta ADS stream on a plain gRPC channel: requests from a queue, responses read by
    a thread into a queue; the call has a deadline, so nothing outlives the test."""

    def __init__(self, address: str, node: str) -> None:
        self.node = node
        self.closed = False
        self.channel = grpc.insecure_channel(address)
        method = self.channel.stream_stream(
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources",
            request_serializer=discovery_pb2.DeltaDiscoveryRequest.SerializeToString,
            response_deserializer=discovery_pb2.DeltaDiscoveryResponse.FromString,
        )
        self.requests: queue.Queue[discovery_pb2.DeltaDiscoveryRequest | None] = queue.Queue()
        self.responses: queue.Queue[Any] = queue.Queue()
        self.call = method(self._requests(), timeout=60)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _requests(self) -> Iterator[discovery_pb2.DeltaDiscoveryRequest]:
        while (req := self.requests.get()) is not None:
            yield req

    def _read(self) -> None:
        try:
            for r in self.call:
                self.responses.put(r)
        except grpc.RpcError as e:
            self.responses.put(e)

    def send(self, **fields: Any) -> None:
        self.requests.put(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS_URL, **fields))

    def recv(self) -> discovery_pb2.DeltaDiscoveryResponse:
        r = self.responses.get(timeout=10)
        assert isinstance(r, discovery_pb2.DeltaDiscoveryResponse), r
        return r

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.requests.put(None)
        self.call.cancel()
        self.channel.close()
        self.reader.join(timeout=5)


@pytest.fixture
def delta_client() -> Iterator[Callable[[str, str], DeltaClient]]:
    made: list[DeltaClient] = []

    def make(address: str, node: str) -> DeltaClient:
        c = DeltaClient(address, node)
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


def test_scripted_client_nack_and_disconnect(
    procs: ProcessGroup, tmp_path: Path, delta_client: Callable[[str, str], DeltaClient]
) -> None:
    cfg = tmp_path / "snapshots"
    port = free_port()
    write_snapshot(cfg / "edge.yaml", resources(port, 1, "v1"))
    server = XdsServer(procs, cfg).start()
    admin = server.admin_port
    node = 'edge-<b>&"quoted"'  # must be escaped on the page

    c = delta_client(server.xds_address, node)
    c.send(node=base_pb2.Node(id=node, cluster="edge"), resource_names_subscribe=["*"])
    first = c.recv()
    assert [r.name for r in first.resources] == ["alpha"]
    c.send(response_nonce=first.nonce)
    wait_until(lambda: metric(admin, "xdsplane_acks_total", type="CDS") == 1, 10, what="ACK")
    m = Scrape(admin)
    assert m.get("xdsplane_connected_streams", node=node, variant="delta") == 1
    assert m.get("xdsplane_responses_total", type="CDS") == 1

    # A reload adds a cluster: pushed, ACKed, propagation observed.
    more = [*resources(port, 1, "v1"), eds_cluster("beta"), endpoints("beta", [2])]
    write_snapshot(cfg / "edge.yaml", more)
    second = c.recv()
    assert [r.name for r in second.resources] == ["beta"]
    c.send(response_nonce=second.nonce)
    wait_until(
        lambda: metric(admin, "xdsplane_propagation_seconds_count", type="CDS") == 1,
        10,
        what="propagation observed",
    )
    m = Scrape(admin)
    assert m.get("xdsplane_reload_successes_total") == 2
    assert m.get("xdsplane_acks_total", type="CDS") == 2
    assert m.get("xdsplane_responses_total", type="CDS") == 2

    # A bad edit is refused by the server: the failure counter moves, nothing is pushed.
    (cfg / "broken.yaml").write_text("resources: [\n", encoding="utf-8")
    wait_until(
        lambda: metric(admin, "xdsplane_reload_failures_total") == 1, 10, what="reload failure"
    )
    (cfg / "broken.yaml").unlink()

    # The next push is NACKed with error_detail: counted for CDS, shown on the page, escaped.
    more.append(eds_cluster("gamma"))
    more.append(endpoints("gamma", [3]))
    write_snapshot(cfg / "edge.yaml", more)
    third = c.recv()
    assert [r.name for r in third.resources] == ["gamma"]
    c.send(
        response_nonce=third.nonce,
        error_detail=status_pb2.Status(code=3, message="gamma <rejected> & bad"),
    )
    wait_until(lambda: metric(admin, "xdsplane_nacks_total", type="CDS") == 1, 10, what="NACK")
    m = Scrape(admin)
    assert m.get("xdsplane_acks_total", type="CDS") == 2
    assert m.get("xdsplane_propagation_seconds_count", type="CDS") == 1

    _, page = fetch(admin, "/")
    assert "edge-&lt;b&gt;&amp;&quot;quoted&quot;" in page
    assert "gamma &lt;rejected&gt; &amp; bad" in page
    assert "<b>&" not in page and "<rejected>" not in page

    out = run_status("--admin-address", f"{HOST}:{admin}")
    assert out.returncode == 0, out.stderr
    assert any(line.startswith(node) and "NACK" in line for line in out.stdout.splitlines())

    # Disconnect: the gauge goes back to 0.
    c.close()
    wait_until(
        lambda: (
            Scrape(admin).has("xdsplane_connected_streams", node=node, variant="delta")
            and metric(admin, "xdsplane_connected_streams", node=node, variant="delta") == 0
        ),
        10,
        what="connected gauge back to 0",
    )


def test_status_command_reports_an_unreachable_server() -> None:
    port = free_port()  # nothing listens there
    out = run_status("--admin-address", f"{HOST}:{port}")
    assert out.returncode == 1
    assert f"cannot reach the server at http://{HOST}:{port}/status" in out.stderr
    assert "Traceback" not in out.stderr


# -- units ------------------------------------------------------------------------------------


def _cert(secret: str, days: float) -> CertSummary:
    now = datetime.datetime.now(datetime.UTC)
    return CertSummary(
        secret=secret,
        path=f"/certs/{secret}.crt",
        subject=f"CN={secret}",
        issuer="CN=ca",
        serial="0a",
        not_after=now + datetime.timedelta(days=days),
        dns=(f"{secret}.example.com",),
        uris=(),
        fingerprint_sha256="00",
        is_ca=False,
    )


def test_snapshot_and_certificate_gauges_are_read_at_scrape_time() -> None:
    cluster = ResourceType.CLUSTER.message_class(name="alpha")
    snap = Snapshot.build([make_resource(ResourceType.CLUSTER, cluster)])
    current: list[SnapshotSet | None] = [None]
    metrics = Metrics(lambda: current[0])
    assert b"xdsplane_snapshot_resources{" not in metrics.render()

    current[0] = SnapshotSet(
        (NodeGroup("edge", ("edge-*",), snap),), (_cert("edge", 3), _cert("old", -1))
    )
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(metrics.render().decode())
        for s in f.samples
    }
    assert samples[("xdsplane_snapshot_resources", (("group", "edge"), ("type", "CDS")))] == 1
    assert samples[("xdsplane_snapshot_resources", (("group", "edge"), ("type", "LDS")))] == 0
    size = samples[("xdsplane_snapshot_bytes", (("group", "edge"), ("type", "CDS")))]
    assert size == len(cluster.SerializeToString(deterministic=True))
    expiry = {
        dict(labels)["secret"]: v
        for (name, labels), v in samples.items()
        if name == "xdsplane_certificate_expiry_seconds"
    }
    assert 3 * 86400 - 60 < expiry["edge"] <= 3 * 86400
    assert expiry["old"] < 0

    # Two servers in one process do not share (or clash over) their metrics.
    other = Metrics()
    other.stream_opened("n", "sotw")
    assert b'node="n"' not in metrics.render()


def test_a_snapshot_carries_the_time_it_was_first_served() -> None:
    """Propagation is measured from the install of the snapshot a response was built from
    (its ACK carries Snapshot.installed_at), not from whatever was installed last."""
    a = Snapshot.build(
        [make_resource(ResourceType.CLUSTER, ResourceType.CLUSTER.message_class(name="a"))]
    )
    b = Snapshot.build(
        [make_resource(ResourceType.CLUSTER, ResourceType.CLUSTER.message_class(name="b"))]
    )
    assert a.installed_at is None  # built, not served
    cache = SnapshotCache()
    before = time.monotonic()
    cache.update(SnapshotSet((NodeGroup("a", ("a-*",), a),)))
    first = a.installed_at
    assert first is not None and before <= first <= time.monotonic()
    # a reload that keeps serving ``a`` and adds ``b``: ``a`` keeps its first install time
    cache.update(SnapshotSet((NodeGroup("a", ("a-*",), a), NodeGroup("b", None, b))))
    assert a.installed_at == first
    assert b.installed_at is not None and b.installed_at >= first


def test_page_escapes_everything_and_flags_expiring_certificates() -> None:
    evil = "<script>alert(1)</script>"
    status = {
        "ready": True,
        "config": evil,
        "reload": {"errors": [f"a.yaml:1:2: {evil}"], "successes": 1, "failures": 1},
        "streams": [
            {
                "stream": 1,
                "variant": "sotw",
                "peer": evil,
                "node": evil,
                "cluster": evil,
                "group": evil,
                "connected_at": 0,
                "types": {
                    "CDS": {
                        "acked_version": "0123456789abcdef",
                        "sent_version": "fedcba9876543210",
                        "nacks": 1,
                        "nacked_version": "fedcba9876543210",
                        "last_nack": evil,
                    }
                },
            }
        ],
        "nacks": {evil: {"CDS": {"message": evil, "version": evil, "at": 0}}},
        "certificates": [
            {**_cert("edge", 3).as_dict(), "expiring": True},
            {**_cert("api", 300).as_dict(), "expiring": False},
        ],
        "refused": {evil: 1},
    }
    page = statuspage.render(status, cert_warn_days=14)
    assert "<script>" not in page
    assert "&lt;script&gt;" in page
    assert "01234567" in page and "NACK" in page
    assert "expiring" in page and "edge" in page and "api" in page
    text = "\n".join(statuspage.status_lines(status))
    assert "01234567 NACK" in text
    assert "EXPIRING" in text
