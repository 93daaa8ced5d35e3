"""Helpers for the TLS end-to-end tests: a module-scoped process group, a billing-edge
policy on free ports, TLS clients that choose SNI and Host separately, and the demo billing
service (mutual TLS) that can be stopped with its open connections cut.

Generic; the process machinery itself is tests/harness.py (reused, not copied).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import http.client
import json
import re
import socket
import ssl
import threading
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from harness import HOST, Envoy, ProcessGroup, Response, XdsServer, free_port, wait_until

from xdsplane import demo, pki

# -- processes shared by a module -------------------------------------------------------------


@contextlib.contextmanager
def process_group(log_dir: Path, *, max_seconds: float) -> Iterator[ProcessGroup]:
    """A ProcessGroup for a module-scoped fixture: every process stopped by PID at the end.

    ``max_seconds`` is the watchdog of its processes: a bound on the whole module's run on
    a slow machine (each module documents its figure), not one test's TEST_SECONDS.

    The ``procs`` fixture of conftest.py is function-scoped; this is its module-scoped
    equivalent. Use ``attach_to_report`` in an autouse function fixture so that a failing
    test still gets the log tails of these processes in its report.
    """
    group = ProcessGroup(log_dir)
    try:
        yield group
    finally:
        group.stop_all()


def attach_to_report(request: pytest.FixtureRequest, group: ProcessGroup) -> None:
    """Make conftest's report hook attach ``group``'s log tails when this test fails."""
    from conftest import PROCS  # the test folder's conftest module (pytest imports it)

    request.node.stash[PROCS] = group


# -- PKI ------------------------------------------------------------------------------------


def make_pki(directory: Path) -> Path:
    """The sample PKI (client-ca, service-ca, edge, gateway, billing, alice) plus ``bob``, a
    client of client-ca whose SAN is not an ops identity, and ``mallory``, a client
    certificate from a CA nobody trusts (its own self-signed ``rogue-ca``)."""
    pki.init(directory)
    pki.issue(
        directory, "bob", "client-ca", uris=["spiffe://example.com/dev/bob"], usage=["client"]
    )
    pki.issue(directory, "rogue-ca", None, days=30)
    pki.issue(
        directory,
        "mallory",
        "rogue-ca",
        uris=["spiffe://example.com/ops/mallory"],
        usage=["client"],
    )
    return directory


def serial_of(der: bytes | None) -> int:
    assert der, "no peer certificate"
    return x509.load_der_x509_certificate(der).serial_number


def file_serial(path: Path) -> int:
    return x509.load_pem_x509_certificate(path.read_bytes()).serial_number


def new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def expired_certificate(directory: Path, name: str, ca: str, dns: list[str]) -> None:
    """Write NAME.crt/NAME.key issued by CA (in ``directory``), expired yesterday."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = x509.load_pem_x509_certificate((directory / f"{ca}.crt").read_bytes())
    ca_key = serialization.load_pem_private_key(
        (directory / f"{ca}.key").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), True)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), False)
        .sign(ca_key, hashes.SHA256())
    )
    pki.write_atomic(directory / f"{name}.crt", cert.public_bytes(serialization.Encoding.PEM))
    pki.write_atomic(
        directory / f"{name}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        0o600,
    )


def write_crl(
    directory: Path,
    ca: str,
    revoked: Iterable[str] = (),
    last_update: datetime.datetime | None = None,
    next_update: datetime.datetime | None = None,
) -> None:
    """Rewrite CA.crl, signed by CA, listing the certificates NAME.crt in ``revoked``;
    valid from a minute ago for a week unless told otherwise."""
    ca_cert = x509.load_pem_x509_certificate((directory / f"{ca}.crt").read_bytes())
    ca_key = serialization.load_pem_private_key(
        (directory / f"{ca}.key").read_bytes(), password=None
    )
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca_cert.subject)
        .last_update(last_update or now - datetime.timedelta(minutes=1))
        .next_update(next_update or now + datetime.timedelta(days=7))
    )
    for name in revoked:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder()
            .serial_number(file_serial(directory / f"{name}.crt"))
            .revocation_date(now - datetime.timedelta(minutes=1))
            .build()
        )
    crl = builder.sign(ca_key, hashes.SHA256())
    pki.write_atomic(directory / f"{ca}.crl", crl.public_bytes(serialization.Encoding.PEM))


