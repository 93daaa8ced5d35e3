"""Per-route access rules (``access:``): the translation, and a real Envoy enforcing them.

One gateway for the module: ``xdsplane serve`` and Envoy with a TLS listener (client
certificates optional, for rules on SANs) and a plain listener (JWT claims, source
address, method and path, deny beats allow, default deny, shadow mode). Every route answers
from Envoy itself (direct_response), so a 200 means the RBAC filter let the request through.
Certificates are real (tests/tls_helpers.make_pki: alice is spiffe://example.com/ops/alice,
bob spiffe://example.com/dev/bob) and so are the tokens (xdsplane.jwt, checked by Envoy's
jwt_authn against the JWKS in the policy).
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
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf import json_format
from harness import (
    HOST,
    TEST_SECONDS,
    Envoy,
    ProcessGroup,
    Response,
    XdsServer,
    bearer,
    exchange,
    free_port,
    wait_until,
    write_atomic,
)
from tls_helpers import BILLING, attach_to_report, client_context, https_get, make_pki
from tls_helpers import process_group as module_processes

from xdsplane import jwt, pki
from xdsplane.policy.model import Route
from xdsplane.policy.translate import authz

# -- the translation --------------------------------------------------------------------------


def rbac_of(route: dict[str, Any]) -> dict[str, Any]:
    """The RBACPerRoute of a route given as policy YAML would parse it, as JSON."""
    spec = Route.model_validate({"prefix": "/", "direct_response": {"status": 200}, **route})
    per_route = authz.per_route(spec)
    assert per_route is not None
    out: dict[str, Any] = json_format.MessageToDict(per_route, preserving_proto_field_name=True)
    return out["rbac"]


def test_a_route_without_rules_has_no_rbac() -> None:
    spec = Route.model_validate({"prefix": "/", "direct_response": {"status": 200}})
    assert authz.per_route(spec) is None


def test_deny_rules_and_the_default_are_policies_of_one_deny_engine() -> None:
    rbac = rbac_of(
        {
            "access": {
                "default": "deny",
                "allow": [{"methods": ["GET", "HEAD"]}, {"paths": ["/open/*"]}],
                "deny": [{"sources": ["10.0.0.0/8"]}],
            }
        }
    )
    assert "shadow_rules" not in rbac
    rules = rbac["rules"]
    assert rules["action"] == "DENY"
    assert sorted(rules["policies"]) == ["deny-0", "no-allow-rule"]
    (deny,) = rules["policies"]["deny-0"]["principals"]
    assert deny == {"direct_remote_ip": {"address_prefix": "10.0.0.0", "prefix_len": 8}}
    (default,) = rules["policies"]["no-allow-rule"]["principals"]
    methods, paths = default["not_id"]["or_ids"]["ids"]
    assert [p["header"]["string_match"]["exact"] for p in methods["or_ids"]["ids"]] == [
        "GET",
        "HEAD",
    ]
    assert paths == {"url_path": {"path": {"prefix": "/open/"}}}


def test_default_deny_without_allow_rules_denies_everything() -> None:
    rules = rbac_of({"access": {"default": "deny"}})["rules"]
    assert rules["policies"] == {
        "no-allow-rule": {"permissions": [{"any": True}], "principals": [{"any": True}]}
    }


def test_shadow_rules_leave_the_client_certificate_enforced() -> None:
    rbac = rbac_of(
        {
            "require_client_certificate": True,
            "access": {"shadow": True, "deny": [{"methods": ["DELETE"]}]},
        }
    )
    assert list(rbac["rules"]["policies"]) == ["client-certificate"]
    assert rbac["rules"]["action"] == rbac["shadow_rules"]["action"] == "DENY"
    assert list(rbac["shadow_rules"]["policies"]) == ["deny-0"]


def test_every_key_of_a_rule_must_match_and_a_list_is_any_of() -> None:
    rbac = rbac_of(
        {
            "access": {
                "deny": [
                    {
                        "jwt_claims": {
                            "roles": ["admin", "ops"],
                            "email_verified": True,
                            "level": 3,
                        },
                        "paths": ["/a", "/b/*/c"],
                    }
                ]
            }
        }
    )
    (rule,) = rbac["rules"]["policies"]["deny-0"]["principals"]
    verified, level, roles, paths = rule["and_ids"]["ids"]  # claims by name, then paths
    # Each value: the claim equals it, or the claim is a list holding it.
    assert len(roles["or_ids"]["ids"]) == 4
    first = roles["or_ids"]["ids"][0]["metadata"]
    assert first["filter"] == "envoy.filters.http.jwt_authn"
    assert first["path"] == [{"key": "jwt_payload"}, {"key": "roles"}]
    assert first["value"] == {"string_match": {"exact": "admin"}}
    listed = roles["or_ids"]["ids"][1]["metadata"]["value"]
    assert listed == {"list_match": {"one_of": {"string_match": {"exact": "admin"}}}}
    assert verified["or_ids"]["ids"][0]["metadata"]["value"] == {"bool_match": True}
    assert level["or_ids"]["ids"][0]["metadata"]["value"] == {"double_match": {"exact": 3.0}}
    exact, glob = paths["or_ids"]["ids"]
    # A deny rule's paths match in any case (issue #11: /A is /a to many upstreams).
    assert exact == {"url_path": {"path": {"exact": "/a", "ignore_case": True}}}
    assert glob["url_path"]["path"]["safe_regex"]["regex"] == "(?i)^/b/.*/c$"


# -- the gateway ------------------------------------------------------------------------------

POLICY = """\
nodes: ["edge-*"]
secrets:
  edge-server: {{certificate: ../certs/edge.crt, private_key: ../certs/edge.key}}
  client-ca: {{ca: ../certs/client-ca.crt, crl: ../certs/client-ca.crl}}
