"""TLS done right, end to end: a real Envoy 1.40 serving the billing edge policy (optional
and strict client certificates on one port, upstream mutual TLS, SDS rotation, JSON access
log), checked with TLS clients built on Python's ssl module.

One PKI, one ``xdsplane serve``, one Envoy and one mTLS demo upstream are shared by the
module (module-scoped fixtures), in any order: the tests that change a file (the edge
certificate, a CRL) put it back or leave it valid; a test that stops a process (the
upstream) has an edge of its own.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
import re
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import (
    ProcessGroup,
    holds_for,
    http_get,
    wait_until,
    xdsplane_argv,
)
from tls_helpers import (
    BILLING,
    LISTENER_CHURN,
    NODE,
    STRICT,
    Edge,
    Looper,
    StatSampler,
    TlsConnection,
    assert_no_key_material,
    attach_to_report,
    days_ago,
    file_serial,
    handshake,
    https_get,
    listener_churn,
    no_http_answer,
    process_group,
    start_edge,
    tls11_context,
    why_no_local_tls11,
    write_crl,
)

from xdsplane import pki

pytestmark = [
    pytest.mark.envoy,  # conftest: skipped without Envoy 1.40, failed in CI
]

ALICE_URI = "spiffe://example.com/ops/alice"


# The module's processes serve 39 tests, ~60 s together here; 15 minutes covers a machine
# many times slower (start-up included) before the watchdog kills them.
MODULE_SECONDS = 900.0


@pytest.fixture(scope="module")
def group(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ProcessGroup]:
    with process_group(tmp_path_factory.mktemp("tls-e2e-logs"), max_seconds=MODULE_SECONDS) as g:
        yield g


@pytest.fixture(scope="module")
def edge(group: ProcessGroup, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    e = start_edge(group, tmp_path_factory.mktemp("tls-e2e"))
    yield e
    e.upstream.stop()


@pytest.fixture
def own_edge(procs: ProcessGroup, tmp_path: Path) -> Iterator[Edge]:
    """An edge of its own (PKI, server, Envoy, upstream), for a test that stops a process."""
    e = start_edge(procs, tmp_path / "own-edge")
    yield e
    e.upstream.stop()


@pytest.fixture(autouse=True)
def _report_logs(request: pytest.FixtureRequest, group: ProcessGroup) -> None:
    attach_to_report(request, group)


def ssl_stats(edge: Edge) -> dict[str, int]:
    """The https listener's TLS counters, by short name (handshake, fail_verify_error...)."""
    prefix = f"listener.127.0.0.1_{edge.layout.https_port}.ssl."
    found = edge.envoy.stats("^" + re.escape(prefix))
    return {k[len(prefix) :]: v for k, v in found.items()}


def echoed(r: Any) -> dict[str, Any]:
    """What the demo upstream saw (it answers with JSON)."""
    assert r.status == 200, r
    data: dict[str, Any] = json.loads(r.body)
    return data


