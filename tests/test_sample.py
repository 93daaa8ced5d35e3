"""The sample policy as shipped (snapshots/): valid, accepted by Envoy, served live, no NACK.

The sample listens on fixed ports (8443, 8080) and reaches billing on 9443; the test
serves a copy whose ports are free ones, with a PKI made by `xdsplane certs init`.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

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
from test_guard import guard_tls_args
from tls_helpers import (
    DemoUpstream,
    TlsConnection,
    attach_to_report,
    client_context,
    https_get,
    process_group,
)

from xdsplane import jwt, pki

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "snapshots"


def sample_copy(root: Path) -> tuple[Path, dict[int, int]]:
    """snapshots/ under ``root``, certs beside it, the fixed ports replaced by free ones."""
    ports = {8443: free_port(), 8080: free_port(), 9443: free_port(), 18081: free_port()}
    folder = root / "snapshots"
    folder.mkdir()
    for f in SAMPLE.glob("*.yaml"):
        text = f.read_text()
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            text = text.replace(f"https_port: {old}", f"https_port: {new}")
        (folder / f.name).write_text(text)
    pki.init(root / "certs")
    return folder, ports


def bearer_get(port: int, ctx: ssl.SSLContext, path: str, token: str | None) -> Response:
    """GET on billing.example.com with ``Authorization: Bearer TOKEN`` (when given)."""
    conn = TlsConnection(port, ctx, "billing.example.com")
    return exchange(conn, path, {"Host": "billing.example.com", **bearer(token)})


def validate_with_envoy(folder: Path) -> None:
    """`xdsplane validate --envoy` accepts ``folder``: the policy checks and Envoy itself."""
    r = subprocess.run(
        [sys.executable, "-m", "xdsplane", "validate", str(folder), "--envoy"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


def test_sample_validates_with_envoy(tmp_path: Path) -> None:
    folder, _ = sample_copy(tmp_path)
    validate_with_envoy(folder)


def test_sample_with_a_text_access_log_validates_with_envoy(tmp_path: Path) -> None:
    """The text format's CEL fields of the optional host (event=, client_certificate=) are
    accepted by Envoy itself, as the JSON ones are in the live tests."""
    folder, _ = sample_copy(tmp_path)
    changed = 0
    for f in folder.glob("*.yaml"):
        text = f.read_text()
        if "format: json" in text:
            f.write_text(text.replace("format: json", "format: text"))
            changed += 1
    assert changed == 1
    validate_with_envoy(folder)


def start_sample_guard(procs: ProcessGroup, folder: Path, certs: Path, port: int) -> None:
    """The sample's guard on ``port`` over mTLS (the policy's guard.tls), reading the
    sample's limits from ``folder``; returns once it answers /healthz."""
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


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_sample_is_served_live_without_nack(
    delta: bool, procs: ProcessGroup, tmp_path: Path
) -> None:
    folder, ports = sample_copy(tmp_path)
    certs = tmp_path / "certs"
    billing = DemoUpstream(certs, ports[9443]).start()
    start_sample_guard(procs, folder, certs, ports[18081])
    try:
        server = XdsServer(procs, folder).start()
        envoy = Envoy(procs, tmp_path, "edge-1", server.xds_address, delta=delta).start()
        types = ("SDS", "CDS", "EDS", "ECDS", "LDS", "RDS")
        wait_until(lambda: server.settled("edge-1", types), 20, what="every type ACKed")
        for t in types:
            st = server.type_status("edge-1", t)
            assert st["nacks"] == 0 and st["last_nack"] == "", (t, st)
        assert envoy.dynamic_listener_names() == {"https", "http"}
        ctx = ssl.create_default_context(cafile=str(certs / "service-ca.crt"))
        health, tls = wait_until(
            lambda: https_get(ports[8443], ctx, "billing.example.com", "/healthz"),
            10,
            what="the edge answers",
        )
        assert health.status == 200, health
        assert tls.version == "TLSv1.3"
        # /billing/ needs a bearer token of the idp provider (`xdsplane token`).
        token = jwt.token(certs, "alice")
        answer = bearer_get(ports[8443], ctx, "/billing/invoices", token)
        assert answer.status == 200, answer
        assert "commonName=gateway" in answer.text  # Envoy reached billing over mTLS
        # ... once (replay protection), within a per-client budget (rate limit headers)
        assert answer.headers["x-ratelimit-limit"] == "60", answer.headers
        assert envoy.stat("cluster.xdsplane-guard.ssl.handshake") >= 1  # the guard: mTLS
        assert bearer_get(ports[8443], ctx, "/billing/invoices", token).status == 403
        assert bearer_get(ports[8443], ctx, "/billing/invoices", None).status == 401
        admin, _ = https_get(ports[8443], ctx, "billing.example.com", "/billing/admin/x")
        assert admin.status == 403  # no client certificate
        assert_missing_certificate_is_an_event(envoy, ports[8443], ctx)
    finally:
        billing.stop()


