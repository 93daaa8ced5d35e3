"""Logs a SIEM can take (issue #13, item 5): the sample edge's access log sent over
OTLP/gRPC to an OpenTelemetry collector, beside the file, and the Grafana dashboard's
metric names checked against a real Envoy's and a real ``xdsplane serve``'s.

The collector is opentelemetry-proto's own ``LogsService`` (its generated servicer and
messages) served with grpcio on 127.0.0.1 over mutual TLS (``access_log.otlp.tls``); the
edge is the sample (snapshots/) on free ports, with its guard, its demo billing service,
``xdsplane serve`` and Envoy 1.40. (Plaintext to a loopback collector: the same logger
without a transport socket, tests/test_otlp_policy.py.)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import ssl
import threading
import uuid
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from harness import (
    Envoy,
    ProcessGroup,
    Response,
    XdsServer,
    bearer,
    exchange,
    free_port,
    http_get,
    wait_until,
    xdsplane_argv,
)
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from test_grafana import dashboard_metric_names, dashboard_name_patterns
from test_guard import guard_tls_args
from test_sample import sample_copy
from tls_helpers import (
    DemoUpstream,
    TlsConnection,
    attach_to_report,
    client_context,
    process_group,
)

from xdsplane import jwt
from xdsplane.guard.service import jti_hash
from xdsplane.policy.translate import listeners

pytestmark = [pytest.mark.envoy]

BILLING = "billing.example.com"
# Start-up ~15 s here, the tests ~20 s; 10 minutes covers a much slower machine.
MODULE_SECONDS = 600.0
# Envoy's OTLP logger flushes its buffer every second: a generous ceiling for a record.
RECORD_SECONDS = 30.0
# An empty field: "-" in OTLP records (Envoy's own spelling), null in the file's JSON.
EMPTY = ("-", None)


class Collector(logs_service_pb2_grpc.LogsServiceServicer):
    """An OTLP/gRPC logs receiver: keeps every request, parsed and as received (bytes)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: list[Any] = []
        self.raw: list[bytes] = []
        self.peers: list[list[bytes]] = []  # the client certificate's SANs, per export

    def Export(self, request: Any, context: Any) -> Any:
        with self.lock:
            self.requests.append(request)
            self.raw.append(request.SerializeToString())
            self.peers.append(list(context.auth_context().get("x509_subject_alternative_name", [])))
        return logs_service_pb2.ExportLogsServiceResponse()

    def records(self) -> list[tuple[dict[str, Any], dict[str, Any], str]]:
        """(resource attributes, record attributes, body) of every record received."""
        out = []
        with self.lock:
            requests = list(self.requests)
        for req in requests:
            for rl in req.resource_logs:
                resource = {kv.key: _value(kv.value) for kv in rl.resource.attributes}
                for sl in rl.scope_logs:
                    for rec in sl.log_records:
                        attrs = {kv.key: _value(kv.value) for kv in rec.attributes}
                        out.append((resource, attrs, rec.body.string_value))
        return out

    def all_bytes(self) -> bytes:
        with self.lock:
            return b"".join(self.raw)


def _value(v: Any) -> Any:
    kind = v.WhichOneof("value")
    return getattr(v, kind) if kind is not None else None


