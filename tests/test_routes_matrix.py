"""`xdsplane routes`: the access matrix, and that it cannot drift from what Envoy is given.

Every claim of every row is checked against the translated resources (the JSON of the
Listener, RouteConfiguration, Cluster and jwt_authn ECDS config the snapshot serves), for
the sample and every golden policy; the broken-policy corpus is refused as `validate`
refuses it. The sample's admin route reads certificate-only.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from test_policy_corpus import CORPUS, make_pki
from test_policy_golden import CASES as GOLDEN_CASES
from test_policy_golden import prepare
from test_sample import sample_copy

from xdsplane import pipeline
from xdsplane.cli import main
from xdsplane.policy.matrix import CERTIFICATE_ONLY, RouteAccess, access_matrix
from xdsplane.policy.model import duration_seconds
from xdsplane.policy.translate.authz import glob_regex
from xdsplane.render import message_to_json
from xdsplane.snapshot import Snapshot
from xdsplane.types import ResourceType

RBAC = "envoy.filters.http.rbac"
JWT = "envoy.filters.http.jwt_authn"
EXT_AUTHZ = "envoy.filters.http.ext_authz"
LOCAL = "envoy.filters.http.local_ratelimit"
GLOBAL = "envoy.filters.http.ratelimit"
_TLS = {"TLSv1_0": "1.0", "TLSv1_1": "1.1", "TLSv1_2": "1.2", "TLSv1_3": "1.3"}


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, _ = sample_copy(tmp_path_factory.mktemp("sample"))
    return folder


def _json(snap: Snapshot, rtype: ResourceType, name: str) -> dict[str, Any]:
    found = snap.of(rtype).get(name)
    assert found is not None, f"no {rtype.short} {name!r}"
    return message_to_json(found.message)


def _hcm_filters(listener: dict[str, Any], chain: str) -> dict[str, Any]:
    for fc in listener["filter_chains"]:
        if fc.get("name") == chain:
            hcm = fc["filters"][0]["typed_config"]
            return {f["name"]: f for f in hcm["http_filters"]}
    raise AssertionError(f"no filter chain {chain}")


def _versions(params: dict[str, Any]) -> str:
    low = _TLS[params.get("tls_minimum_protocol_version", "TLSv1_2")]
    return f"{low}-{_TLS[params['tls_maximum_protocol_version']]}"


def check_row(row: RouteAccess, snap: Snapshot) -> None:
    """Every claim of ``row``, read back from the resources Envoy gets."""
    listener = _json(snap, ResourceType.LISTENER, row.listener)
    if row.redirect is not None:
        rc = _json(snap, ResourceType.ROUTE, row.listener)
        assert rc["virtual_hosts"][0]["routes"][0]["redirect"]["https_redirect"] is True
        assert "transport_socket" not in listener["filter_chains"][0]
        return
    tls = row.tls is not None
    chain = f"{row.listener}/{row.host}" if tls else row.listener
    rc = _json(snap, ResourceType.ROUTE, chain if tls else row.listener)
    vhost = next(v for v in rc["virtual_hosts"] if v["name"] == row.host)
    route = next(r for r in vhost["routes"] if r["name"] == f"{row.host}/{row.route}")
    per = route.get("typed_per_filter_config", {})
    filters = _hcm_filters(listener, chain)

    # TLS and the client certificate of the handshake
    fc = next(f for f in listener["filter_chains"] if f.get("name") == chain)
    if not tls:
        assert "transport_socket" not in fc and row.client_certificate == "off"
    else:
        ctx = fc["transport_socket"]["typed_config"]
        assert _versions(ctx["common_tls_context"]["tls_params"]) == row.tls
        want = {"required": True, "optional": False, "off": None}[row.client_certificate]
        assert ctx.get("require_client_certificate") == want, row
    assert (vhost["routes"][0]["name"].endswith("(path-parameters)")) == (
        row.path_parameters == "reject"
    )

    # the match
    m, rm = row.match, route["match"]
    assert m is not None
    key = {"path_prefix": "path_separated_prefix", "regex": "safe_regex"}.get(m.kind, m.kind)
    if m.kind == "regex":
        assert rm["safe_regex"]["regex"] == (m.value if m.case_sensitive else f"(?i){m.value}")
    else:
        assert rm[key] == m.value, (rm, m)
        assert rm.get("case_sensitive", True) == m.case_sensitive
    methods = [h for h in rm.get("headers", []) if h["name"] == ":method"]
    assert bool(methods) == bool(m.methods)
    if m.methods:
        assert methods[0]["string_match"]["safe_regex"]["regex"] == f"^({'|'.join(m.methods)})$"

    # RBAC: enforced and shadow policies, and the SANs of the client-certificate one
    if row.rbac is None:
        assert RBAC not in per or "rbac" not in per[RBAC]
        assert row.client_sans == () and not row.require_client_certificate
    else:
        rbac = per[RBAC]["rbac"]
        assert sorted(rbac.get("rules", {}).get("policies", {})) == list(row.rbac.enforced)
        assert sorted(rbac.get("shadow_rules", {}).get("policies", {})) == list(row.rbac.shadow)
        if row.require_client_certificate:
            policy = json.dumps(rbac["rules"]["policies"]["client-certificate"])
            for glob in row.client_sans:
                assert json.dumps(glob_regex(glob))[1:-1] in policy
            assert ("any_validated_client_certificate" in policy) == (not row.client_sans)

    # JWT: the route's requirement, the provider's issuer and audiences (ECDS)
    if row.jwt is None:
        assert per.get(JWT, {"disabled": True}).get("disabled") is True
    else:
        suffix = "" if row.jwt.required else "/optional"
        assert per[JWT]["requirement_name"] == row.jwt.provider + suffix
        ecds = _json(snap, ResourceType.EXTENSION, JWT)["typed_config"]
        provider = ecds["providers"][row.jwt.provider]
        assert provider["issuer"] == row.jwt.issuer
        assert provider["audiences"] == list(row.jwt.audiences)

    # the guard: replay (the HCM's ext_authz applies), revocation only, or never asked
    if row.replay_protection:
        assert EXT_AUTHZ in filters and EXT_AUTHZ not in per
    elif "http_service" in per.get(EXT_AUTHZ, {}).get("check_settings", {}):
        # guard.transport: http: the mode is the path prefix of the route's own http_service
        assert row.revocation_check and row.introspection is None
        service = per[EXT_AUTHZ]["check_settings"]["http_service"]
        assert service["path_prefix"] == "/xdsplane-check/revocation"
    elif row.revocation_check or row.introspection is not None:
        ext = per[EXT_AUTHZ]["check_settings"]["context_extensions"]
        if row.introspection is not None:
            assert ext["xdsplane_introspection"] == row.introspection
            assert ext.get("xdsplane_scopes", "").split() == list(row.require_scopes)
    else:
        assert per.get(EXT_AUTHZ, {"disabled": True}).get("disabled") is True
    if row.guard_fail_open is not None and EXT_AUTHZ in filters:
        allow = filters[EXT_AUTHZ]["typed_config"].get("failure_mode_allow", False)
        assert allow == row.guard_fail_open

    # rate limits
    assert (LOCAL in per) == (row.rate_limit is not None)
    if row.rate_limit is not None:
        bucket = per[LOCAL]["token_bucket"]
        assert bucket["max_tokens"] == row.rate_limit.requests
        assert float(bucket["fill_interval"].rstrip("s")) == duration_seconds(row.rate_limit.per)
    assert (GLOBAL in per) == (row.global_rate_limit is not None)

    # where it goes, and how the upstream is reached
    if row.direct_response is not None:
        assert route["direct_response"]["status"] == row.direct_response
        return
    assert route["route"]["cluster"] == row.upstream
    cluster = _json(snap, ResourceType.CLUSTER, row.upstream or "")
    if row.upstream_tls is None:
        assert "transport_socket" not in cluster
        return
    up = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert bool(up.get("tls_certificate_sds_secret_configs")) == row.upstream_tls.mtls
    sans = up["combined_validation_context"]["default_validation_context"]
    names = [s["matcher"]["exact"] for s in sans.get("match_typed_subject_alt_names", [])]
    assert names == list(row.upstream_tls.subject_alt_names)
    t = row.upstream_tls
    assert _versions(up["tls_params"]) == f"{t.min_version}-{t.max_version}"


def check_folder(folder: Path) -> int:
    loaded = pipeline.load(folder)
    assert loaded.snapshots is not None, loaded.errors
    rows = 0
    for g in loaded.snapshots.groups:
        for row in access_matrix(g.policy):
            check_row(row, g.snapshot)
            rows += 1
    return rows


def test_the_sample_matrix_says_what_envoy_is_given(sample: Path) -> None:
    assert check_folder(sample) == 5


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_every_golden_policy_matrix_says_what_envoy_is_given(case: str, tmp_path: Path) -> None:
    folder, _ = prepare(case, tmp_path)
    checked = check_folder(folder)
    # gRPC-only policies (grpc, grpc-server) have no Envoy route: nothing in the matrix
    assert checked > 0 or case.startswith("grpc"), case


CORPUS_CASES = sorted(p.name for p in CORPUS.iterdir() if p.is_dir())


def test_routes_refuses_what_validate_refuses(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The corpus holds broken policies only: `routes` shows no matrix for any of them, and
    says why as `validate` does."""
    for case in CORPUS_CASES:
        folder = tmp_path / case
        shutil.copytree(CORPUS / case, folder)
        make_pki(folder)
        assert main(["routes", str(folder)]) == 1, case
        out = capsys.readouterr()
        assert out.out == "", case
        assert "does not load" in out.err, case
        assert main(["validate", str(folder)]) == 1
        validate = capsys.readouterr().out.splitlines()
        assert validate and all(line in out.err for line in validate), case