def cert_of(edge: Edge, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((edge.certs / f"{name}.crt").read_bytes())


# -- the optional host ------------------------------------------------------------------------


def test_optional_host_accepts_no_certificate_and_forwards_a_valid_one(edge: Edge) -> None:
    """billing.example.com asks for a certificate without requiring one; when a client
    presents a valid one, the upstream is told who it was (x-forwarded-client-cert)."""
    plain = echoed(edge.get("/billing/invoices"))
    assert plain["path"] == "/billing/invoices"
    # No certificate, no identity.
    assert "x-forwarded-client-cert" not in plain["headers"]

    seen = echoed(edge.get("/billing/invoices", cert="alice"))
    xfcc = seen["headers"]["x-forwarded-client-cert"]
    alice = cert_of(edge, "alice")
    assert 'Subject="CN=alice,O=xdsplane development"' in xfcc, xfcc
    assert f"URI={ALICE_URI}" in xfcc, xfcc
    digest = hashlib.sha256(alice.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert f"Hash={digest}" in xfcc, xfcc


def test_xfcc_from_the_client_is_replaced(edge: Edge) -> None:
    """A client-sent x-forwarded-client-cert never reaches the upstream as it was sent."""
    forged = 'Hash=00;Subject="CN=root";URI=spiffe://example.com/ops/root'
    for cert in (None, "alice"):
        conn = TlsConnection(edge.layout.https_port, edge.ctx(cert), BILLING)
        try:
            conn.request(
                "GET",
                "/billing/who",
                headers={"Host": BILLING, "x-forwarded-client-cert": forged},
            )
            r = conn.getresponse()
            seen = json.loads(r.read())
        finally:
            conn.close()
        got = seen["headers"].get("x-forwarded-client-cert", "")
        assert "CN=root" not in got, (cert, got)
        assert ("CN=alice" in got) == (cert == "alice"), (cert, got)


@pytest.mark.parametrize("cert", ["mallory", "gateway"])
def test_optional_host_refuses_a_certificate_from_an_untrusted_ca(edge: Edge, cert: str) -> None:
    """Optional does not mean unchecked: a certificate that does not chain to client-ca
    (mallory: a self-signed rogue CA; gateway: a real certificate of service-ca) ends the
    connection before any HTTP answer, and Envoy counts a verification failure."""
    before = ssl_stats(edge).get("fail_verify_error", 0)
    how = no_http_answer(edge.layout.https_port, edge.ctx(cert), BILLING, "/billing/invoices")
    assert how  # the reason, for the report
    wait_until(
        lambda: ssl_stats(edge)["fail_verify_error"] > before,
        5,
        what="Envoy counts the failed verification (ssl.fail_verify_error)",
    )
    # The same client without its certificate is served: only the bad certificate is refused.
    assert edge.get("/billing/invoices").status == 200


def test_admin_routes_need_an_ops_certificate(edge: Edge) -> None:
    """/billing/admin/ (require_client_certificate + allow_client_sans spiffe://.../ops/*):
    no certificate -> 403, a valid certificate with another SAN (bob, dev) -> 403, alice
    (ops) -> 200, and the upstream sees who she is."""
    nobody = edge.get("/billing/admin/audit")
    assert nobody.status == 403, nobody
    bob = edge.get("/billing/admin/audit", cert="bob")
    assert bob.status == 403, bob
    # bob's certificate is valid: the host serves him elsewhere, only the admin SAN rule stops him.
    assert "CN=bob" in echoed(edge.get("/billing/invoices", cert="bob"))["headers"].get(
        "x-forwarded-client-cert", ""
    )
    seen = echoed(edge.get("/billing/admin/audit", cert="alice"))
    assert seen["path"] == "/billing/admin/audit"
    assert f"URI={ALICE_URI}" in seen["headers"]["x-forwarded-client-cert"]


@pytest.mark.parametrize(
    "path",
    [
        "//billing/admin/audit",
        "/billing/./admin/audit",
        "/billing/x/../admin/audit",
        "/billing/%61dmin/audit",
        # The admin route asks at least what the route after it asks (nothing), so it
        # matches widely by default: any case, and its prefix /billing/admin/ covers the
        # bare /billing/admin (issue #11).
        "/billing/admin",
        "/billing/ADMIN/audit",
        "/billing/Admin/audit",
        "/billing//Admin",
        "/billing/%41dmin/audit",
    ],
)
def test_admin_rule_is_not_bypassed_by_path_tricks(edge: Edge, path: str) -> None:
    """Paths are normalized before routing (normalize_path, merge_slashes): these land on
    the admin route, so without a certificate they get 403, and with alice's the upstream
    serves them."""
    r = edge.get(path)
    assert r.status == 403, (path, r)
    assert echoed(edge.get(path, cert="alice"))["headers"]["x-forwarded-client-cert"]


@pytest.mark.parametrize(
    "path", ["/billing/admin;x=1/audit", "/billing;x/admin/audit", "/billing/admin%3bx/audit"]
)
@pytest.mark.parametrize("cert", [None, "alice"], ids=["no-cert", "ops-cert"])
def test_path_parameters_get_400(edge: Edge, path: str, cert: str | None) -> None:
    """Tomcat, Spring and Jetty read /billing/admin;x=1/audit as /billing/admin/audit;
    Envoy would match it as written. The host's default path_parameters: reject answers
    400 before any route."""
    r = edge.get(path, cert=cert)
    assert r.status == 400, (path, r)
    assert b"path parameters" in r.body, r


@pytest.mark.parametrize("path", ["/billing/admin%2Faudit", "/billing/admin%2faudit"])
def test_admin_rule_is_not_bypassed_by_an_escaped_slash(edge: Edge, path: str) -> None:
    """An upstream that decodes %2F before routing (many frameworks do) would read
    /billing/admin/audit: Envoy must not forward it under the non-admin route. Refused
    (400/403) or redirected to the unescaped path is right; 200 from upstream is not."""
    r = edge.get(path)
    if 300 <= r.status < 400:
        assert r.headers["location"].endswith("/billing/admin/audit"), r
    else:
        assert r.status in (400, 403, 404), (path, r)


# -- the strict host --------------------------------------------------------------------------


def test_strict_host_requires_a_certificate(edge: Edge) -> None:
    """mtls.billing.example.com: no certificate, no HTTP (the handshake fails, or with
    TLS 1.3 the connection ends at the first read); a valid certificate is served."""
    before = ssl_stats(edge).get("fail_verify_no_cert", 0)
    how = no_http_answer(edge.layout.https_port, edge.ctx(), STRICT, "/anything")
    assert how
    wait_until(
        lambda: ssl_stats(edge)["fail_verify_no_cert"] > before,
        5,
        what="Envoy counts a handshake without the required certificate",
    )
    # An untrusted certificate fares no better than none.
    no_http_answer(edge.layout.https_port, edge.ctx("mallory"), STRICT, "/anything")

    seen = echoed(edge.get("/anything", sni=STRICT, cert="alice"))
    assert seen["path"] == "/anything"
    assert f"URI={ALICE_URI}" in seen["headers"]["x-forwarded-client-cert"]
    # bob is a valid client too: the strict host has no SAN rule.
    assert edge.get("/anything", sni=STRICT, cert="bob").status == 200


@pytest.mark.parametrize("cert", [None, "alice"])
def test_host_header_must_match_the_sni(edge: Edge, cert: str | None) -> None:
    """On a connection made with the optional host's SNI, a request for the strict host
    gets 421 (with or without a certificate): the strict host's routes are not reachable
    through the optional host's TLS context. The connection itself stays usable."""
    conn = TlsConnection(edge.layout.https_port, edge.ctx(cert), BILLING)
    try:
        assert conn.get("/billing/invoices").status == 200
        misdirected = conn.get("/anything", host=STRICT)
        assert misdirected.status == 421, misdirected
        with_port = conn.get("/anything", host=f"{STRICT}:{edge.layout.https_port}")
        assert with_port.status == 421, with_port
        assert conn.get("/billing/invoices").status == 200
    finally:
        conn.close()
    # And the other way round: the strict connection only serves the strict host.
    if cert is not None:
        conn = TlsConnection(edge.layout.https_port, edge.ctx(cert), STRICT)
        try:
            assert conn.get("/billing/invoices", host=BILLING).status == 421
            assert conn.get("/anything").status == 200
        finally:
            conn.close()


@pytest.mark.parametrize(
    "version", [ssl.TLSVersion.TLSv1_3, ssl.TLSVersion.TLSv1_2], ids=["tls1.3", "tls1.2"]
)
@pytest.mark.parametrize("sni", [BILLING, STRICT])
def test_no_session_resumption_on_client_certificate_hosts(
    edge: Edge, sni: str, version: ssl.TLSVersion
) -> None:
    """Envoy does not re-validate the client certificate of a resumed session, so hosts
    that ask for one offer neither tickets (stateless) nor a session cache (stateful):
    a second connection offering the first one's session gets a full handshake."""
    ctx = edge.ctx("alice", maximum=version)
    first = TlsConnection(edge.layout.https_port, ctx, sni)
    try:
        path = "/billing/invoices" if sni == BILLING else "/anything"
        assert first.get(path).status == 200  # reading the answer also reads any ticket
        session = first.tls.session
    finally:
        first.close()
    assert session is not None
    second = TlsConnection(edge.layout.https_port, ctx, sni)
    try:
        raw = socket.create_connection(("127.0.0.1", edge.layout.https_port), 5)
        second.sock = ctx.wrap_socket(raw, server_hostname=sni, session=session)
        assert not second.tls.session_reused, f"{sni} resumed a {version.name} session"
        assert second.get(path).status == 200
    finally:
        second.close()


# -- TLS versions and the HTTP listener --------------------------------------------------------


def test_tls_1_1_is_refused(edge: Edge) -> None:
    """tls.min_version 1.2: a client that can only speak TLS 1.1 gets no connection."""
    reason = why_no_local_tls11(edge.certs)
    if reason is not None:
        pytest.skip(reason)
    with pytest.raises(ssl.SSLError) as refused:
        handshake(edge.layout.https_port, tls11_context(edge.certs), BILLING)
    # The server said no (protocol_version alert); the client was willing.
    assert "PROTOCOL_VERSION" in str(refused.value).upper(), refused.value


def test_tls_1_3_by_default_and_1_2_accepted(edge: Edge) -> None:
    r, info = https_get(edge.layout.https_port, edge.ctx(), BILLING, "/healthz")
    assert r.status == 200 and r.text == "ok"
    assert info.version == "TLSv1.3"
    r, info = https_get(
        edge.layout.https_port, edge.ctx(maximum=ssl.TLSVersion.TLSv1_2), BILLING, "/healthz"
    )
    assert r.status == 200
    assert info.version == "TLSv1.2"
    # The edge certificate is the one the policy names, valid for the host name (the
    # context checks the host name against the SNI).
    assert info.serial == file_serial(edge.certs / "edge.crt")


def test_http_listener_redirects_to_https_on_the_right_port(edge: Edge) -> None:
    r = http_get(edge.layout.http_port, "/billing/invoices?month=3", host=BILLING)
    assert r.status == 301, r
    location = r.headers["location"]
    assert location == f"https://{BILLING}:{edge.layout.https_port}/billing/invoices?month=3"
    # Following it (SNI and Host from the location) reaches the billing service.
    seen = echoed(edge.get("/billing/invoices?month=3"))
    assert seen["path"] == "/billing/invoices?month=3"


# -- access log -------------------------------------------------------------------------------


def _log_lines(edge: Edge) -> list[dict[str, Any]]:
    text = edge.layout.access_log.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _log_for(edge: Edge, path: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        found = [line for line in _log_lines(edge) if line.get("path") == path]
        return found[-1] if found else None

    return wait_until(find, 10, what=f"access log line for {path}")


def _none(value: object) -> bool:
    return value in (None, "-", "")


def test_access_log_shows_the_client_certificate(edge: Edge) -> None:
    tag = str(time.monotonic_ns())
    with_cert = f"/billing/log-{tag}-alice"
    without = f"/billing/log-{tag}-anonymous"
    refused = f"/billing/admin/log-{tag}-bob"
    strict = f"/log-{tag}-strict"
    assert edge.get(with_cert, cert="alice").status == 200
    assert edge.get(without).status == 200
    assert edge.get(refused, cert="bob").status == 403
    assert edge.get(strict, sni=STRICT, cert="alice").status == 200

    alice = cert_of(edge, "alice")
    line = _log_for(edge, with_cert)
    assert "CN=alice" in line["client_cert_subject"], line
    assert line["client_cert_uri_san"] == ALICE_URI, line
    assert (line["client_cert_presented"], line["client_cert_validated"]) == ("true", "true")
    fingerprint = hashlib.sha256(alice.public_bytes(serialization.Encoding.DER)).hexdigest()
    assert line["client_cert_fingerprint"].replace(":", "").lower() == fingerprint, line
    expiry = datetime.datetime.fromisoformat(line["client_cert_expiry"].replace("Z", "+00:00"))
    assert abs((expiry - alice.not_valid_after_utc).total_seconds()) < 1, line
    assert line["tls_version"] == "TLSv1.3"
    assert line["sni"] == BILLING
    assert line["route"] == "billing/billing"
    assert line["upstream"] == "billing"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], int) and line["duration_ms"] >= 0, line

    anon = _log_for(edge, without)
    for key in (
        "client_cert_subject",
        "client_cert_uri_san",
        "client_cert_fingerprint",
        "client_cert_expiry",
    ):
        assert _none(anon[key]), (key, anon)
    assert anon["tls_version"] == "TLSv1.3" and anon["sni"] == BILLING
    assert (anon["client_cert_presented"], anon["client_cert_validated"]) == ("false", "false")
    assert anon["route"] == "billing/billing" and anon["status"] == 200

    bob = _log_for(edge, refused)
    assert bob["status"] == 403 and bob["route"] == "billing/admin", bob
    assert bob["client_cert_uri_san"] == "spiffe://example.com/dev/bob", bob

    s = _log_for(edge, strict)
    assert s["sni"] == STRICT and s["route"] == "billing-strict/all", s
    assert "CN=alice" in s["client_cert_subject"], s


# -- failed handshakes in the access log (the TLS floor, docs/policy.md) -----------------------


def _handshake_failures(edge: Edge) -> list[dict[str, Any]]:
    return [line for line in _log_lines(edge) if line.get("event") == "tls_handshake_failed"]


def _failure_from(edge: Edge, local_port: int) -> dict[str, Any]:
    client = f"127.0.0.1:{local_port}"

    def find() -> dict[str, Any] | None:
        return next((x for x in _handshake_failures(edge) if x["client"] == client), None)

    return wait_until(find, 10, what=f"a tls_handshake_failed line for {client}")


def _refused(edge: Edge, ctx: ssl.SSLContext, sni: str) -> tuple[int, str]:
    """A TLS connection that must fail: (its local port, how it failed). With TLS 1.3 a
    refused client certificate shows on the first read, after the client's handshake."""
    raw = socket.create_connection(("127.0.0.1", edge.layout.https_port), 5)
    local_port = raw.getsockname()[1]
    try:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            tls.sendall(f"GET /healthz HTTP/1.1\r\nHost: {sni}\r\n\r\n".encode())
            data = tls.recv(64)
    except (ssl.SSLError, OSError) as e:
        return local_port, repr(e)
    finally:
        raw.close()
    assert not data.startswith(b"HTTP/"), f"{sni}: an HTTP answer on a connection that must fail"
    return local_port, f"closed ({data!r})"


def _tls11_failure(edge: Edge, started: datetime.datetime) -> dict[str, Any]:
    """The log line of a client offering TLS 1.1 only: Python's ssl when its OpenSSL can
    still speak TLS 1.1, else ``openssl s_client -tls1_1``."""
    if why_no_local_tls11(edge.certs) is None:
        port, how = _refused(edge, tls11_context(edge.certs), BILLING)
        assert "PROTOCOL_VERSION" in how.upper(), how
        return _failure_from(edge, port)
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no TLS 1.1 client here: this OpenSSL refuses it and no openssl command")
    argv = [openssl, "s_client", "-connect", f"127.0.0.1:{edge.layout.https_port}", "-tls1_1"]
    done = subprocess.run(
        [*argv, "-servername", BILLING, "-cipher", "DEFAULT:@SECLEVEL=0"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode != 0, done.stdout

    def find() -> dict[str, Any] | None:
        for x in _handshake_failures(edge):
            when = datetime.datetime.fromisoformat(x["time"].replace("Z", "+00:00"))
            if "UNSUPPORTED_PROTOCOL" in (x["reason"] or "") and when >= started:
                return x
        return None

    return wait_until(find, 10, what="the tls_handshake_failed line of openssl -tls1_1")


def test_failed_handshakes_are_logged_with_their_reason(edge: Edge) -> None:
    """Each refused handshake leaves one line in the access log file (the listener's log):
    when, from where, for which SNI, and BoringSSL's reason; a good handshake leaves none."""
    started = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    good = TlsConnection(edge.layout.https_port, edge.ctx(), BILLING)
    try:
        good.connect()
        good_port = good.tls.getsockname()[1]
        assert good.get("/healthz", close=True).status == 200
    finally:
        good.close()

    old = _tls11_failure(edge, started)
    assert old["sni"] == BILLING and old["listener"] == "https", old
    assert "UNSUPPORTED_PROTOCOL" in old["reason"], old

    # Envoy's default suites are all AEAD with forward secrecy: a CBC-only client is refused.
    cbc_only = edge.ctx(maximum=ssl.TLSVersion.TLSv1_2)
    cbc_only.set_ciphers("ECDHE-ECDSA-AES128-SHA")
    port, how = _refused(edge, cbc_only, BILLING)
    line = _failure_from(edge, port)
    assert "NO_SHARED_CIPHER" in line["reason"], (line, how)
    assert line["sni"] == BILLING, line

    # A client certificate from an untrusted CA on the host that requires one.
    port, how = _refused(edge, edge.ctx("mallory"), STRICT)
    line = _failure_from(edge, port)
    assert "CERTIFICATE_VERIFY_FAILED" in line["reason"], (line, how)
    assert line["sni"] == STRICT, line

    # A server name no host serves: no filter chain (NR), no certificate to offer.
    port, how = _refused(edge, edge.ctx(), "nobody.example.com")
    line = _failure_from(edge, port)
    assert line["flags"] == "NR" and line["sni"] == "nobody.example.com", (line, how)

    for x in (old, line):
        when = datetime.datetime.fromisoformat(x["time"].replace("Z", "+00:00"))
        assert started <= when <= datetime.datetime.now(datetime.UTC), x
    # The good connection closed before the refused ones began; their lines are there, its
    # is not: a successful handshake is not a failure.
    assert not [x for x in _handshake_failures(edge) if x["client"] == f"127.0.0.1:{good_port}"]


# -- upstream mutual TLS ----------------------------------------------------------------------


def _cluster_ssl(edge: Edge) -> dict[str, int]:
    found = edge.envoy.stats(r"^cluster\.billing\.ssl\.(fail_verify_san|fail_verify_error)$")
    return {k.rsplit(".", 1)[1]: v for k, v in found.items()}


def test_upstream_mtls_and_refusing_an_impostor(own_edge: Edge) -> None:
    """Envoy presents gateway-client to the billing service (which requires a certificate
    of service-ca) and accepts only a service-ca certificate naming billing.internal:
    an upstream with a certificate for another name, or from another CA, gets no request
    (503), never a silent pass. It restarts the upstream: on an edge of its own."""
    edge = own_edge
    seen = echoed(edge.get("/billing/invoices"))
    assert "commonName=gateway" in (seen["peer_certificate"] or ""), seen
    assert seen["service"] == "billing-billing"
    # min_version "1.3" upstream (an UpstreamTlsContext allows at most 1.2 unless told).
    versions = edge.envoy.stats(r"^cluster\.billing\.ssl\.versions\.")
    assert versions.get("cluster.billing.ssl.versions.TLSv1.3", 0) > 0, versions
    assert set(versions) == {"cluster.billing.ssl.versions.TLSv1.3"}, versions

    pki.issue(edge.certs, "impostor", "service-ca", dns=["other.internal"], usage=["server"])
    pki.issue(edge.certs, "rogue-billing", "rogue-ca", dns=["billing.internal"], usage=["server"])
    try:
        for cert, counter in (
            ("impostor", "fail_verify_san"),
            ("rogue-billing", "fail_verify_error"),
        ):
            before = _cluster_ssl(edge)[counter]
            edge.upstream.restart(cert)
            r = edge.get("/billing/invoices")
            assert r.status == 503, (cert, r)
            assert b"service" not in r.body, (cert, r)  # nothing came from the impostor
            assert _cluster_ssl(edge)[counter] > before, (cert, _cluster_ssl(edge))
    finally:
        edge.upstream.restart("billing")
    wait_until(
        lambda: edge.get("/billing/invoices").status == 200, 10, what="the real service again"
    )


# -- rotation under load ----------------------------------------------------------------------


def new_handshakes_get(edge: Edge, serial: int) -> bool:
    return handshake(edge.layout.https_port, edge.ctx(), BILLING).serial == serial


def flowing(loopers: list[Looper], above: int) -> bool:
    return sum(lp.ok for lp in loopers) > above


def test_rotation_under_load_keeps_connections_and_listeners(edge: Edge) -> None:
    """Ten rotations of the edge certificate (new key and serial each time) while four
    kept-alive connections send requests: no request fails, no connection is replaced,
    new handshakes get each new certificate, and Envoy never modifies, drains or removes a
    listener: only the SDS secret moves."""
    churn = listener_churn(edge)
    assert churn == dict.fromkeys(LISTENER_CHURN, 0), churn
    sds_before = edge.secret_stat("edge-server")
    stop = threading.Event()
    loopers = [Looper(edge, i, stop) for i in range(4)]
    sampler = StatSampler(edge, stop)
    original = {lp.first_serial for lp in loopers}
    assert original == {file_serial(edge.certs / "edge.crt")}
    served: list[int] = []
    for t in [*loopers, sampler]:
        t.start()
    try:
        for _ in range(10):
            progress = sum(lp.ok for lp in loopers)
            pki.rotate(edge.certs, "edge")  # key first, then certificate, each atomically
            new = file_serial(edge.certs / "edge.crt")
            wait_until(
                partial(new_handshakes_get, edge, new),
                10,
                what=f"new handshakes get serial {new:x}",
            )
            served.append(new)
            wait_until(
                partial(flowing, loopers, progress + len(loopers)),
                10,
                what="requests keep flowing on the kept-alive connections",
            )
    finally:
        stop.set()
        for t in [*loopers, sampler]:
            t.join(10)
    try:
        assert len(set(served)) == 10 and not set(served) & original
        for lp in loopers:
            assert lp.failures == [], (lp.name, lp.failures[:5])
            assert lp.conn.connects == 1, f"{lp.name} reconnected {lp.conn.connects - 1} times"
            # Same TLS session from start to end: it still shows the first certificate.
            assert lp.current_serial() == lp.first_serial
            assert lp.ok > 10
            assert lp.conn.get(lp.path).status == 200  # and it still works
    finally:
        for lp in loopers:
            lp.conn.close()
    assert sampler.peak == dict.fromkeys(LISTENER_CHURN, 0), sampler.peak
    after = listener_churn(edge)
    assert after == dict.fromkeys(LISTENER_CHURN, 0), after
    assert edge.secret_stat("edge-server") >= sds_before + 10
    assert edge.secret_stat("edge-server", "update_rejected") == 0
    # The control plane ends on the last certificate with no error pending.
    status = edge.server.status()
    assert status["reload"]["errors"] == []
    (cert,) = [c for c in status["certificates"] if c["secret"] == "edge-server"]
    assert int(cert["serial"], 16) == served[-1]


def test_a_rotation_seen_half_way_is_not_a_reload_failure(edge: Edge, tmp_path: Path) -> None:
    """pki.rotate (and `xdsplane certs rotate`) renames the new key into place, then the
    new certificate. A watcher that reloads between the two renames sees a key that does
    not match the certificate. That is a rotation in progress, not a broken secret: it
    should not be logged as a failed reload nor counted in /status (monitoring alerts on
    reload failures would fire on every routine rotation). Deterministic version of what
    happens in about half of the rotations of the test above."""
    staging = tmp_path / "staging"
    shutil.copytree(edge.certs, staging)
    pki.rotate(staging, "edge")
    new = file_serial(staging / "edge.crt")
    before = edge.server.status()["reload"]
    log = edge.server.proc.log_path
    errors_before = log.read_text(encoding="utf-8").count("reload failed")

    pki.write_atomic(edge.certs / "edge.key", (staging / "edge.key").read_bytes(), 0o600)
    # Give the watcher time to look at the half-rotated pair (it reacts within ~10 ms);
    # far longer than any real rotation leaves between its two renames.
    holds_for(
        lambda: edge.server.status()["reload"]["failures"] == before["failures"],
        1.0,
        interval=0.01,
        what="no reload failure while the key is new and the certificate old",
    )
    pki.write_atomic(edge.certs / "edge.crt", (staging / "edge.crt").read_bytes())
    wait_until(
        lambda: handshake(edge.layout.https_port, edge.ctx(), BILLING).serial == new,
        10,
        what="the rotated certificate is served",
    )
    after = edge.server.status()["reload"]
    assert after["errors"] == []
    assert after["failures"] == before["failures"], after
    assert log.read_text(encoding="utf-8").count("reload failed") == errors_before


def test_revoked_client_certificate_is_refused(edge: Edge) -> None:
    """client-ca's CRL is served with the CA: once it lists a certificate, that client's
    handshakes fail on both hosts while the others' still succeed."""
    pki.issue(edge.certs, "carol", "client-ca", uris=["spiffe://example.com/ops/carol"])
    assert edge.get("/billing/admin/x", cert="carol").status == 200
    before = edge.secret_stat("client-ca")
    write_crl(edge.certs, "client-ca", revoked=["carol"])
    wait_until(lambda: edge.secret_stat("client-ca") > before, 10, what="new CRL pushed")

    def refused() -> bool:
        try:
            no_http_answer(edge.layout.https_port, edge.ctx("carol"), BILLING, "/billing/x")
        except AssertionError:
            return False
        return True

    wait_until(refused, 10, what="carol refused on the optional host")
    no_http_answer(edge.layout.https_port, edge.ctx("carol"), STRICT, "/x")
    assert edge.get("/billing/admin/x", cert="alice").status == 200
    assert edge.get("/x", sni=STRICT, cert="alice").status == 200
    assert edge.get("/billing/x").status == 200
    # A new CA secret (the CRL) changes no listener either.
    churn = listener_churn(edge)
    assert churn == dict.fromkeys(LISTENER_CHURN, 0), churn


def test_an_expired_crl_is_not_served(edge: Edge) -> None:
    """A CRL past its next update makes Envoy refuse every client certificate
    (CRL_HAS_EXPIRED): the strict host goes dark and the admin routes too. Like an expired
    certificate, it must be refused as a bad secret file while the last good CRL keeps
    serving."""
    crl = edge.certs / "client-ca.crl"
    good = crl.read_bytes()
    failures = edge.server.status()["reload"]["failures"]
    pushes = edge.secret_stat("client-ca")
    try:
        write_crl(edge.certs, "client-ca", last_update=days_ago(8), next_update=days_ago(1))
        wait_until(
            lambda: (
                edge.server.status()["reload"]["failures"] > failures
                or edge.secret_stat("client-ca") > pushes
            ),
            10,
            what="the expired CRL refused by the server, or pushed to Envoy",
        )
        holds_for(
            lambda: (
                edge.get("/billing/admin/x", cert="alice").status == 200
                and edge.get("/x", sni=STRICT, cert="alice").status == 200
            ),
            0.5,
            what="alice still served on both hosts",
        )
        (error,) = edge.server.status()["reload"]["errors"]
        assert "secret 'client-ca'" in error and "crl" in error, error
    finally:
        pki.write_atomic(crl, good)
        wait_until(
            lambda: edge.get("/billing/admin/x", cert="alice").status == 200,
            10,
            what="the good CRL served again",
        )


# -- no key material leaks --------------------------------------------------------------------


def test_no_private_key_material_in_logs_status_or_render(edge: Edge) -> None:
    # The log and /status do talk about these secrets (so the scan looks at the right text).
    log = edge.server.proc.log_path.read_text(encoding="utf-8", errors="replace")
    assert "edge-1" in log
    status = json.dumps(edge.server.status())
    assert "edge-server" in status
    assert_no_key_material("the server log", log, edge.certs)
    assert_no_key_material("/status", status, edge.certs)

    done = subprocess.run(
        xdsplane_argv("render", str(edge.layout.policy_dir), "--node", NODE),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    # render carries the certificates (as base64 or PEM text); only the keys are redacted.
    cert = (edge.certs / "edge.crt").read_bytes()
    shown = (base64.b64encode(cert).decode(), json.dumps(cert.decode())[1:-1])
    assert any(form in done.stdout for form in shown), "render shows no certificate"
    assert_no_key_material("xdsplane render", done.stdout + done.stderr, edge.certs)
    secrets = json.loads(done.stdout)["resources"]["SDS"]["resources"]
    keys = [
        s["resource"]["tls_certificate"]["private_key"]
        for s in secrets
        if "tls_certificate" in s["resource"]
    ]
    assert len(keys) == 2 and all(k.startswith("<redacted sha256:") for k in keys), keys


# -- missing client certificates as events (docs/observability.md) ----------------------------


def _missing_counter(edge: Edge, host: str) -> int:
    """Envoy's per-host count of requests without a client certificate (0 before the first)."""
    name = f"http.https/{host}.rbac.client_certificate_missing.shadow_denied"
    return edge.envoy.stats("^" + re.escape(name) + "$").get(name, 0)


def test_a_missing_certificate_is_an_event_and_counted_per_host(edge: Edge) -> None:
    """billing.example.com (client_certificate: optional): a request without a certificate
    is its own access-log event and counts in the host's stat; one with a certificate is
    neither, and the strict host has no such event or counter."""
    tag = str(time.monotonic_ns())
    without, with_cert = f"/billing/missing-{tag}-anon", f"/billing/missing-{tag}-alice"
    before = _missing_counter(edge, "billing")
    assert edge.get(without).status == 200
    wait_until(lambda: _missing_counter(edge, "billing") == before + 1, 10, what="counted")
    anon = _log_for(edge, without)
    assert (anon["event"], anon["client_certificate"]) == ("client_certificate_missing", "missing")
    assert anon["sni"] == BILLING and anon["route"] == "billing/billing", anon

    # A request the access rules refuse (the admin route wants a certificate) counts too.
    refused = f"/billing/admin/missing-{tag}"
    assert edge.get(refused).status == 403
    wait_until(lambda: _missing_counter(edge, "billing") == before + 2, 10, what="counted")

    assert edge.get(with_cert, cert="alice").status == 200
    alice = _log_for(edge, with_cert)
    assert (alice["event"], alice["client_certificate"]) == ("request", "presented"), alice
    holds_for(lambda: _missing_counter(edge, "billing") == before + 2, 1.0, what="not counted")
    assert _log_for(edge, refused)["event"] == "client_certificate_missing"

    strict = f"/missing-{tag}-strict"
    assert edge.get(strict, sni=STRICT, cert="alice").status == 200
    line = _log_for(edge, strict)
    assert "event" not in line and "client_certificate" not in line, line
    assert not edge.envoy.stats(r"^http\.https/billing-strict\.rbac\.client_certificate_missing")

    # The name the alert rules use (deploy/prometheus/alerts.yml), one label per host.
    prom = edge.envoy.admin("/stats/prometheus").body.decode()
    series = (
        'envoy_http_rbac_shadow_denied{envoy_rbac_http_prefix="client_certificate_missing",'
        'envoy_http_conn_manager_prefix="https/billing"} '
    )
    assert series + str(before + 2) in prom.splitlines(), prom


def test_routes_have_their_own_response_counters(edge: Edge) -> None:
    """Each route's upstream answers are counted under its name (vhost.<host>.route.<host>/
    <route>), which the per-route 4xx/5xx alerts of deploy/prometheus/alerts.yml read."""
    name = "vhost.billing.route.billing/billing.upstream_rq_2xx"
    before = edge.envoy.stats("^" + re.escape(name) + "$").get(name, 0)
    assert edge.get(f"/billing/route-stat-{time.monotonic_ns()}").status == 200
    wait_until(
        lambda: edge.envoy.stats("^" + re.escape(name) + "$").get(name, 0) == before + 1,
        10,
        what=name,
    )
    prom = edge.envoy.admin("/stats/prometheus").body.decode()
    series = (
        'envoy_vhost_route_upstream_rq_xx{envoy_response_code_class="2",'
        f'envoy_virtual_host="billing",envoy_route="billing/billing"}} {before + 1}'
    )
    assert series in prom.splitlines(), [x for x in prom.splitlines() if "route_upstream" in x]
