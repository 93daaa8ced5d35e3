"""``guard.transport: http`` live: the translator's ext_authz ``http_service``, a real Envoy
1.40, ``xdsplane guard --http-address`` over mTLS with a real Redis, an echo upstream.

Attacks, not banners: a replayed token, a revoked subject, jti and client certificate, each
also with forged copies of what the guard reads (``x-xdsplane-jwt-payload``,
``x-xdsplane-client-cert``, ``x-forwarded-client-cert``) sent by the client, on an HCM with
jwt_authn and on one without; what the upstream sees; the access log's guard fields; the
guard stopped (fail closed).

The tests share one gateway (each uses its own subjects, tokens and certificates, so any
order works); the test that stops the guard has one of its own.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from harness import (
    HOST,
    TEST_SECONDS,
    EchoUpstream,
    Envoy,
    ProcessGroup,
    Response,
    XdsServer,
    exchange,
    free_port,
    wait_until,
    write_atomic,
)
from test_guard import Guard, Redis, pki_dir
from test_revoke import run_cli
from tls_helpers import attach_to_report, client_context, process_group

from xdsplane import jwt, pki
from xdsplane.guard.decide import jti_hash
from xdsplane.guard.revoke import cert_file_identity
from xdsplane.names import GUARD_HTTP_CERT_HEADER, GUARD_HTTP_PAYLOAD_HEADER

PAYLOAD = GUARD_HTTP_PAYLOAD_HEADER
CERT = GUARD_HTTP_CERT_HEADER
XFCC = "x-forwarded-client-cert"

POLICY = """\
nodes: ["edge-*"]
guard:
  address: "{guard}"
  transport: http
  http_address: "{guard_http}"
  fail_open: false
  timeout: 1s
  tls: {{certificate: guard-client, ca: service-ca, sni: guard, subject_alt_names: [guard]}}
access_log: {{path: "{log}"}}
jwt_providers:
  idp:
    issuer: {issuer}
    audiences: [billing]
    jwks_file: ../keys/jwks.json
    max_lifetime: 300s
listeners:
  - name: https
    address: 127.0.0.1:{port}
    tls: {{}}
    hosts:
      - name: billing
        domains: [billing.example.com]
        certificate: edge-server
        client_certificate: optional
        client_ca: client-ca
        routes:
          - {{name: check, prefix: /check/, jwt: idp, revocation_check: true, upstream: echo}}
          - {{name: once, prefix: /, jwt: idp, replay_protection: true, upstream: echo}}
  - name: plain
    address: 127.0.0.1:{plain}
    hosts:
      - name: open
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - {{name: nojwt, prefix: /, revocation_check: true, upstream: echo}}
secrets:
  guard-client: {{certificate: ../certs/guard-client.crt, private_key: ../certs/guard-client.key}}
  service-ca: {{ca: ../certs/service-ca.crt}}
  edge-server: {{certificate: ../certs/edge.crt, private_key: ../certs/edge.key}}
  client-ca: {{ca: ../certs/client-ca.crt}}
upstreams:
  echo: {{endpoints: ["127.0.0.1:{upstream}"]}}