@dataclass
class Site:
    folder: Path
    certs: Path
    ports: dict[int, int]
    envoy: Envoy
    server: XdsServer
    collector: Collector
    access_log: Path
    guard_admin: int

    def get(
        self, path: str, cert: str | None = None, token: str | None = None, **headers: str
    ) -> Response:
        conn = TlsConnection(self.ports[8443], client_context(self.certs, cert), BILLING)
        return exchange(conn, path, {"Host": BILLING, **bearer(token), **headers})

    def record(self, path: str) -> dict[str, Any]:
        """The OTLP record of the request for ``path`` (waits for it)."""

        def found() -> dict[str, Any] | None:
            for _, attrs, _ in self.collector.records():
                if attrs.get("path") == path:
                    return attrs
            return None

        return wait_until(found, RECORD_SECONDS, what=f"the OTLP record of {path}")

    def line(self, path: str) -> dict[str, Any]:
        """The file's JSON line of the request for ``path`` (waits for it)."""

        def found() -> dict[str, Any] | None:
            for text in self.access_log.read_text(encoding="utf-8").splitlines():
                if text.startswith("{") and f'"path":"{path}"' in text.replace(" ", ""):
                    parsed: dict[str, Any] = json.loads(text)
                    return parsed
            return None

        return wait_until(found, RECORD_SECONDS, what=f"the access-log line of {path}")


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    with process_group(tmp_path_factory.mktemp("siem-logs"), max_seconds=MODULE_SECONDS) as g:
        yield g


@pytest.fixture(autouse=True)
def _report_logs(request: pytest.FixtureRequest, group: ProcessGroup) -> None:
    attach_to_report(request, group)


@pytest.fixture(scope="module")
def site(group: ProcessGroup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("siem")
    folder, ports = sample_copy(root)
    certs = root / "certs"
    # The collector serves mutual TLS as a SIEM's would: its certificate (the PKI's guard.crt:
    # service-ca, SAN guard) and only clients of service-ca (Envoy's guard-client).
    collector = Collector()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    logs_service_pb2_grpc.add_LogsServiceServicer_to_server(collector, server)
    creds = grpc.ssl_server_credentials(
        [((certs / "guard.key").read_bytes(), (certs / "guard.crt").read_bytes())],
        root_certificates=(certs / "service-ca.crt").read_bytes(),
        require_client_auth=True,
    )
    otlp_port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    log_file = root / "access.log"
    policy = folder / "billing-edge.yaml"
    text = policy.read_text(encoding="utf-8")
    line = "access_log: {path: /dev/stdout, format: json}"
    assert line in text
    tls = "{ca: service-ca, certificate: guard-client, sni: guard, subject_alt_names: [guard]}"
    otlp = f'otlp: {{address: "127.0.0.1:{otlp_port}", log_name: billing-edge, tls: {tls}}}'
    policy.write_text(
        text.replace(line, f"access_log: {{path: {json.dumps(str(log_file))}, {otlp}}}"),
        encoding="utf-8",
    )
    billing = DemoUpstream(certs, ports[9443]).start()
    try:
        guard_admin = start_guard(group, folder, certs, ports[18081])
        xds = XdsServer(group, folder).start()
        envoy = Envoy(group, root, "edge-1", xds.xds_address)
        envoy.proc.argv += ["--file-flush-interval-msec", "50"]
        envoy.start()
        site = Site(folder, certs, ports, envoy, xds, collector, log_file, guard_admin)
        wait_until(lambda: site.get("/healthz").status == 200, 20, what="the edge answers")
        yield site
    finally:
        billing.stop()
        server.stop(grace=None)


def start_guard(procs: ProcessGroup, folder: Path, certs: Path, port: int) -> int:
    """The sample's guard (as tests/test_sample.py starts it); returns its admin port."""
    admin = free_port()
    guard = procs.spawn(
        "guard",
        xdsplane_argv(
            *("guard", "--address", f"127.0.0.1:{port}", "--policy", str(folder)),
            *("--admin-address", f"127.0.0.1:{admin}", "--log-format", "json"),
            *guard_tls_args(certs),
        ),
    ).start()
    wait_until(
        lambda: guard.ensure_alive() or http_get(admin, "/healthz").status == 200,
        20,
        what="the guard answers /healthz",
    )
    return admin


def _jti(token: str) -> str:
    payload = token.split(".")[1]
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    value: str = claims["jti"]
    return value


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex}"


