"""Opaque tokens through a REAL Envoy: xdsplane serve, xdsplane guard (mTLS, --policy), Envoy
1.40 and Authlib's introspection endpoint over TLS, on a sample-like policy (the sample's JWT
route with replay protection beside introspection routes).

What an attacker tries: a client-sent claim header, a revoked token while it is cached and
after, a token without the scope, a JWT pasted where an opaque token is expected, and an
endpoint the guard cannot authenticate to (whose client secret must appear in no output).
"""

from __future__ import annotations

import http.client
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import (
    HOST,
    EchoUpstream,
    Envoy,
    Response,
    XdsServer,
    exchange,
    free_port,
    http_get,
    wait_until,
    write_atomic,
    xdsplane_argv,
)
from introspection_server import IntrospectionServer
from test_guard import Guard, pki_dir
from tls_helpers import process_group

from xdsplane import jwt, pki

MODULE_SECONDS = 240.0  # the module's processes: watchdog bound
MAX_TTL = 4  # seconds an active answer is cached (the policy's cache.max_ttl)
WRONG_SECRET = "wrong-secret-" + "Zq8vT3kLm2Xw9Rb4"

POLICY = """\
nodes: ["edge-*"]
secrets:
  guard-client: {{certificate: ../certs/guard-client.crt, private_key: ../certs/guard-client.key}}
  service-ca: {{ca: ../certs/service-ca.crt}}
guard:
  address: "{guard}"
  timeout: 1s
  tls: {{certificate: guard-client, ca: service-ca, sni: guard, subject_alt_names: [guard]}}
jwt_providers:
  idp:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_file: ../jwks.json
    max_lifetime: 300s
    forward_claims: {{sub: x-jwt-sub}}
introspection_providers:
  idp-opaque:
    endpoint: "{endpoint}"
    ca: service-ca
    client_id: edge
    client_secret_file: ../client-secret
    issuer: https://idp.example.com
    audiences: [billing]
    forward_claims: {{sub: x-introspected-sub, scope: x-introspected-scope}}
    cache: {{max_entries: 100, max_ttl: {max_ttl}s, negative_ttl: 1s}}
    timeout: 2s
  idp-down:
    endpoint: "https://127.0.0.1:{down_port}/introspect"
    ca: service-ca
    client_id: edge
    client_secret_file: ../client-secret
    timeout: 500ms
  idp-wrong:
    endpoint: "{endpoint}"
    ca: service-ca
    client_id: edge
    client_secret_file: ../wrong-secret
listeners:
  - name: http
    address: 127.0.0.1:{port}
    hosts:
      - name: billing
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - {{name: billing, prefix: /billing/, jwt: idp, replay_protection: true, upstream: echo}}
          - name: invoices
            prefix: /invoices/
            introspection: idp-opaque
            require_scopes: ["billing:read"]
            upstream: echo
          - name: refunds
            prefix: /refunds/
            introspection: idp-opaque
            require_scopes: ["billing:read", "billing:refund"]
            upstream: echo
          - {{name: wrong, prefix: /wrong/, introspection: idp-wrong, upstream: echo}}
          - {{name: down, prefix: /down/, introspection: idp-down, upstream: echo}}
          - {{name: public, prefix: /public/, upstream: echo}}
upstreams:
  echo: {{endpoints: ["127.0.0.1:{upstream}"]}}
"""


@dataclass
class Gateway:
    root: Path
    port: int
    idp: IntrospectionServer
    guard: Guard
    server: XdsServer
    envoy: Envoy
    key: object  # the JWT issuer's signing key (the sample's idp)


def get(port: int, path: str, headers: dict[str, str] | None = None) -> Response:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    return exchange(conn, path, headers or {})


def seen_upstream(r: Response) -> dict[str, str]:
    assert r.status == 200, (r.status, r.text)
    data: dict[str, str] = json.loads(r.body)
    return data


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("introspection-edge")
    certs = pki_dir(root)
    pki.issue(certs, "idp", "service-ca", dns=["127.0.0.1"], usage=["server"])
    key = jwt.new_key()
    pki.write_atomic(root / "jwks.json", jwt.jwks(key))
    idp = IntrospectionServer(certs / "idp.crt", certs / "idp.key")
    (root / "client-secret").write_text(idp.client.client_secret + "\n")
    (root / "wrong-secret").write_text(WRONG_SECRET + "\n")
    echo = EchoUpstream()
    folder = root / "policy"
    try:
        with process_group(root / "logs", max_seconds=MODULE_SECONDS) as group:
            guard = Guard(group, "guard", "--policy", str(folder), certs=certs)
            port = free_port()
            text = POLICY.format(
                guard=f"{HOST}:{guard.port}",
                endpoint=idp.url,
                port=port,
                upstream=echo.port,
                max_ttl=MAX_TTL,
                down_port=free_port(),  # nothing listens there
            )
            write_atomic(folder / "edge.yaml", text)
            server = XdsServer(group, folder).launch()
            guard.launch()
            server.wait_ready()
            guard.ready()
            envoy = Envoy(group, root, "edge-1", server.xds_address).start()
            wait_until(lambda: get(port, "/healthz").status == 200, 20, what="edge answers")
            yield Gateway(root, port, idp, guard, server, envoy, key)
            guard.close()
    finally:
        echo.close()
        idp.close()