def assert_missing_certificate_is_an_event(envoy: Envoy, port: int, ctx: ssl.SSLContext) -> None:
    """billing.example.com is client_certificate: optional: a request without a certificate
    (refused here, 401: no token) is its own access-log event (the sample logs JSON to
    Envoy's stdout) and counts in the host's stat (docs/observability.md)."""
    counter = "http.https/billing.rbac.client_certificate_missing.shadow_denied"
    before = envoy.stat(counter)
    path = f"/billing/missing-certificate-{uuid.uuid4().hex}"
    assert bearer_get(port, ctx, path, None).status == 401
    wait_until(lambda: envoy.stat(counter) == before + 1, 10, what=counter)

    def logged() -> dict[str, object] | None:
        for line in envoy.proc.log_path.read_text(encoding="utf-8").splitlines():
            if line.startswith("{") and path in line:
                found: dict[str, object] = json.loads(line)
                return found
        return None

    # Envoy flushes its access-log files every 10 s by default: a generous ceiling.
    line = wait_until(logged, 60, what=f"the access-log line for {path}")
    assert (line["event"], line["client_certificate"]) == ("client_certificate_missing", "missing")
    assert line["status"] == 401 and line["route"] == "billing/billing", line


# -- the admin route cannot be walked around (issue #11, item 5) ----------------------------
#
# The admin route asks for an ops client certificate, /billing/ for a token. Every spelling
# that a billing service could read as its admin path must land on the admin route: with a
# valid token and no certificate it never reaches the service; with alice's (ops)
# certificate and no token it does, which only the admin route allows (/billing/ would
# answer 401). Each group mixes the trick with a bare or re-cased admin path, so each fails
# on the old translation (prefix: /billing/admin/, case-sensitive).

SPELLINGS = {
    "bare": ["/billing/admin", "/billing/admin/"],
    "upper-case": ["/billing/ADMIN/users", "/billing/ADMIN"],
    "mixed-case": ["/billing/Admin/users", "/billing/aDmIn"],
    "double-slash": ["/billing//admin/users", "//billing//Admin/users", "/billing//admin"],
    "percent-61": ["/billing/%61dmin/users", "/billing/%41DMIN/users", "/billing/%61dmin"],
    "percent-2F": ["/billing%2Fadmin/users", "/billing%2fADMIN/users", "/billing%2Fadmin"],
    "dot-segment": ["/billing/./admin/users", "/billing/./Admin/users", "/billing/./admin"],
    "dot-dot": ["/billing/x/../admin/users", "/billing/x/../ADMIN/users", "/billing/x/../admin"],
    "backslash": ["/billing\\admin/users", "/billing/Admin\\users", "/billing%5Cadmin"],
}
# Path parameters are refused (400) whoever asks: with or without a certificate.
PATH_PARAMETERS = [
    "/billing/admin;x=1/users",
    "/billing/ADMIN;x=1/users",
    "/billing;x=1/admin/users",
    "/billing/admin;jsessionid=1",
    "/billing/admin%3Bx=1/users",
    "/billing/invoices;x=1",
]


@dataclass
class SampleEdge:
    port: int
    certs: Path
    billing: DemoUpstream
    procs: ProcessGroup

    def get(self, path: str, token: bool, cert: str | None) -> tuple[Response, list[str]]:
        """GET ``path`` (plus a unique query) with a fresh token of alice or none, with
        client certificate ``cert`` or none; follows one redirect as a client would.
        Returns the answer and the paths the billing service received for it."""
        probe = f"probe={uuid.uuid4().hex}"
        ctx = client_context(self.certs, cert)
        target = f"{path}{'&' if '?' in path else '?'}{probe}"
        answer = bearer_get(
            self.port, ctx, target, jwt.token(self.certs, "alice") if token else None
        )
        if answer.status in (301, 302, 307, 308):
            location = urlsplit(answer.headers["location"])
            assert probe in location.query, answer
            again = f"{location.path}?{location.query}"
            answer = bearer_get(
                self.port, ctx, again, jwt.token(self.certs, "alice") if token else None
            )
        return answer, [p for p in self.billing.received if probe in p]