def test_a_request_with_a_client_certificate_names_it(site: Site) -> None:
    path = _unique("/billing/admin/ops-")
    assert site.get(path, cert="alice").status == 200
    rec = site.record(path)
    assert rec["client_cert_uri_san"] == "spiffe://example.com/ops/alice", rec
    assert re.fullmatch(r"[0-9a-f]{64}", rec["client_cert_fingerprint"]), rec
    assert (rec["event"], rec["client_certificate"]) == ("request", "presented")
    assert rec["route"] == "billing/admin" and str(rec["status"]) == "200", rec
    assert rec["jwt_sub"] in EMPTY and rec["jti_hash"] in EMPTY, rec
    # timing: when, how long, and the upstream's part of it
    assert rec["time"].startswith("20"), rec
    assert int(rec["duration_ms"]) >= int(rec["upstream_ms"]) >= 0, rec


def test_the_file_line_and_the_record_have_one_schema(site: Site) -> None:
    path = _unique("/billing/admin/schema-")
    site.get(path, cert="alice")
    rec, line = site.record(path), site.line(path)
    assert set(rec) == set(line) == set(listeners.access_log_fields(_optional_host())), set(
        rec
    ) ^ set(line)
    for key in ("client_cert_uri_san", "client_cert_fingerprint", "route", "event", "time"):
        assert str(rec[key]) == str(line[key]), key


def test_a_request_without_a_certificate_is_the_missing_certificate_event(site: Site) -> None:
    path = _unique("/billing/no-cert-")
    assert site.get(path).status == 401  # no token either
    rec = site.record(path)
    assert (rec["event"], rec["client_certificate"]) == ("client_certificate_missing", "missing")
    assert rec["client_cert_uri_san"] in EMPTY, rec


def test_a_token_gives_sub_and_jti_hash_never_the_token(site: Site) -> None:
    token = jwt.token(site.certs, "alice")
    path = _unique("/billing/invoices-")
    assert site.get(path, token=token).status == 200
    rec = site.record(path)
    assert rec["jwt_sub"] == "alice", rec
    assert (
        rec["jti_hash"]
        == jti_hash(_jti(token))
        == hashlib.sha256(_jti(token).encode()).hexdigest()[:16]
    ), rec
    assert rec["guard_reason"] == "ok", rec  # the guard's first use of this jti

    # The same token again: refused by the guard (replay), and the record says why.
    again = _unique("/billing/invoices-replay-")
    assert site.get(again, token=token).status == 403
    refused = site.record(again)
    assert str(refused["status"]) == "403", refused
    assert refused["guard_reason"] == "replay", refused
    assert refused["jti_hash"] == rec["jti_hash"], refused
    assert "ext_authz" in refused["details"], refused

    # Attacker's test: the token, its signature and its jti are in no byte received.
    received = site.collector.all_bytes() + site.access_log.read_bytes()
    for secret in (token, token.split(".")[2], _jti(token)):
        assert secret.encode() not in received, secret[:12]
    assert b"PRIVATE KEY" not in received


def test_a_refusal_says_why(site: Site) -> None:
    # The admin route without a client certificate: refused by the access rules.
    path = _unique("/billing/admin/anon-")
    assert site.get(path).status == 403
    rec = site.record(path)
    assert rec["access_denied_by"] == "client-certificate", rec
    assert "rbac_access_denied" in rec["details"], rec
    # A token that does not verify: refused by jwt_authn, with its reason in details.
    forged = jwt.token(site.certs, "alice")[:-4] + "AAAA"
    bad = _unique("/billing/forged-")
    assert site.get(bad, token=forged).status == 401
    rec = site.record(bad)
    assert rec["details"].startswith("jwt_authn_access_denied"), rec
    assert rec["jwt_sub"] in EMPTY, rec
    assert forged.encode() not in site.collector.all_bytes()


