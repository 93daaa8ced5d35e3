"""JWT bearer tokens: the token module, the policy keys, and Envoy's jwt_authn live.

One plain-HTTP gateway per module (xdsplane serve + a real Envoy + an upstream that echoes
the request headers as JSON). JWKS rotation (over ECDS, no listener drain) is tested in
test_jwks_rotation.py.
"""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from harness import (
    HOST,
    EchoUpstream,
    Envoy,
    ProcessGroup,
    Response,
    XdsServer,
    bearer,
    exchange,
    free_port,
    wait_until,
)
from tls_helpers import attach_to_report, process_group

from xdsplane import jwt, pki
from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader
from xdsplane.types import ResourceType

ROOT = Path(__file__).resolve().parent.parent

# -- the token module -----------------------------------------------------------------------


def test_sign_and_verify_round_trip() -> None:
    key = jwt.new_key()
    token = jwt.sign(key, jwt.claims("alice", jti="j-1"))
    head, _, sig = token.split(".")
    assert "=" not in token and len(jwt.b64url_decode(sig)) == 64  # raw r||s, not DER
    header = json.loads(jwt.b64url_decode(head))
    assert header == {"alg": "ES256", "typ": "JWT", "kid": jwt.kid(key)}
    claims = jwt.verify(token, jwt.public_jwk(key))
    assert claims["sub"] == "alice" and claims["jti"] == "j-1"
    assert claims["iss"] == jwt.DEFAULT_ISSUER and claims["aud"] == "billing"
    assert claims["exp"] - claims["iat"] == 300
    with pytest.raises(jwt.JwtError):
        jwt.verify(token, jwt.public_jwk(jwt.new_key()))
    tampered = f"{head}.{jwt.b64url(json.dumps({'sub': 'mallory'}).encode())}.{sig}"
    with pytest.raises(jwt.JwtError):
        jwt.verify(tampered, jwt.public_jwk(key))


def test_jwks_holds_only_the_public_key() -> None:
    key = jwt.new_key()
    doc = json.loads(jwt.jwks(key))
    (k,) = doc["keys"]
    assert k["kty"] == "EC" and k["crv"] == "P-256" and k["alg"] == "ES256"
    assert "d" not in k and k["kid"] == jwt.kid(key)
    assert jwt.check_jwks(jwt.jwks(key)) == 1
    for bad in (
        b"nope",
        b"[]",
        b'{"keys": []}',
        b'{"keys": [{}]}',
        b'{"keys": [{"kty":"EC","d":"x"}]}',
    ):
        with pytest.raises(ValueError):
            jwt.check_jwks(bad)


