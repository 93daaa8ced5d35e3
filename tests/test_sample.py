"""The sample policy as shipped (snapshots/): valid, accepted by Envoy, served live, no NACK.

The sample listens on fixed ports (8443, 8080) and reaches billing on 9443; the test
serves a copy whose ports are free ones, with a PKI made by `xdsplane certs init`.
"""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

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
from tls_helpers import DemoUpstream, TlsConnection, https_get

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


def test_sample_validates_with_envoy(tmp_path: Path) -> None:
    folder, _ = sample_copy(tmp_path)
    r = subprocess.run(
        [sys.executable, "-m", "xdsplane", "validate", str(folder), "--envoy"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.envoy
@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
def test_sample_is_served_live_without_nack(
    delta: bool, procs: ProcessGroup, tmp_path: Path
) -> None:
    folder, ports = sample_copy(tmp_path)
    certs = tmp_path / "certs"
    billing = DemoUpstream(certs, ports[9443]).start()
    guard_admin = free_port()
    guard = procs.spawn(
        "guard",
        xdsplane_argv(
            *("guard", "--address", f"127.0.0.1:{ports[18081]}", "--policy", str(folder)),
            *("--admin-address", f"127.0.0.1:{guard_admin}", "--log-format", "json"),
            *guard_tls_args(certs),
        ),
    ).start()
    try:
        server = XdsServer(procs, folder).start()
        wait_until(
            lambda: guard.ensure_alive() or http_get(guard_admin, "/healthz").status == 200,
            20,
            what="the guard answers /healthz",
        )
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
    finally:
        billing.stop()