jwt_providers:
  idp:
    issuer: https://idp.example.com
    audiences: [billing]
    jwks_file: ../keys/jwks.json
access_log: {{path: {access_log}, format: json}}
listeners:
  - name: https
    address: 127.0.0.1:{https_port}
    tls: {{}}
    hosts:
      - name: billing
        domains: [billing.example.com]
        certificate: edge-server
        client_certificate: optional
        client_ca: client-ca
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: ok}}}}
          - name: ops-only
            prefix: /ops/
            access:
              default: deny
              allow: [{{client_sans: ["spiffe://example.com/ops/*"]}}]
            direct_response: {{status: 200, body: ops}}
          - name: no-dev
            prefix: /no-dev/
            access:
              deny: [{{client_sans: ["spiffe://example.com/dev/*"]}}]
            direct_response: {{status: 200, body: no-dev}}
          - name: sans-presented
            prefix: /sans-presented/
            allow_client_sans: ["spiffe://example.com/ops/*"]
            direct_response: {{status: 200, body: sans-presented}}
          - name: sans-required
            prefix: /sans-required/
            require_client_certificate: true
            allow_client_sans: ["spiffe://example.com/ops/*"]
            direct_response: {{status: 200, body: sans-required}}
          - name: cert-shadow
            prefix: /cert-shadow/
            require_client_certificate: true
            access:
              shadow: true
              deny: [{{client_sans: ["spiffe://example.com/dev/*"]}}]
            direct_response: {{status: 200, body: cert-shadow}}
  - name: http
    address: 127.0.0.1:{http_port}
    hosts:
      - name: api
        domains: ["*"]
        routes:
          - {{name: healthz, path: /healthz, direct_response: {{status: 200, body: ok}}}}
          - name: admins
            prefix: /admins/
            jwt: idp
            access:
              default: deny
              allow:
                - {{jwt_claims: {{roles: admin}}}}
                - {{jwt_claims: {{sub: [carol, dave], email_verified: true}}}}
                - {{jwt_claims: {{clearance: [3, 4]}}}}
            direct_response: {{status: 200, body: admins}}
          - name: not-banned
            prefix: /not-banned/
            jwt_optional: idp
            access:
              deny: [{{jwt_claims: {{groups: banned}}}}]
            direct_response: {{status: 200, body: not-banned}}
          - name: loopback
            prefix: /loopback/
            access: {{default: deny, allow: [{{sources: [127.0.0.0/8]}}]}}
            direct_response: {{status: 200, body: loopback}}
          - name: internal
            prefix: /internal/
            access: {{default: deny, allow: [{{sources: [10.0.0.0/8, "192.168.0.0/16"]}}]}}
            direct_response: {{status: 200, body: internal}}
          - name: methods-paths
            prefix: /mp/
            access:
              default: deny
              allow:
                - {{methods: [GET, HEAD], paths: ["/mp/read/*"]}}
                - {{methods: [POST], paths: [/mp/write, "/mp/*/upload"]}}
            direct_response: {{status: 200, body: mp}}
          - name: deny-beats-allow
            prefix: /docs/
            access:
              default: deny
              allow: [{{paths: ["/docs/*"]}}]
              deny: [{{paths: ["/docs/internal/*"]}}]
            direct_response: {{status: 200, body: docs}}
          - name: closed
            prefix: /closed/
            access: {{default: deny}}
            direct_response: {{status: 200, body: closed}}
          - name: trial
            prefix: /trial/
            access:
              default: deny
              shadow: true
              allow: [{{methods: [GET]}}]
              deny: [{{paths: [/trial/secret]}}]
            direct_response: {{status: 200, body: trial}}