def days_ago(days: float) -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=days)


# -- key material must not leak -------------------------------------------------------------

PEM_KEY_B64 = base64.b64encode(b"-----BEGIN PRIVATE KEY").decode()[:28]


def key_markers(certs: Path, extra_keys: Iterable[bytes] = ()) -> list[str]:
    """Strings that would show a private key: the PEM label, the base64 of a PEM key file
    (as protobuf JSON shows bytes), and a body line of each key (every NAME.key in
    ``certs`` plus ``extra_keys``, e.g. keys that were replaced since)."""
    markers = ["PRIVATE KEY", PEM_KEY_B64]
    for pem in [*(k.read_bytes() for k in sorted(certs.glob("*.key"))), *extra_keys]:
        markers.append(pem.splitlines()[1].decode())
        markers.append(base64.b64encode(pem).decode()[40:120])
    return markers


def assert_no_key_material(
    where: str, text: str, certs: Path, extra_keys: Iterable[bytes] = ()
) -> None:
    for marker in key_markers(certs, extra_keys):
        assert marker not in text, f"{where} shows private key material ({marker[:24]}...)"


# -- the billing-edge policy on free ports ----------------------------------------------------

BILLING = "billing.example.com"
STRICT = "mtls.billing.example.com"
NODE = "edge-1"

POLICY = """\
# snapshots/billing-edge.yaml, on free ports and this test's PKI.
nodes: ["edge-*"]
secrets:
  edge-server: {{certificate: ../certs/{edge}.crt, private_key: ../certs/{edge}.key}}
  client-ca: {{ca: ../certs/client-ca.crt, crl: ../certs/client-ca.crl}}
  gateway-client: {{certificate: ../certs/gateway.crt, private_key: ../certs/gateway.key}}
  service-ca: {{ca: ../certs/service-ca.crt}}
listeners:
  - name: https
    address: 127.0.0.1:{https_port}
    tls: {{min_version: "1.2", max_version: "1.3"}}
    hosts:
      - name: billing
        domains: [{billing_domains}]
        certificate: edge-server
        client_certificate: optional
        client_ca: client-ca
        routes:
          - name: healthz
            path: /healthz
            direct_response: {{status: 200, body: "ok\\n"}}
          - name: admin
            prefix: /billing/admin/
            require_client_certificate: true
            allow_client_sans: ["spiffe://example.com/ops/*"]
            upstream: billing
          - name: billing
            prefix: /billing/
            upstream: billing
            timeout: 10s
            retries: {{attempts: 2, on: [connect-failure, reset], per_try_timeout: 3s}}
      - name: billing-strict
        domains: [{strict_domain}]
        certificate: edge-server
        client_certificate: required
        client_ca: client-ca
        routes:
          - {{name: all, prefix: /, upstream: billing}}
  - name: http
    address: 127.0.0.1:{http_port}
    redirect_to_https: true
    https_port: {https_port}
upstreams:
  billing:
    endpoints: [127.0.0.1:{upstream_port}]
    connect_timeout: 1s
    tls:
      certificate: gateway-client
      ca: service-ca
      sni: billing.internal
      subject_alt_names: [billing.internal]
      min_version: "1.3"
    limits: {{max_connections: 200, max_pending_requests: 100, max_requests: 1000}}
access_log: {{path: {access_log}, format: json}}
"""


@dataclass
class Layout:
    """Where one test setup keeps its files: ROOT/policy/edge.yaml, ROOT/certs/, ..."""

    root: Path
    https_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    upstream_port: int = field(default_factory=free_port)

    @property
    def policy_dir(self) -> Path:
        return self.root / "policy"

    @property
    def policy_file(self) -> Path:
        return self.policy_dir / "edge.yaml"

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def policy(self, edge: str = "edge", billing_domains: str = BILLING) -> str:
        return POLICY.format(
            edge=edge,
            https_port=self.https_port,
            http_port=self.http_port,
            upstream_port=self.upstream_port,
            access_log=json.dumps(str(self.access_log)),
            billing_domains=billing_domains,
            strict_domain=STRICT,
        )

    def write_policy(self, **kwargs: str) -> Path:
        from harness import write_atomic

        write_atomic(self.policy_file, self.policy(**kwargs))
        return self.policy_file