def test_routes_shows_the_admin_route_as_certificate_only(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["routes", str(sample), "--node", "edge-1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    admin = next(line for line in lines if re.match(r"https\s+billing\s+admin\s", line))
    assert CERTIFICATE_ONLY in admin
    assert "spiffe://example.com/ops/*" in admin and "required (route" in admin
    strict = next(line for line in lines if re.match(r"https\s+billing-strict\s+all\s", line))
    assert "certificate-only" in strict and "required (handshake)" in strict
    token = next(line for line in lines if re.match(r"https\s+billing\s+billing\s", line))
    assert "token" in token and "replay" in token and "local 60/1m by jwt_sub" in token

    assert main(["routes", str(sample), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    rows = {(r["host"], r["route"]): r for g in data["groups"] for r in g["routes"]}
    admin_row = rows[("billing", "admin")]
    assert admin_row["who"] == CERTIFICATE_ONLY and admin_row["certificate_required"]
    assert admin_row["jwt"] is None and admin_row["rbac"]["enforced"] == ["client-certificate"]
    assert admin_row["upstream_tls"]["mtls"] is True
    assert rows[("billing", "billing")]["jwt"]["audiences"] == ["billing"]
    assert rows[("*", "redirect-to-https")]["redirect"].startswith("https, port ")

    assert main(["routes", str(sample), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    assert "| https | billing | admin |" in md and "certificate-only" in md


def test_routes_for_an_unknown_node(sample: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["routes", str(sample), "--node", "other"]) == 1
    assert "selects node 'other'" in capsys.readouterr().err


HOSTILE = """
listeners:
  - name: plain
    address: 127.0.0.1:8080
    hosts:
      - name: h
        domains: [example.com]
        routes:
          - name: shadowed
            prefix: /a/
            access:
              shadow: true
              deny: [{paths: ["/a/<script>x|y`z"], methods: [POST]}]
            upstream: u
          - name: open
            prefix: /
            upstream: u
upstreams:
  u: {endpoints: ["127.0.0.1:9000"]}
"""


def test_markdown_and_table_keep_hostile_text_in_its_cell(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "p.yaml").write_text(HOSTILE)
    assert main(["routes", str(tmp_path), "--format", "markdown"]) == 0
    md = capsys.readouterr().out
    row = next(line for line in md.splitlines() if "| shadowed |" in line)
    assert "<script>" not in md and "&lt;script&gt;" in row
    assert row.count(" | ") == 12  # 13 cells: the '|' of the policy text is escaped
    assert "SHADOW (logged only): deny-0" in row
    loaded = pipeline.load(tmp_path)
    assert loaded.snapshots is not None
    rows = access_matrix(loaded.snapshots.groups[0].policy)
    assert rows[0].rbac is not None and rows[0].rbac.shadow == ("deny-0",)
    assert rows[0].rbac.enforced == () and rows[1].who == "open"
    check_row(rows[0], loaded.snapshots.groups[0].snapshot)


EVERY_KEY = """
guard: {address: 127.0.0.1:18081, fail_open: true}
secrets:
  edge: {certificate: certs/edge.crt, private_key: certs/edge.key}
  clients: {ca: certs/client-ca.crt}
  service-ca: {ca: certs/service-ca.crt}
jwt_providers:
  idp: {issuer: https://idp.example.com, audiences: [a, b], jwks_file: jwks.json,
        max_lifetime: 5m}
listeners:
  - name: edge
    address: 127.0.0.1:8443
    tls: {min_version: "1.3"}
    hosts:
      - name: api
        domains: [api.example.com]
        certificate: edge
        client_certificate: optional
        client_ca: clients
        path_parameters: allow
        routes:
          - name: audited
            path: /audit
            jwt: idp
            access:
              default: deny
              allow: [{jwt_claims: {grp: [auditors, admins]}, methods: [GET]}]
              deny: [{sources: [10.0.0.0/8]}, {paths: ["/audit/*"]}]
            upstream: tls-only
          - name: trial
            prefix: /trial/
            jwt_optional: idp
            revocation_check: true
            allow_client_sans: ["spiffe://example.com/ops/*", "ops.example.com"]
            access: {shadow: true, deny: [{client_sans: ["spiffe://x/*"]}]}
            upstream: plain
          - name: img
            regex: "^/img/[0-9]+$"
            case_sensitive: false
            headers: [{name: accept, prefix: image/}]
            methods: [GET, HEAD]
            global_rate_limit: {requests: 5, per: 1s, by: source_address}
            upstream: plain
upstreams:
  tls-only:
    endpoints: [127.0.0.1:9443]
    tls: {ca: service-ca, subject_alt_names: [svc.internal], min_version: "1.3"}
  plain: {endpoints: [127.0.0.1:9000]}
"""


def test_every_key_the_matrix_shows_says_what_envoy_is_given(tmp_path: Path) -> None:
    """Access rules (enforced and shadow), jwt_optional, revocation_check, a guard that
    fails open, regex with headers and methods, TLS without mTLS, a plaintext upstream."""
    (tmp_path / "policy.yaml").write_text(EVERY_KEY)
    shutil.copy(Path(__file__).parent / "golden" / "jwt" / "jwks.json", tmp_path)
    (tmp_path / "pki.txt").write_text(
        "cert certs/edge.crt certs/edge.key api.example.com\n"
        "ca certs/client-ca.crt\nca certs/service-ca.crt\n"
    )
    make_pki(tmp_path)
    assert check_folder(tmp_path) == 3
    loaded = pipeline.load(tmp_path)
    assert loaded.snapshots is not None
    audited, trial, img = access_matrix(loaded.snapshots.groups[0].policy)
    assert audited.rbac is not None and audited.rbac.enforced == (
        "deny-0",
        "deny-1",
        "no-allow-rule",
    )
    assert audited.who == "token" and audited.upstream_tls is not None
    assert not audited.upstream_tls.mtls
    assert trial.rbac is not None and trial.rbac.shadow == ("deny-0",)
    assert trial.rbac.enforced == ("client-certificate",)
    assert trial.jwt is not None and not trial.jwt.required and trial.revocation_check
    # a SAN list alone checks presented certificates: no certificate is required
    assert trial.guard_fail_open is True and trial.who == "open"
    assert not trial.certificate_required and trial.client_sans
    assert img.match is not None and img.match.kind == "regex" and not img.match.case_sensitive
    assert img.match.methods == ("GET", "HEAD") and img.match.headers == ("accept",)
    assert img.who == "open" and img.global_rate_limit is not None


TOKEN = "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJlc2lnbmF0dXJlc2ln"
KEY_BODY = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQg"


def test_a_pasted_token_or_key_is_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A token pasted into an access rule and a private key pasted as an issuer show as
    fingerprints in every format (the JSON is what /status and `report` show too)."""
    policy = f"""
listeners:
  - name: plain
    address: 127.0.0.1:8080
    hosts:
      - name: h
        domains: [example.com]
        routes:
          - name: r
            prefix: /
            jwt: idp
            access: {{deny: [{{paths: ["/a/{TOKEN}"]}}]}}
            upstream: u
upstreams:
  u: {{endpoints: ["127.0.0.1:9000"]}}
jwt_providers:
  idp:
    issuer: "-----BEGIN PRIVATE KEY-----\\n{KEY_BODY}\\n-----END PRIVATE KEY-----"
    audiences: [a]
    jwks_file: jwks.json
"""
    (tmp_path / "p.yaml").write_text(policy)
    shutil.copy(Path(__file__).parent / "golden" / "jwt" / "jwks.json", tmp_path)
    for fmt in ("table", "json", "markdown"):
        assert main(["routes", str(tmp_path), "--format", fmt]) == 0
        out = capsys.readouterr().out
        assert "redacted sha256:" in out, fmt
        assert TOKEN not in out and TOKEN[:30] not in out and KEY_BODY not in out, fmt