"""


@dataclass
class Gateway:
    root: Path
    http_port: int
    https_port: int
    key: ec.EllipticCurvePrivateKey
    envoy: Envoy
    group: ProcessGroup

    @property
    def certs(self) -> Path:
        return self.root / "certs"

    @property
    def access_log(self) -> Path:
        return self.root / "access.log"

    def request(
        self, path: str, method: str = "GET", token: str | None = None, body: bytes | None = None
    ) -> Response:
        conn = http.client.HTTPConnection(HOST, self.http_port, timeout=5)
        return exchange(conn, path, bearer(token), method=method, body=body)

    def tls_get(self, path: str, cert: str | None = None) -> Response:
        r, _ = https_get(self.https_port, client_context(self.certs, cert), BILLING, path)
        return r

    def token(self, sub: str = "alice", **claims: Any) -> str:
        return jwt.sign(self.key, jwt.claims(sub, **claims))

    def log_line(self, path: str) -> dict[str, Any]:
        """The access log line of the request to ``path`` (query included)."""

        def find() -> dict[str, Any] | None:
            text = self.access_log.read_text(encoding="utf-8")
            lines = [json.loads(line) for line in text.splitlines() if line.strip()]
            found = [line for line in lines if line.get("path") == path]
            return found[-1] if found else None

        return wait_until(find, 10, what=f"access log line for {path}")


@contextlib.contextmanager
def rbac_gateway(root: Path, max_seconds: float) -> Iterator[Gateway]:
    """xdsplane serve and Envoy on POLICY (free ports); watchdog ``max_seconds``."""
    make_pki(root / "certs")
    key = jwt.new_key()
    pki.write_atomic(root / "keys" / "jwks.json", jwt.jwks(key))
    folder = root / "policy"
    folder.mkdir()
    http_port, https_port = free_port(), free_port()
    (folder / "edge.yaml").write_text(
        POLICY.format(
            access_log=json.dumps(str(root / "access.log")),
            http_port=http_port,
            https_port=https_port,
        )
    )
    with module_processes(root / "logs", max_seconds=max_seconds) as group:
        server = XdsServer(group, folder).start()
        envoy = Envoy(group, root, "edge-1", server.xds_address)
        # Envoy flushes access log files every 10 s by default; the tests read them sooner.
        envoy.proc.argv += ["--file-flush-interval-msec", "50"]
        envoy.start()
        gw = Gateway(root, http_port, https_port, key, envoy, group)
        wait_until(lambda: gw.request("/healthz").status == 200, 20, what="plain listener")
        wait_until(lambda: gw.tls_get("/healthz").status == 200, 20, what="TLS listener")
        yield gw


# The module's tests share one gateway: 32 tests, ~40 s together here; 15 minutes covers
# a machine many times slower (start-up included) before the watchdog kills them.
MODULE_SECONDS = 900.0


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with rbac_gateway(tmp_path_factory.mktemp("rbac"), MODULE_SECONDS) as gw:
        yield gw


@pytest.fixture
def own_gateway(tmp_path: Path) -> Iterator[Gateway]:
    """A gateway of its own, for a test that edits the policy (the shared one stays as is)."""
    with rbac_gateway(tmp_path, TEST_SECONDS) as gw:
        yield gw


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    for name in ("gateway", "own_gateway"):
        if name in request.fixturenames:
            attach_to_report(request, request.getfixturevalue(name).group)


def tagged(path: str) -> str:
    """``path`` with a unique query: RBAC matches the path without it, and the access log
    line of this very request can be found by it."""
    return f"{path}?t={time.monotonic_ns()}"


def assert_refused(r: Response) -> None:
    assert r.status == 403, (r.status, r.text)
    assert r.text == "RBAC: access denied", r.text


# -- client certificate SANs ------------------------------------------------------------------


@pytest.mark.envoy
def test_allow_by_san(gateway: Gateway) -> None:
    """default: deny + allow client_sans ops/*: alice (ops) passes; bob (dev, valid
    certificate) and a client without one are refused by no-allow-rule."""
    assert gateway.tls_get("/ops/report", cert="alice").text == "ops"
    bob = tagged("/ops/report")
    assert_refused(gateway.tls_get(bob, cert="bob"))
    assert_refused(gateway.tls_get("/ops/report"))
    line = gateway.log_line(bob)
    assert line["status"] == 403 and line["access_denied_by"] == "no-allow-rule", line
    assert line["details"] == "rbac_access_denied_matched_policy[no-allow-rule]", line


@pytest.mark.envoy
def test_deny_by_san(gateway: Gateway) -> None:
    """deny client_sans dev/*: bob is refused; alice and a client without a certificate
    (no SAN to match) pass."""
    assert_refused(gateway.tls_get("/no-dev/x", cert="bob"))
    assert gateway.tls_get("/no-dev/x", cert="alice").text == "no-dev"
    assert gateway.tls_get("/no-dev/x").text == "no-dev"


@pytest.mark.envoy
def test_a_san_list_checks_presented_certificates_and_the_requirement_is_its_own_key(
    gateway: Gateway,
) -> None:
    """allow_client_sans alone: bob (dev, valid certificate) is refused by
    client-certificate, alice passes, and so does a client without a certificate;
    with require_client_certificate too, that client is refused as well."""
    bob = tagged("/sans-presented/x")
    assert_refused(gateway.tls_get(bob, cert="bob"))
    assert gateway.log_line(bob)["access_denied_by"] == "client-certificate"
    assert gateway.tls_get("/sans-presented/x", cert="alice").text == "sans-presented"
    assert gateway.tls_get("/sans-presented/x").text == "sans-presented"
    anon = tagged("/sans-required/x")
    assert_refused(gateway.tls_get(anon))
    assert gateway.log_line(anon)["access_denied_by"] == "client-certificate"
    assert_refused(gateway.tls_get("/sans-required/x", cert="bob"))
    assert gateway.tls_get("/sans-required/x", cert="alice").text == "sans-required"


@pytest.mark.envoy
def test_a_san_list_alone_on_an_optional_host_is_a_warning(gateway: Gateway) -> None:
    """validate says, with the line, that a SAN list without the requirement lets a
    request without a certificate through (never silent); with the requirement, or in an
    access rule, nothing is said."""
    from xdsplane import pipeline

    policy = gateway.root / "policy" / "edge.yaml"
    result = pipeline.load(policy.parent)
    assert not result.errors, result.errors
    warnings = [str(w) for w in result.warnings]
    san_warnings = [w for w in warnings if "allow_client_sans" in w]
    assert len(san_warnings) == 1, warnings
    lines = policy.read_text().splitlines()
    at = lines.index("          - name: sans-presented") + 3  # its allow_client_sans line
    assert lines[at - 1].strip().startswith("allow_client_sans:"), lines[at - 1]
    assert f"edge.yaml:{at}:" in san_warnings[0], san_warnings
    assert "'sans-presented'" in san_warnings[0] and "passes" in san_warnings[0]


@pytest.mark.envoy
def test_shadow_access_rules_beside_an_enforced_client_certificate(gateway: Gateway) -> None:
    """require_client_certificate stays enforced (no certificate: 403, by
    client-certificate) while the shadow deny on dev SANs only logs: bob gets 200."""
    anon = tagged("/cert-shadow/x")
    assert_refused(gateway.tls_get(anon))
    line = gateway.log_line(anon)
    assert line["access_denied_by"] == "client-certificate", line
    bob = tagged("/cert-shadow/x")
    assert gateway.tls_get(bob, cert="bob").text == "cert-shadow"
    line = gateway.log_line(bob)
    assert line["status"] == 200, line
    assert line["access_shadow"] == "denied" and line["access_shadow_denied_by"] == "deny-0"
    alice = tagged("/cert-shadow/x")
    assert gateway.tls_get(alice, cert="alice").text == "cert-shadow"
    assert gateway.log_line(alice)["access_shadow"] == "allowed"


# -- JWT claims -------------------------------------------------------------------------------


@pytest.mark.envoy
def test_allow_by_claim(gateway: Gateway) -> None:
    """allow roles: admin (a string claim equal to it, or a list claim holding it), or sub
    carol/dave with email_verified true, or clearance 3 or 4 (numbers); everyone else with
    a valid token is refused."""
    for claims in ({"roles": "admin"}, {"roles": ["viewer", "admin"]}, {"clearance": 4}):
        r = gateway.request("/admins/x", token=gateway.token("eve", **claims))
        assert r.text == "admins", (claims, r)
    carol = gateway.token("carol", email_verified=True)
    assert gateway.request("/admins/x", token=carol).text == "admins"
    for sub, claims in (
        ("eve", {"roles": ["viewer"]}),
        ("eve", {"roles": "administrator"}),
        ("carol", {}),  # email_verified missing: both claims of the rule must match
        ("carol", {"email_verified": False}),
        ("mallory", {"email_verified": True}),
        ("eve", {"clearance": 2}),
        ("eve", {"clearance": "4"}),  # a string is not the number 4
    ):
        r = gateway.request("/admins/x", token=gateway.token(sub, **claims))
        assert_refused(r)
    # No token at all: jwt_authn answers first (401), RBAC never sees it.
    assert gateway.request("/admins/x").status == 401


@pytest.mark.envoy
def test_deny_by_claim(gateway: Gateway) -> None:
    """jwt_optional + deny groups: banned: a banned token is refused; another token, and a
    request without one (no claims to match), pass."""
    banned = tagged("/not-banned/x")
    r = gateway.request(banned, token=gateway.token("eve", groups=["staff", "banned"]))
    assert_refused(r)
    assert gateway.log_line(banned)["access_denied_by"] == "deny-0"
    ok = gateway.request("/not-banned/x", token=gateway.token("eve", groups=["staff"]))
    assert ok.text == "not-banned"
    assert gateway.request("/not-banned/x").text == "not-banned"


# -- source address, method, path -------------------------------------------------------------


@pytest.mark.envoy
def test_allow_by_source_address(gateway: Gateway) -> None:
    """The test connects from 127.0.0.1: inside 127.0.0.0/8, outside 10/8 and 192.168/16."""
    assert gateway.request("/loopback/x").text == "loopback"
    assert_refused(gateway.request("/internal/x"))


@pytest.mark.envoy
@pytest.mark.parametrize(
    ("method", "path", "allowed"),
    [
        ("GET", "/mp/read/report", True),
        ("HEAD", "/mp/read/report", True),
        ("GET", "/mp/read/report?x=/mp/write", True),  # the query is not part of the path
        ("POST", "/mp/read/report", False),  # right path, wrong method
        ("POST", "/mp/write", True),
        ("POST", "/mp/write?x=1", True),
        ("GET", "/mp/write", False),  # right path, wrong method
        ("POST", "/mp/write/more", False),  # exact path only
        ("POST", "/mp/files/upload", True),  # glob in the middle
        ("POST", "/mp/files/upload/x", False),
        ("DELETE", "/mp/read/report", False),
        ("GET", "/mp/other", False),
    ],
)
def test_by_method_and_path(gateway: Gateway, method: str, path: str, allowed: bool) -> None:
    body = b"x" if method == "POST" else None
    r = gateway.request(path, method=method, body=body)
    if allowed:
        assert r.status == 200, (method, path, r)
    else:
        assert_refused(r)


@pytest.mark.envoy
def test_path_rules_see_the_normalized_path(gateway: Gateway) -> None:
    """Paths are normalized before RBAC: a dot-segment cannot walk out of an allowed
    prefix into a denied one."""
    assert_refused(gateway.request("/docs/public/../internal/plan"))
    assert_refused(gateway.request("/docs//internal/plan"))


@pytest.mark.envoy
def test_deny_beats_allow(gateway: Gateway) -> None:
    """/docs/* is allowed, /docs/internal/* denied: a request both match is refused."""
    assert gateway.request("/docs/guide").text == "docs"
    denied = tagged("/docs/internal/plan")
    assert_refused(gateway.request(denied))
    line = gateway.log_line(denied)
    assert line["access_denied_by"] == "deny-0", line
    assert line["details"] == "rbac_access_denied_matched_policy[deny-0]", line


@pytest.mark.envoy
@pytest.mark.parametrize(
    "path", ["/docs/INTERNAL/plan", "/docs/Internal/plan", "/docs/%49nternal/x"]
)
def test_a_deny_rule_refuses_every_case(gateway: Gateway, path: str) -> None:
    """An upstream that compares paths case-insensitively reads these as /docs/internal/:
    the deny rule's path matches in any case."""
    assert_refused(gateway.request(path))


@pytest.mark.envoy
def test_an_allow_rule_allows_only_the_case_written(gateway: Gateway) -> None:
    """/mp/read/* allows GET: /mp/READ/x is not allowed (default deny). Allowing fewer
    spellings than the upstream reads is the safe side."""
    assert gateway.request("/mp/read/x").status == 200
    assert_refused(gateway.request("/mp/READ/x"))


@pytest.mark.envoy
def test_default_deny_without_allow_rules(gateway: Gateway) -> None:
    for method in ("GET", "POST"):
        r = gateway.request("/closed/x", method=method, body=b"x" if method == "POST" else None)
        assert_refused(r)


# -- shadow mode ------------------------------------------------------------------------------


@pytest.mark.envoy
def test_shadow_mode_logs_without_denying(gateway: Gateway) -> None:
    """shadow: true with default deny, allow GET, deny /trial/secret: every request is
    served, and the access log says which ones the rules would refuse, and why."""
    secret, post, fine = tagged("/trial/secret"), tagged("/trial/x"), tagged("/trial/x")
    both = tagged("/trial/secret")
    assert gateway.request(secret).text == "trial"  # deny-0 would refuse it
    assert gateway.request(post, method="POST", body=b"x").text == "trial"  # not allowed
    assert gateway.request(both, method="POST", body=b"x").text == "trial"  # both reasons
    assert gateway.request(fine).text == "trial"
    line = gateway.log_line(secret)
    assert line["status"] == 200, line
    assert line["access_shadow"] == "denied", line
    assert line["access_shadow_denied_by"] == "deny-0", line
    assert line["access_denied_by"] in (None, "-"), line
    line = gateway.log_line(post)
    assert (line["status"], line["access_shadow"]) == (200, "denied"), line
    assert line["access_shadow_denied_by"] == "no-allow-rule", line
    # Both a deny rule and the default would refuse it: the deny rule is named.
    line = gateway.log_line(both)
    assert (line["access_shadow"], line["access_shadow_denied_by"]) == ("denied", "deny-0")
    line = gateway.log_line(fine)
    assert (line["status"], line["access_shadow"]) == (200, "allowed"), line
    assert line["access_shadow_denied_by"] in (None, "-"), line
    # Envoy counts the shadow decisions too.
    shadow_denied = gateway.envoy.stats(r"^http\.http\.rbac\.shadow_denied$")
    assert shadow_denied.get("http.http.rbac.shadow_denied", 0) >= 3, shadow_denied


@pytest.mark.envoy
def test_routes_without_rules_log_no_decision(gateway: Gateway) -> None:
    path = tagged("/healthz")
    assert gateway.request(path).status == 200
    line = gateway.log_line(path)
    for key in ("access_denied_by", "access_shadow", "access_shadow_denied_by"):
        assert line[key] in (None, "-"), (key, line)


# -- changing rules ---------------------------------------------------------------------------


@pytest.mark.envoy
def test_changing_rules_updates_only_the_route_configuration(own_gateway: Gateway) -> None:
    """Opening /closed/ to GET is an RDS update: the listener (its RBAC filter has no rules
    of its own) is not touched, so no connection is drained. It edits the policy: on a
    gateway of its own."""
    gateway = own_gateway
    assert_refused(gateway.request("/closed/x"))
    listener_stats = r"^listener_manager\.(lds\.update_success|listener_modified)$"
    before = gateway.envoy.stats(listener_stats)
    rds = gateway.envoy.stat("http.http.rds.http.update_success")
    policy = gateway.root / "policy" / "edge.yaml"
    text = policy.read_text()
    closed = "access: {default: deny}\n"
    assert text.count(closed) == 1
    write_atomic(
        policy, text.replace(closed, "access: {default: deny, allow: [{methods: [GET]}]}\n")
    )
    wait_until(lambda: gateway.request("/closed/x").status == 200, 10, what="GET allowed")
    assert_refused(gateway.request("/closed/x", method="POST", body=b"x"))
    assert gateway.envoy.stat("http.http.rds.http.update_success") > rds
    assert gateway.envoy.stats(listener_stats) == before