# -- the demo billing service with mutual TLS -------------------------------------------------


class DemoUpstream:
    """xdsplane.demo serving TLS on a fixed port, requiring a client certificate of
    ``client_ca``; ``stop()`` also cuts the connections it accepted (the demo's own
    shutdown leaves kept-alive connections served by their threads, so Envoy would keep
    using a pooled connection to a stopped server)."""

    def __init__(
        self, certs: Path, port: int, cert: str = "billing", client_ca: str = "service-ca"
    ):
        self.certs = certs
        self.port = port
        self.cert = cert
        self.client_ca = client_ca
        self.server: Any = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self.received: list[str] = []
        """The path (with query) of every request that reached this service, in order."""

    def start(self, cert: str | None = None) -> DemoUpstream:
        assert self.server is None, "already running"
        if cert is not None:
            self.cert = cert
        files = demo.TlsFiles(
            str(self.certs / f"{self.cert}.crt"),
            str(self.certs / f"{self.cert}.key"),
            str(self.certs / f"{self.client_ca}.crt"),
        )
        server = demo.start(HOST, self.port, name=f"billing-{self.cert}", tls=files)
        accept = server.get_request

        def tracked() -> tuple[Any, Any]:
            sock, addr = accept()
            with self._lock:
                self._conns.append(sock)
            return sock, addr

        server.get_request = tracked  # type: ignore[method-assign]  # looked up per accept
        received = self.received

        class Recording(server.RequestHandlerClass):  # type: ignore[misc,name-defined]
            def _answer(self) -> None:
                received.append(self.path)
                super()._answer()

            do_GET = do_POST = do_PUT = do_DELETE = _answer

        server.RequestHandlerClass = Recording  # looked up per request
        self.server = server
        return self

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.server_close()
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(s, socket.SHUT_RDWR)
        self.server = None

    def restart(self, cert: str) -> None:
        self.stop()
        self.start(cert)


# -- TLS clients ------------------------------------------------------------------------------