"""

# Never seen by the upstream: what Envoy adds for the guard, what the guard answers Envoy.
GUARD_ONLY = (PAYLOAD, CERT, "guard_reason", "jti_sha256", "x-jwt-payload")


@dataclass
class Edge:
    group: ProcessGroup
    guard: Guard
    certs: Path
    key: Any
    port: int  # TLS listener (jwt_authn, client certificate optional)
    plain: int  # plaintext listener without jwt_authn
    revoked: Path
    log: Path

    def conn(self, cert: str | None) -> http.client.HTTPConnection:
        """A keep-alive connection to the TLS listener presenting ``cert`` (None: none)."""
        import socket

        ctx = client_context(self.certs, cert)
        conn = http.client.HTTPConnection("billing.example.com", self.port, timeout=5)
        raw = socket.create_connection((HOST, self.port), timeout=5)
        conn.sock = ctx.wrap_socket(raw, server_hostname="billing.example.com")
        return conn

    def get(
        self, path: str, token: str | None, cert: str | None = None, **headers: str
    ) -> Response:
        sent = dict(headers)
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        return exchange(self.conn(cert), path, sent)

    def plain_get(self, path: str, **headers: str) -> Response:
        return exchange(http.client.HTTPConnection(HOST, self.plain, timeout=5), path, headers)

    def token(self, sub: str, jti: str | None = None) -> str:
        return jwt.sign(self.key, jwt.claims(sub, jti=jti or f"{sub}-{time.monotonic_ns()}"))

    def revoke(self, *args: str) -> None:
        r = run_cli("revoke", *args, "--file", str(self.revoked))
        assert r.returncode == 0, r.stderr

    def log_lines(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        out = []
        for line in self.log.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out


def forged_payload(**claims: Any) -> str:
    return json.dumps(claims)


def forged_cert(certs: Path, name: str) -> str:
    from urllib.parse import quote

    return quote((certs / f"{name}.crt").read_text(), safe="")


def upstream_saw(r: Response) -> dict[str, str]:
    assert r.status == 200, (r.status, r.text, r.headers)
    seen: dict[str, str] = json.loads(r.body)
    return seen


@contextlib.contextmanager
def edge(root: Path, max_seconds: float) -> Iterator[Edge]:
    """Redis, the guard (Redis store, mTLS, --http-address, --revocations), xdsplane serve
    and Envoy on POLICY, on free ports; each killed by its watchdog after ``max_seconds``."""
    folder = root / "policy"
    folder.mkdir()
    key = jwt.new_key()
    pki.write_atomic(root / "keys" / "jwks.json", jwt.jwks(key))
    certs = pki_dir(root)
    for name in ("carol", "dave"):
        pki.issue(certs, name, "client-ca", uris=[f"spiffe://example.com/{name}"], usage=["client"])
    revoked = root / "revoked.yaml"
    write_atomic(revoked, "[]\n")
    echo = EchoUpstream()
    port, plain, http_port = free_port(), free_port(), free_port()
    log = root / "access.log"
    try:
        with process_group(root / "logs", max_seconds=max_seconds) as group:
            redis = Redis(group, root).start()
            guard = Guard(
                group,
                "guard",
                *("--redis", redis.url, "--revocations", str(revoked)),
                *("--http-address", f"{HOST}:{http_port}"),
                certs=certs,
            )
            guard.launch().ready()
            text = POLICY.format(
                guard=f"{HOST}:{guard.port}",
                guard_http=f"{HOST}:{http_port}",
                log=log,
                issuer=jwt.DEFAULT_ISSUER,
                port=port,
                plain=plain,
                upstream=echo.port,
            )
            write_atomic(folder / "edge.yaml", text)
            server = XdsServer(group, folder).start()
            Envoy(group, root, "edge-1", server.xds_address).start()
            e = Edge(group, guard, certs, key, port, plain, revoked, log)
            wait_until(lambda: e.plain_get("/healthz").status == 200, 20, what="the edge")
            yield e
            guard.close()
    finally:
        echo.close()


MODULE_SECONDS = 600.0  # a few tests, ~20 s together here; covers a far slower machine


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Edge]:
    with edge(tmp_path_factory.mktemp("guardhttp"), MODULE_SECONDS) as e:
        yield e


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    if "shared" in request.fixturenames:
        attach_to_report(request, request.getfixturevalue("shared").group)


@pytest.mark.envoy
def test_replay_refused_the_second_time_even_with_a_forged_payload(shared: Edge) -> None:
    e = shared
    jti = f"once-{time.monotonic_ns()}"
    token = e.token("alice", jti)
    first = e.get("/billing/x", token, **{PAYLOAD: forged_payload(sub="x", jti="forged")})
    seen = upstream_saw(first)
    for name in GUARD_ONLY:  # neither Envoy's nor the client's copy
        assert name not in seen, (name, seen)
    again = e.get("/billing/x", token)
    assert (again.status, again.headers.get("x-guard-reason")) == (403, "replay")
    assert "already used" in again.text
    assert "guard_reason" not in again.headers and "jti_sha256" not in again.headers
    # the client's own payload naming a fresh jti changes nothing: the guard reads Envoy's
    fresh = forged_payload(sub="alice", jti=f"fresh-{time.monotonic_ns()}", exp=2**31)
    third = e.get("/billing/x", token, **{PAYLOAD: fresh})
    assert (third.status, third.headers.get("x-guard-reason")) == (403, "replay")

    def logged() -> bool:
        mine = [r for r in e.log_lines() if r.get("jti_hash") == jti_hash(jti)]
        return [r.get("guard_reason") for r in mine] == ["ok", "replay", "replay"]

    wait_until(logged, 10, what="the access log's guard_reason and jti_hash")
    assert all(jti not in json.dumps(r) for r in e.log_lines())  # the jti itself: never


@pytest.mark.envoy
def test_revoked_subject_and_jti_refused_forged_claims_no_help(shared: Edge) -> None:
    e = shared
    sub = f"mallory-{time.monotonic_ns()}"
    token = e.token(sub)
    assert e.get("/check/x", token).status == 200
    e.revoke("--sub", sub)

    def refused() -> bool:
        r = e.get("/check/x", e.token(sub))
        return r.status == 403 and r.headers.get("x-guard-reason") == "revoked_sub"

    wait_until(refused, 10, what="revoked sub refused over http")
    innocent = forged_payload(sub="alice", jti="j", exp=2**31)
    r = e.get("/check/x", e.token(sub), **{PAYLOAD: innocent})
    assert (r.status, r.headers.get("x-guard-reason")) == (403, "revoked_sub")
    r = e.get("/billing/x", e.token(sub), **{PAYLOAD: innocent})  # the replay route too
    assert (r.status, r.headers.get("x-guard-reason")) == (403, "revoked_sub")
    # a revoked jti of another subject
    jti = f"leaked-{time.monotonic_ns()}"
    leaked = e.token("bob", jti)
    assert e.get("/check/x", leaked).status == 200
    e.revoke("--jti", jti)
    wait_until(
        lambda: e.get("/check/x", leaked).headers.get("x-guard-reason") == "revoked_jti",
        10,
        what="revoked jti refused",
    )
    assert e.get("/check/x", e.token("bob")).status == 200  # bob's other tokens


@pytest.mark.envoy
def test_revoked_certificate_refused_forged_cert_and_xfcc_no_help(shared: Edge) -> None:
    e = shared
    tok = e.token
    seen = upstream_saw(e.get("/check/x", tok("carol"), "carol"))
    assert seen.get(XFCC, "").count("spiffe://example.com/carol") == 1  # the policy's own XFCC
    assert CERT not in seen
    e.revoke("--cert", str(e.certs / "carol.crt"), "--reason", "key lost")

    def refused() -> bool:
        r = e.get("/check/x", tok("carol"), "carol")
        return r.status == 403 and r.headers.get("x-guard-reason") == "revoked_cert"

    wait_until(refused, 10, what="revoked certificate refused over http")
    # carol sends dave's certificate (and an XFCC naming dave) as her own: still refused
    forged = {CERT: forged_cert(e.certs, "dave"), XFCC: "URI=spiffe://example.com/dave"}
    r = e.get("/check/x", tok("carol"), "carol", **forged)
    assert (r.status, r.headers.get("x-guard-reason")) == (403, "revoked_cert")
    r = e.get("/billing/x", tok("carol"), "carol", **forged)
    assert (r.status, r.headers.get("x-guard-reason")) == (403, "revoked_cert")
    assert e.get("/check/x", tok("dave"), "dave").status == 200  # another certificate
    # no client certificate, but the revoked one's PEM in the header: not the client's
    dave_serial = cert_file_identity(e.certs / "dave.crt")[1]
    e.revoke("--cert-serial", dave_serial)
    wait_until(
        lambda: e.get("/check/x", tok("dave"), "dave").status == 403, 10, what="serial revoked"
    )
    r = e.get("/check/x", tok("erin"), None, **{CERT: forged_cert(e.certs, "dave")})
    assert r.status == 200, (r.status, r.text)


@pytest.mark.envoy
def test_forged_headers_on_an_hcm_without_jwt_authn_never_reach_the_guard(shared: Edge) -> None:
    e = shared
    sub = f"eve-{time.monotonic_ns()}"
    e.revoke("--sub", sub)
    wait_until(
        lambda: e.get("/check/x", e.token(sub)).status == 403, 10, what="the revocation loaded"
    )
    # If the guard read the client's header, it would refuse this request as revoked_sub.
    forged = {PAYLOAD: forged_payload(sub=sub, jti="x", exp=2**31)}
    forged[CERT] = forged_cert(e.certs, "dave")  # revoked by serial in another test, or not
    r = e.plain_get("/anything", **forged)
    seen = upstream_saw(r)
    for name in (PAYLOAD, CERT, "guard_reason", "jti_sha256"):
        assert name not in seen, (name, seen)
    wait_until(
        lambda: any(
            x.get("path") == "/anything" and x.get("guard_reason") == "not_revoked"
            for x in e.log_lines()
        ),
        10,
        what="the plaintext request logged as checked, not revoked",
    )


@pytest.mark.envoy
def test_guard_down_fails_closed(tmp_path: Path) -> None:
    with edge(tmp_path, TEST_SECONDS) as e:
        token = e.token("alice")
        assert e.get("/check/x", token).status == 200
        e.guard.proc.stop()
        r = e.get("/billing/x", e.token("alice"))
        assert r.status == 403, (r.status, r.text)  # ext_authz's status_on_error default
        assert e.get("/check/x", token).status == 403
        assert e.plain_get("/x").status == 403