def bearer(token: str, **more: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", **more}


@pytest.mark.envoy
def test_an_opaque_token_passes_and_the_upstream_sees_its_claims_not_the_clients(
    gateway: Gateway,
) -> None:
    token = gateway.idp.issue("alice", scope="billing:read")
    spoof = {"x-introspected-sub": "root", "x-introspected-scope": "billing:admin"}
    seen = seen_upstream(get(gateway.port, "/invoices/1", bearer(token, **spoof)))
    assert seen["x-introspected-sub"] == "alice"
    assert seen["x-introspected-scope"] == "billing:read"
    assert "authorization" not in seen  # the token stays at the edge
    # a route of the same host without introspection: the spoofed headers are removed too
    seen = seen_upstream(get(gateway.port, "/public/x", spoof))
    assert "x-introspected-sub" not in seen and "x-introspected-scope" not in seen
    # no token, or one the endpoint does not know: 401 with an RFC 6750 challenge
    r = get(gateway.port, "/invoices/1")
    assert (r.status, r.headers.get("x-guard-reason")) == (401, "no_token"), r.text
    assert r.headers.get("www-authenticate", "").startswith("Bearer")
    r = get(gateway.port, "/invoices/1", bearer("not-a-token-the-idp-issued"))
    assert (r.status, r.headers.get("x-guard-reason")) == (401, "inactive_token"), r.text
    metrics = gateway.guard.metrics()
    assert 'xdsplane_guard_introspection_calls_total{provider="idp-opaque",result="active"}' in (
        metrics
    )
    assert 'xdsplane_guard_decisions_total{api="authz",reason="no_token",result="deny"}' in (
        metrics
    )


@pytest.mark.envoy
def test_an_endpoint_that_is_down_means_503_never_a_pass(gateway: Gateway) -> None:
    token = gateway.idp.issue("frank", scope="billing:read")
    r = get(gateway.port, "/down/1", bearer(token))
    assert (r.status, r.headers.get("x-guard-reason")) == (503, "introspection_unavailable")
    # and again: a failure is never cached as an answer
    r = get(gateway.port, "/down/2", bearer(token))
    assert (r.status, r.headers.get("x-guard-reason")) == (503, "introspection_unavailable")


@pytest.mark.envoy
def test_a_revoked_token_passes_while_cached_and_is_refused_once_the_cache_expires(
    gateway: Gateway,
) -> None:
    token = gateway.idp.issue("bob", scope="billing:read", ttl=300)
    assert get(gateway.port, "/invoices/1", bearer(token)).status == 200
    cached_at = time.monotonic()
    gateway.idp.deactivate(token)
    r = get(gateway.port, "/invoices/2", bearer(token))
    if time.monotonic() - cached_at < MAX_TTL - 1:  # still inside the cache bound
        assert r.status == 200, (r.status, r.text)
        assert gateway.idp.asked().count(token) == 1  # the cached answer, not a new call

    def refused() -> bool:
        return get(gateway.port, "/invoices/3", bearer(token)).status == 401

    # Polled: refused once the cached answer is older than max_ttl (4 s). Ceiling 30 s.
    wait_until(refused, 30, what="the revoked token refused")
    assert time.monotonic() - cached_at >= MAX_TTL - 0.5
    r = get(gateway.port, "/invoices/4", bearer(token))
    assert (r.status, r.headers.get("x-guard-reason")) == (401, "inactive_token")


@pytest.mark.envoy
def test_a_token_without_the_routes_scope_is_refused_403(gateway: Gateway) -> None:
    token = gateway.idp.issue("carol", scope="billing:read")
    assert get(gateway.port, "/invoices/1", bearer(token)).status == 200
    r = get(gateway.port, "/refunds/1", bearer(token))
    assert (r.status, r.headers.get("x-guard-reason")) == (403, "insufficient_scope"), r.text
    assert "insufficient_scope" in r.headers.get("www-authenticate", "")
    allowed = gateway.idp.issue("dave", scope="billing:refund billing:read")
    assert get(gateway.port, "/refunds/1", bearer(allowed)).status == 200


@pytest.mark.envoy
def test_a_valid_jwt_pasted_into_an_introspection_route_is_introspected_not_trusted(
    gateway: Gateway,
) -> None:
    token = jwt.sign(gateway.key, jwt.claims("mallory", now=time.time(), ttl=60))  # type: ignore[arg-type]
    # the same token is good on the JWT route (jwt_authn verifies it) ...
    assert get(gateway.port, "/billing/x", bearer(token)).status == 200
    # ... but on the introspection route only the endpoint decides: it does not know it
    r = get(gateway.port, "/invoices/1", bearer(token))
    assert (r.status, r.headers.get("x-guard-reason")) == (401, "inactive_token"), r.text
    assert token in gateway.idp.asked()


@pytest.mark.envoy
def test_a_wrong_client_secret_is_refused_and_the_secret_is_printed_nowhere(
    gateway: Gateway,
) -> None:
    token = gateway.idp.issue("erin", scope="billing:read")
    r = get(gateway.port, "/wrong/1", bearer(token))
    assert (r.status, r.headers.get("x-guard-reason")) == (503, "introspection_failed"), r.text
    good = gateway.idp.client.client_secret
    outputs = {
        "response": r.text + json.dumps(dict(r.headers)),
        "guard output": gateway.guard.proc.tail(2000),
        "guard /healthz": json.dumps(gateway.guard.health()),
        "guard /metrics": gateway.guard.metrics(),
        "serve output": gateway.server.proc.tail(2000),
        "serve /status": json.dumps(gateway.server.status()),
        "envoy config_dump": http_get(gateway.envoy.admin_port, "/config_dump").text,
    }
    for verb, *args in (("validate",), ("render", "--node", "edge-1")):
        done = subprocess.run(
            xdsplane_argv(verb, *args, str(gateway.root / "policy")),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, (verb, done.stderr)
        outputs[verb] = done.stdout + done.stderr
    assert "idp-wrong" in outputs["render"]  # the route's context extension names it
    assert "introspection_failed" in outputs["guard output"]  # the refusal is logged
    for where, text in outputs.items():
        assert WRONG_SECRET not in text, where
        assert good not in text, where
        assert token not in text, where