# The module's processes serve most of its 38 tests, ~60 s together here; 15 minutes
# covers a machine many times slower (start-up included) before the watchdog kills them.
MODULE_SECONDS = 900.0


@pytest.fixture(scope="module")
def sample_edge(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SampleEdge]:
    """The sample as shipped (free ports), its guard, xdsplane serve, Envoy and billing."""
    root = tmp_path_factory.mktemp("sample-paths")
    with process_group(root / "logs", max_seconds=MODULE_SECONDS) as procs:
        folder, ports = sample_copy(root)
        certs = root / "certs"
        billing = DemoUpstream(certs, ports[9443]).start()
        try:
            start_sample_guard(procs, folder, certs, ports[18081])
            server = XdsServer(procs, folder).start()
            Envoy(procs, root, "edge-1", server.xds_address).start()
            edge = SampleEdge(ports[8443], certs, billing, procs)
            wait_until(
                lambda: edge.get("/billing/invoices", token=True, cert=None)[0].status == 200,
                30,
                what="the sample edge serves /billing/ with a token",
            )
            yield edge
        finally:
            billing.stop()


@pytest.fixture
def _sample_logs(request: pytest.FixtureRequest, sample_edge: SampleEdge) -> None:
    attach_to_report(request, sample_edge.procs)


@pytest.mark.envoy
@pytest.mark.usefixtures("_sample_logs")
@pytest.mark.parametrize("trick", SPELLINGS)
def test_admin_spellings_never_reach_billing_without_a_certificate(
    sample_edge: SampleEdge, trick: str
) -> None:
    for path in SPELLINGS[trick]:
        answer, received = sample_edge.get(path, token=True, cert=None)
        assert received == [], (path, "reached the billing service", answer)
        assert answer.status == 403, (path, answer)  # the admin route's certificate check


@pytest.mark.envoy
@pytest.mark.usefixtures("_sample_logs")
@pytest.mark.parametrize("trick", SPELLINGS)
def test_admin_spellings_reach_the_admin_route_with_an_ops_certificate(
    sample_edge: SampleEdge, trick: str
) -> None:
    for path in SPELLINGS[trick]:
        # No token: the /billing/ route would answer 401, only the admin route serves this.
        answer, received = sample_edge.get(path, token=False, cert="alice")
        assert answer.status == 200, (path, answer)
        assert len(received) == 1, (path, received)
        # The service reads the path that was matched: normalized, in the client's case.
        seen = received[0].split("?")[0]
        assert seen.lower().startswith("/billing/admin"), (path, seen)
        assert not any(t in seen for t in ("//", "/./", "/../", "%", "\\")), (path, seen)


@pytest.mark.envoy
@pytest.mark.usefixtures("_sample_logs")
@pytest.mark.parametrize("path", PATH_PARAMETERS)
@pytest.mark.parametrize("cert", [None, "alice"], ids=["no-cert", "ops-cert"])
def test_path_parameters_are_refused(sample_edge: SampleEdge, path: str, cert: str | None) -> None:
    answer, received = sample_edge.get(path, token=True, cert=cert)
    assert received == [], (path, "reached the billing service", answer)
    assert answer.status == 400, (path, answer)


@pytest.mark.envoy
@pytest.mark.usefixtures("_sample_logs")
@pytest.mark.parametrize(
    "path", ["/billing/invoices", "/billing/administrator", "/billing/admins/x", "/billing/"]
)
def test_billing_traffic_still_needs_only_a_token(sample_edge: SampleEdge, path: str) -> None:
    """Paths that only start like the admin path are not admin paths: the token route."""
    answer, received = sample_edge.get(path, token=True, cert=None)
    assert answer.status == 200, (path, answer)
    assert len(received) == 1 and received[0].startswith(path), received
    assert sample_edge.get(path, token=False, cert=None)[0].status == 401


@pytest.mark.envoy
@pytest.mark.usefixtures("_sample_logs")
def test_the_query_string_may_hold_a_semicolon(sample_edge: SampleEdge) -> None:
    answer, received = sample_edge.get("/billing/invoices?filter=a;b", token=True, cert=None)
    assert answer.status == 200, answer
    assert len(received) == 1 and received[0].startswith("/billing/invoices?filter=a;b")