def client_context(
    certs: Path,
    cert: str | None = None,
    *,
    ca: str = "service-ca",
    minimum: ssl.TLSVersion | None = None,
    maximum: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    """A client context trusting ``ca`` (which issued the edge certificate), presenting
    ``cert`` (NAME.crt/NAME.key in ``certs``) when given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs / f"{ca}.crt"))
    if cert is not None:
        ctx.load_cert_chain(str(certs / f"{cert}.crt"), str(certs / f"{cert}.key"))
    if minimum is not None:
        ctx.minimum_version = minimum
    if maximum is not None:
        ctx.maximum_version = maximum
    return ctx


class TlsConnection(http.client.HTTPConnection):
    """HTTP/1.1 over TLS to 127.0.0.1:``port``: SNI ``sni``, Host chosen per request.

    Keeps the connection alive between requests; ``connects`` counts TLS connections made
    (http.client reconnects silently when the server closed the previous one).
    """

    def __init__(self, port: int, ctx: ssl.SSLContext, sni: str, timeout: float = 5.0) -> None:
        super().__init__(HOST, port, timeout=timeout)
        self.ctx = ctx
        self.sni = sni
        self.connects = 0

    def connect(self) -> None:
        raw = socket.create_connection((self.host, self.port), self.timeout)
        try:
            self.sock = self.ctx.wrap_socket(raw, server_hostname=self.sni)
        except BaseException:
            raw.close()
            raise
        self.connects += 1

    @property
    def tls(self) -> ssl.SSLSocket:
        self.ensure_open()
        assert isinstance(self.sock, ssl.SSLSocket)
        return self.sock

    def ensure_open(self) -> None:
        if self.sock is None:
            self.connect()

    def get(self, path: str, host: str | None = None, close: bool = False) -> Response:
        headers = {"Host": host or self.sni}
        if close:
            headers["Connection"] = "close"
        self.request("GET", path, headers=headers)
        r = self.getresponse()
        body = r.read()
        return Response(r.status, body, {k.lower(): v for k, v in r.getheaders()})


@dataclass(frozen=True)
class TlsInfo:
    version: str | None
    peer_der: bytes | None

    @property
    def serial(self) -> int:
        return serial_of(self.peer_der)


def https_get(
    port: int,
    ctx: ssl.SSLContext,
    sni: str,
    path: str,
    host: str | None = None,
    timeout: float = 5.0,
) -> tuple[Response, TlsInfo]:
    """One GET on a fresh TLS connection: the answer, and the TLS version and server
    certificate of that connection."""
    conn = TlsConnection(port, ctx, sni, timeout)
    try:
        conn.connect()
        info = TlsInfo(conn.tls.version(), conn.tls.getpeercert(binary_form=True))
        return conn.get(path, host, close=True), info
    finally:
        conn.close()


def handshake(port: int, ctx: ssl.SSLContext, sni: str, timeout: float = 5.0) -> TlsInfo:
    """Only a TLS handshake (no request): the version and the server's certificate."""
    with (
        socket.create_connection((HOST, port), timeout) as raw,
        ctx.wrap_socket(raw, server_hostname=sni) as tls,
    ):
        return TlsInfo(tls.version(), tls.getpeercert(binary_form=True))


STATUS_LINE = re.compile(rb"^HTTP/1\.[01] (\d{3})")


def no_http_answer(
    port: int, ctx: ssl.SSLContext, sni: str, path: str = "/", host: str | None = None
) -> str:
    """Connect, handshake, send a GET and read: returns how it failed. Fails the test if an
    HTTP status line comes back.

    With TLS 1.2 a refused client certificate fails the handshake itself; with TLS 1.3 the
    client's handshake completes before the server has checked the certificate, and the
    server's alert (or a reset, or EOF) arrives on the first read.
    """
    raw = socket.create_connection((HOST, port), 5.0)
    try:
        try:
            tls = ctx.wrap_socket(raw, server_hostname=sni)
        except (ssl.SSLError, OSError) as e:
            return f"handshake: {e!r}"
        with tls:
            try:
                request = f"GET {path} HTTP/1.1\r\nHost: {host or sni}\r\nConnection: close\r\n\r\n"
                tls.sendall(request.encode())
                data = b""
                while len(data) < 64:
                    chunk = tls.recv(64)
                    if not chunk:
                        break
                    data += chunk
            except (ssl.SSLError, OSError) as e:
                return f"first read: {e!r}"
            m = STATUS_LINE.match(data)
            assert m is None, f"got an HTTP answer {data[:64]!r} on a connection that must fail"
            return f"closed without an answer ({data!r})"
    finally:
        raw.close()


# -- one edge: server + Envoy + demo upstream -------------------------------------------------


@dataclass
class Edge:
    """The billing edge of one test setup: policy, PKI, xdsplane serve, Envoy, demo."""

    layout: Layout
    server: XdsServer
    envoy: Envoy
    upstream: DemoUpstream

    @property
    def certs(self) -> Path:
        return self.layout.certs

    def ctx(self, cert: str | None = None, **kwargs: Any) -> ssl.SSLContext:
        return client_context(self.certs, cert, **kwargs)

    def get(
        self, path: str, sni: str = BILLING, cert: str | None = None, host: str | None = None
    ) -> Response:
        r, _ = https_get(self.layout.https_port, self.ctx(cert), sni, path, host)
        return r

    def secret_stat(self, secret: str, counter: str = "update_success") -> int:
        return self.envoy.stat(f"sds.{secret}.{counter}")


def start_edge(group: ProcessGroup, root: Path, delta: bool = False) -> Edge:
    """PKI, policy, demo upstream, ``xdsplane serve`` and Envoy (node edge-1), and wait
    until the optional host answers /healthz over TLS."""
    layout = Layout(root)
    make_pki(layout.certs)
    layout.write_policy()
    upstream = DemoUpstream(layout.certs, layout.upstream_port).start()
    try:
        server = XdsServer(group, layout.policy_dir)
        envoy = Envoy(group, root, NODE, server.xds_address, delta=delta)
        # Envoy flushes access log files every 10 s by default; tests read them sooner.
        envoy.proc.argv += ["--file-flush-interval-msec", "50"]
        edge = Edge(layout, server, envoy, upstream)
        group.add_diagnostic(
            "envoy listener_manager", lambda: json.dumps(envoy.stats("listener_manager"))
        )
        server.start()
        envoy.start()
        wait_until(
            lambda: edge.get("/healthz").status == 200,
            20,
            what="the optional host answers /healthz over TLS",
        )
    except BaseException:
        upstream.stop()
        raise
    return edge


def tls11_context(certs: Path) -> ssl.SSLContext:
    """A client that offers TLS 1.1 only (OpenSSL 3 needs security level 0 for it)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # that is the point
        ctx = client_context(certs, minimum=ssl.TLSVersion.TLSv1_1, maximum=ssl.TLSVersion.TLSv1_1)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def why_no_local_tls11(certs: Path) -> str | None:
    """None when this Python's OpenSSL completes a TLS 1.1 handshake with itself (so a
    refusal by Envoy is Envoy's); otherwise the reason it cannot even try."""
    try:
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            server_ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        server_ctx.load_cert_chain(str(certs / "edge.crt"), str(certs / "edge.key"))
        client_ctx = tls11_context(certs)
    except (ValueError, ssl.SSLError) as e:
        return f"this OpenSSL ({ssl.OPENSSL_VERSION}) cannot be set up for TLS 1.1: {e}"
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(b, server_side=True):
                pass
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with client_ctx.wrap_socket(a, server_hostname=BILLING) as tls:
            version = tls.version()
    except (ssl.SSLError, OSError) as e:
        return f"this OpenSSL ({ssl.OPENSSL_VERSION}) refuses TLS 1.1 locally: {e!r}"
    finally:
        t.join(5)
        a.close()
        b.close()
    if version != "TLSv1.1":
        return f"a local TLS 1.1 handshake negotiated {version}"
    return None


# -- load over TLS, and the listener counters that show churn ---------------------------------

LISTENER_CHURN = (
    "listener_manager.listener_modified",
    "listener_manager.listener_removed",
    "listener_manager.listener_in_place_updated",
    "listener_manager.total_listeners_draining",
    "listener_manager.total_filter_chains_draining",
)


def listener_churn(edge: Edge) -> dict[str, int]:
    found = edge.envoy.stats(r"^listener_manager\.")
    return {k: v for k, v in found.items() if k in LISTENER_CHURN}


class Looper(threading.Thread):
    """GETs in a loop over one kept-alive TLS connection, recording every outcome.

    ``conn.connects`` counts the connections made: more than one means one was dropped.
    With ``fresh``, every request is a new TLS connection (a new handshake) instead.
    """

    def __init__(self, edge: Edge, index: int, stop: threading.Event, fresh: bool = False) -> None:
        super().__init__(name=f"looper-{index}", daemon=True)
        self.fresh = fresh
        self.conn = TlsConnection(edge.layout.https_port, edge.ctx(), BILLING)
        self.conn.connect()
        self.first_serial = x509.load_der_x509_certificate(
            self.conn.tls.getpeercert(binary_form=True) or b""
        ).serial_number
        self.path = f"/billing/load/{index}"
        self.stop = stop
        self.ok = 0
        self.failures: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                r = self.conn.get(self.path, close=self.fresh)
                if r.status == 200:
                    self.ok += 1
                else:
                    self.failures.append(f"{r.status} {r.text[:100]}")
            except Exception as e:
                self.failures.append(repr(e))
                self.conn.close()  # the next request reconnects (and is counted)

    def current_serial(self) -> int:
        der = self.conn.tls.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der or b"").serial_number


class StatSampler(threading.Thread):
    """Polls Envoy's listener counters and gauges, keeping the largest value seen."""

    def __init__(self, edge: Edge, stop: threading.Event) -> None:
        super().__init__(name="stat-sampler", daemon=True)
        self.edge = edge
        self.stop = stop
        self.peak: dict[str, int] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            for k, v in listener_churn(self.edge).items():
                self.peak[k] = max(v, self.peak.get(k, 0))
            self.stop.wait(0.02)