def test_certs_init_writes_the_signing_key_and_token_uses_it(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    written = pki.init(certs)
    assert certs / jwt.KEY_FILE in written and certs / jwt.JWKS_FILE in written
    assert (certs / jwt.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert pki.init(certs) == []  # kept
    jwk = json.loads((certs / jwt.JWKS_FILE).read_text())["keys"][0]
    r = subprocess.run(
        [
            *(sys.executable, "-m", "xdsplane", "token", "--sub", "bob", "--aud", "ops"),
            *("--ttl", "60", "--jti", "t-7", "--iss", "https://x.example", "--dir", str(certs)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    assert json.loads(jwt.b64url_decode(token.split(".")[0]))["kid"] == jwk["kid"]
    claims = jwt.verify(token, jwk)
    assert (claims["sub"], claims["aud"], claims["jti"], claims["iss"]) == (
        "bob",
        "ops",
        "t-7",
        "https://x.example",
    )
    assert claims["exp"] - claims["iat"] == 60
    missing = subprocess.run(
        [sys.executable, "-m", "xdsplane", "token", "--sub", "x", "--dir", str(tmp_path / "no")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 1 and "certs init" in missing.stderr


# -- the gateway ------------------------------------------------------------------------------

POLICY = """\
nodes: ["edge-*"]
access_log: {{path: "{log}"}}
jwt_providers:
  idp:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_file: ../keys/jwks.json
    max_lifetime: 300s
    forward_claims: {{sub: x-jwt-sub}}
listeners:
  - name: http
    address: 127.0.0.1:{port}
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: "ok"}}}}
          - {{name: open, prefix: /open/, jwt_optional: idp, upstream: echo}}
          - {{name: public, prefix: /public/, upstream: echo}}
          - {{name: api, prefix: /, jwt: idp, upstream: echo}}
upstreams:
  echo: {{endpoints: ["127.0.0.1:{upstream}"]}}
"""


@dataclass
class Gateway:
    folder: Path
    port: int
    key: ec.EllipticCurvePrivateKey
    envoy: Envoy
    server: XdsServer
    group: ProcessGroup
    access_log: Path | None = None

    def get(self, path: str, token: str | None = None, **headers: str) -> Response:
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        sent = {k.replace("_", "-"): v for k, v in headers.items()}
        return exchange(conn, path, {**sent, **bearer(token)})

    def token(self, key: ec.EllipticCurvePrivateKey | None = None, **claims: Any) -> str:
        sub = claims.pop("sub", "alice")
        return jwt.sign(key or self.key, jwt.claims(sub, **claims))


# The module's processes serve 15 tests, ~80 s together on a busy 2-core machine; 10 minutes
# covers a machine many times slower (start-up included) before the watchdog kills them.
MODULE_SECONDS = 600.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    root = tmp_path_factory.mktemp("jwt")
    folder = root / "policy"
    folder.mkdir()
    key = jwt.new_key()
    pki.write_atomic(root / "keys" / "jwks.json", jwt.jwks(key))
    echo = EchoUpstream()
    port = free_port()
    log = root / "access.log"
    (folder / "edge.yaml").write_text(POLICY.format(port=port, upstream=echo.port, log=log))
    try:
        with process_group(root / "logs", max_seconds=MODULE_SECONDS) as group:
            server = XdsServer(group, folder).start()
            envoy = Envoy(group, root, "edge-1", server.xds_address).start()
            gw = Gateway(folder, port, key, envoy, server, group, access_log=log)
            wait_until(lambda: gw.get("/healthz").status == 200, 20, what="the gateway answers")
            yield gw
    finally:
        echo.close()


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    if "gateway" in request.fixturenames:
        attach_to_report(request, request.getfixturevalue("gateway").group)


def upstream_headers(r: Response) -> dict[str, str]:
    assert r.status == 200, (r.status, r.text)
    headers: dict[str, str] = json.loads(r.body)
    return headers


@pytest.mark.envoy
def test_valid_token_passes_and_the_subject_is_forwarded(gateway: Gateway) -> None:
    seen = upstream_headers(gateway.get("/billing/invoices", gateway.token(sub="alice")))
    assert seen["x-jwt-sub"] == "alice"
    assert "authorization" not in seen  # the token is not sent upstream


def tampered(token: str, **changes: Any) -> str:
    """The token with claims changed and the original signature kept."""
    head, body, sig = token.split(".")
    claims = {**json.loads(jwt.b64url_decode(body)), **changes}
    return f"{head}.{jwt.b64url(json.dumps(claims).encode())}.{sig}"


@pytest.mark.envoy
@pytest.mark.parametrize(
    "case",
    [
        "none",
        "expired",
        "wrong-issuer",
        "bad-signature",
        "unknown-key",
        "tampered",
        "too-long",
        "garbage",
    ],
)
def test_bad_tokens_get_401(gateway: Gateway, case: str) -> None:
    now = time.time()
    token: str | None = {
        "none": None,
        "expired": gateway.token(now=now - 1000),  # exp 700 s ago: beyond the 60 s skew
        "wrong-issuer": gateway.token(iss="https://evil.example.com"),
        # Signed by another key under the trusted key's kid.
        "bad-signature": jwt.sign(jwt.new_key(), jwt.claims("alice"), jwt.kid(gateway.key)),
        "unknown-key": jwt.sign(jwt.new_key(), jwt.claims("alice")),
        "tampered": tampered(gateway.token(sub="alice"), sub="root"),
        "too-long": gateway.token(ttl=3600),  # max_lifetime is 300s
        "garbage": "not.a.token",
    }[case]
    path = f"/billing/{case}"
    r = gateway.get(path, token)
    assert r.status == 401, (r.status, r.text)
    # Each refusal is logged with why: Envoy's response code details in the access log.
    line = wait_until(lambda: logged(gateway, path), 10, what=f"the access log line of {path}")
    assert line["status"] == 401
    assert line["details"] == f"jwt_authn_access_denied{{{REFUSALS[case]}}}", line


# Why Envoy's jwt_authn refused each token, as its access log says.
REFUSALS = {
    "none": "Jwt_is_missing",
    "expired": "Jwt_is_expired",
    "wrong-issuer": "Jwt_issuer_is_not_configured",
    "bad-signature": "Jwt_verification_fails",
    "unknown-key": "Jwks_doesn't_have_key_to_match_kid_or_alg_from_Jwt",
    "tampered": "Jwt_verification_fails",
    "too-long": "Jwt_verification_fails",  # Envoy's words for exp - iat > max_lifetime
    "garbage": "Jwt_header_is_an_invalid_JSON",
}


def logged(gateway: Gateway, path: str) -> dict[str, Any] | None:
    """The access log line of the (only) request to ``path``, once Envoy has written it."""
    if gateway.access_log is None or not gateway.access_log.exists():
        return None
    for text in gateway.access_log.read_text().splitlines():
        entry: dict[str, Any] = json.loads(text)
        if entry.get("path") == path:
            return entry
    return None


@pytest.mark.envoy
def test_wrong_audience_gets_403(gateway: Gateway) -> None:
    r = gateway.get("/billing/invoices", gateway.token(aud="payroll"))
    assert r.status == 403, (r.status, r.text)
    assert "Audiences" in r.text  # Envoy's "Audiences in Jwt are not allowed"


@pytest.mark.envoy
def test_optional_route_lets_no_token_through_but_not_a_bad_one(gateway: Gateway) -> None:
    seen = upstream_headers(gateway.get("/open/x", x_jwt_sub="root"))
    assert "x-jwt-sub" not in seen  # a client-sent claim header is removed
    assert gateway.get("/open/x", gateway.token(iss="https://evil.example.com")).status == 401
    seen = upstream_headers(gateway.get("/open/x", gateway.token(sub="carol")))
    assert seen["x-jwt-sub"] == "carol"


@pytest.mark.envoy
def test_claim_headers_cannot_be_forged(gateway: Gateway) -> None:
    seen = upstream_headers(gateway.get("/public/x", x_jwt_sub="root"))
    assert "x-jwt-sub" not in seen
    token = gateway.token(sub="dave")
    seen = upstream_headers(gateway.get("/billing/x", token, x_jwt_sub="root"))
    assert seen["x-jwt-sub"] == "dave"
    assert gateway.get("/healthz").status == 200  # jwt disabled on routes without jwt:


def test_loader_reads_the_jwks_through_the_watched_reader(tmp_path: Path) -> None:
    folder = tmp_path / "policy"
    folder.mkdir()
    jwks = tmp_path / "keys" / "jwks.json"
    pki.write_atomic(jwks, jwt.jwks(jwt.new_key()))
    policy = POLICY.format(port=free_port(), upstream=free_port(), log=tmp_path / "access.log")
    (folder / "edge.yaml").write_text(policy)
    loader = FolderLoader(folder)
    first = loader.load()
    assert str(folder / "../keys/jwks.json") in loader.outside_files()  # watched
    pki.write_atomic(jwks, jwt.jwks(jwt.new_key()))
    second = loader.load()
    ecds, old = (s.groups[0].snapshot.versions[ResourceType.EXTENSION] for s in (second, first))
    assert ecds != old  # the key set is in the jwt_authn configuration served over ECDS
    for rtype in (ResourceType.LISTENER, ResourceType.ROUTE):
        versions = (s.groups[0].snapshot.versions[rtype] for s in (second, first))
        assert len(set(versions)) == 1, rtype.short  # listener and routes do not change
    jwks.write_text('{"keys": []}')
    with pytest.raises(ConfigErrors) as e:
        loader.load()
    assert "not a JWKS" in str(e.value)