def test_identity_headers_from_the_client_are_not_identity(site: Site) -> None:
    """A client's own x-jwt-sub, x-forwarded-client-cert or metadata-looking headers do not
    become the logged identity: the fields come from the connection and jwt_authn."""
    path = _unique("/billing/admin/spoof-")
    site.get(
        path,
        **{
            "x-jwt-sub": "root",
            "x-forwarded-client-cert": "URI=spiffe://example.com/ops/mallory",
            "x-guard-reason": "first_use",
        },
    )
    rec = site.record(path)
    assert rec["jwt_sub"] in EMPTY, rec
    assert "mallory" not in json.dumps(rec)
    assert rec["guard_reason"] in EMPTY, rec


def test_failed_handshakes_reach_the_collector(site: Site) -> None:
    ctx = client_context(site.certs)
    with socket.create_connection(("127.0.0.1", site.ports[8443]), timeout=5) as raw:
        local = raw.getsockname()[1]
        with pytest.raises((ssl.SSLError, OSError)):
            ctx.wrap_socket(raw, server_hostname="nobody.example.com").do_handshake()

    def found() -> dict[str, Any] | None:
        for _, attrs, _ in site.collector.records():
            if attrs.get("event") == "tls_handshake_failed" and str(
                attrs.get("client", "")
            ).endswith(f":{local}"):
                return attrs
        return None

    rec = wait_until(found, RECORD_SECONDS, what="the handshake failure's record")
    assert rec["sni"] == "nobody.example.com" and rec["listener"] == "https", rec


def test_records_come_over_mutual_tls_from_envoy(site: Site) -> None:
    """access_log.otlp.tls: Envoy verified the collector (sni, SAN guard) and presented its
    guard-client certificate, which the collector required."""
    path = _unique("/billing/admin/mtls-")
    site.get(path, cert="alice")
    site.record(path)
    with site.collector.lock:
        peers = list(site.collector.peers)
    assert peers and all(p == [b"spiffe://xdsplane/guard-client"] for p in peers), peers
    assert site.envoy.stat("cluster.xdsplane-otlp.ssl.handshake") >= 1


def test_records_carry_the_log_name(site: Site) -> None:
    path = _unique("/billing/admin/name-")
    site.get(path, cert="alice")
    site.record(path)
    names = {
        str(v)
        for resource, attrs, _ in site.collector.records()
        for k, v in {**resource, **attrs}.items()
        if k == "log_name"
    }
    assert names == {"billing-edge"}, names


def _optional_host() -> Any:
    from xdsplane.policy.model import Host

    return Host.model_validate(
        {
            "name": "h",
            "domains": ["h.example.com"],
            "certificate": "c",
            "client_certificate": "optional",
            "client_ca": "ca",
            "routes": [{"prefix": "/", "direct_response": {"status": 200}}],
        }
    )


def prometheus_names(text: str) -> set[str]:
    """Metric names of a Prometheus text exposition (samples and # TYPE lines)."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            names.add(line.split()[2])
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def test_every_dashboard_metric_exists(site: Site) -> None:
    """deploy/grafana/billing-edge.json reads only metric names that a real Envoy's
    /stats/prometheus, xdsplane serve's /metrics and the guard's /metrics expose, after
    traffic of every kind (a certificate, none, a token, a replay, a refusal)."""
    token = jwt.token(site.certs, "alice")
    site.get(_unique("/billing/admin/dash-"), cert="alice")
    site.get(_unique("/billing/admin/dash-"))
    site.get(_unique("/billing/dash-"), token=token)
    site.get(_unique("/billing/dash-"), token=token)
    site.get(_unique("/billing/dash-"))
    envoy = site.envoy.admin("/stats/prometheus")
    xds = http_get(site.server.admin_port, "/metrics")
    guard = http_get(site.guard_admin, "/metrics")
    assert envoy.status == xds.status == guard.status == 200
    known = prometheus_names(envoy.text) | prometheus_names(xds.text)
    known |= prometheus_names(guard.text)
    missing = sorted(dashboard_metric_names() - known)
    assert not missing, missing
    for pattern in dashboard_name_patterns():  # {__name__=~"..."}: each matches a name
        assert any(re.fullmatch(pattern, name) for name in known), pattern
