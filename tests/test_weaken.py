"""`diff` names what weakens security, as an attacker would look for it.

Each weakening below is a change a reviewer could miss in a field diff (a SAN glob that
covers more, a route moved above the protected one, a protected route renamed while its
check is dropped, a match widened over it); each must be flagged, naming its listener, host
and route. Strengthening changes must not be. The last tests run `xdsplane diff
--fail-on-weaken` on the sample: exit 3 and the admin route named.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_sample import sample_copy

from xdsplane import pipeline
from xdsplane.cli import main
from xdsplane.policy.matrix import RouteAccess, access_matrix
from xdsplane.policy.weaken import Weakening, glob_covers, weakenings

BASE: dict[str, Any] = yaml.safe_load(
    """
nodes: ["edge-*"]
secrets:
  server: {certificate: s.crt, private_key: s.key}
  clients: {ca: ca.crt}
  gw: {certificate: g.crt, private_key: g.key}
  svc: {ca: svc.crt}
listeners:
  - name: https
    address: 127.0.0.1:8443
    tls: {min_version: "1.2"}
    hosts:
      - name: billing
        domains: [billing.example.com]
        certificate: server
        client_certificate: optional
        client_ca: clients
        routes:
          - {name: healthz, path: /healthz, direct_response: {status: 200}}
          - {name: blocked, path_prefix: /internal, direct_response: {status: 403}}
          - name: admin
            path_prefix: /billing/admin
            case_sensitive: false
            require_client_certificate: true
            allow_client_sans: ["spiffe://example.com/ops/*"]
            upstream: billing
          - name: reports
            prefix: /billing/reports/
            jwt: idp
            access:
              default: deny
              allow: [{jwt_claims: {grp: auditors}}]
              deny: [{methods: [DELETE]}]
            upstream: billing
          - name: billing
            prefix: /billing/
            jwt: idp
            replay_protection: true
            rate_limit: {requests: 60, per: 1m, by: jwt_sub}
            global_rate_limit: {requests: 1000, per: 1h, by: jwt_sub}
            upstream: billing
      - name: strict
        domains: [mtls.billing.example.com]
        certificate: server
        client_certificate: required
        client_ca: clients
        routes:
          - {name: all, prefix: /, upstream: billing}
upstreams:
  billing:
    endpoints: [127.0.0.1:9443]
    tls: {certificate: gw, ca: svc, sni: billing.internal, subject_alt_names: [billing.internal]}
jwt_providers:
  idp:
    {issuer: https://idp.example.com, audiences: [billing], jwks_file: jwks.json, max_lifetime: 5m}
guard: {address: 127.0.0.1:18081}
"""
)


def matrix(doc: dict[str, Any], folder: Path) -> tuple[RouteAccess, ...]:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "policy.yaml").write_text(yaml.safe_dump(doc))
    groups, errors = pipeline.load_policy(folder)
    assert not errors, [str(e) for e in errors]
    return access_matrix(groups[0].policy)


def routes(doc: dict[str, Any], host: str = "billing") -> list[dict[str, Any]]:
    return next(h for h in doc["listeners"][0]["hosts"] if h["name"] == host)["routes"]  # type: ignore[no-any-return]


def route(doc: dict[str, Any], name: str, host: str = "billing") -> dict[str, Any]:
    return next(r for r in routes(doc, host) if r["name"] == name)


def found(edit: Callable[[dict[str, Any]], None], tmp_path: Path) -> list[Weakening]:
    new = copy.deepcopy(BASE)
    edit(new)
    return weakenings(matrix(BASE, tmp_path / "old"), matrix(new, tmp_path / "new"))


def _host(doc: dict[str, Any], name: str) -> dict[str, Any]:
    return next(h for h in doc["listeners"][0]["hosts"] if h["name"] == name)  # type: ignore[no-any-return]


def _drop_admin_check(d: dict[str, Any]) -> None:
    r = route(d, "admin")
    del r["require_client_certificate"], r["allow_client_sans"]


def _rename_and_drop(d: dict[str, Any]) -> None:
    r = route(d, "admin")
    r["name"] = "admin-v2"
    del r["require_client_certificate"], r["allow_client_sans"]


def _open_route_above(d: dict[str, Any]) -> None:
    routes(d).insert(0, {"name": "docs", "prefix": "/billing/", "upstream": "billing"})


def _healthz_wider(d: dict[str, Any]) -> None:
    r = route(d, "healthz")
    del r["path"]
    r["prefix"] = "/"


def _exact_open_path_above(d: dict[str, Any]) -> None:
    routes(d).insert(0, {"name": "audit", "path": "/billing/admin/audit", "upstream": "billing"})


def _set(path: str, value: Any, host: str = "billing") -> Callable[[dict[str, Any]], None]:
    """Set ``value`` at ``route.key`` (route name first), or drop the key (value None)."""

    def edit(d: dict[str, Any]) -> None:
        name, *keys = path.split(".")
        target: dict[str, Any] = route(d, name, host)
        for k in keys[:-1]:
            target = target[k]
        if value is None:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value

    return edit


def _host_set(key: str, value: Any, host: str = "strict") -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        h = _host(d, host)
        if value is None:
            del h[key]
        else:
            h[key] = value

    return edit


def _host_off(d: dict[str, Any]) -> None:
    h = _host(d, "strict")
    h["client_certificate"] = "off"
    del h["client_ca"]


def _legacy(d: dict[str, Any]) -> None:
    d["listeners"][0]["tls"] = {"min_version": "1.0", "allow_legacy_tls": True}


def _upstream(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(d: dict[str, Any]) -> None:
        tls = d["upstreams"]["billing"]["tls"]
        if value is None:
            del tls[key]
        else:
            tls[key] = value

    return edit


def _no_upstream_tls(d: dict[str, Any]) -> None:
    del d["upstreams"]["billing"]["tls"]
    del d["secrets"]["gw"], d["secrets"]["svc"]


def _jwt_optional(d: dict[str, Any]) -> None:
    r = route(d, "reports")
    r["jwt_optional"] = r.pop("jwt")
    r["access"]["allow"] = [{"methods": ["GET"]}]


def _nodes_renamed_and_dropped(d: dict[str, Any]) -> None:
    d["nodes"] = ["edge-*", "edge-canary"]
    _drop_admin_check(d)


def _jwt_removed(d: dict[str, Any]) -> None:
    r = route(d, "billing")
    del r["jwt"], r["replay_protection"]
    r["rate_limit"]["by"] = "source_address"
    r["global_rate_limit"]["by"] = "source_address"


def _blocked_opened(d: dict[str, Any]) -> None:
    r = route(d, "blocked")
    del r["direct_response"]
    r["upstream"] = "billing"


WEAKENINGS: dict[str, tuple[Callable[[dict[str, Any]], None], str, str]] = {
    # name: (edit, route named ("" for the host), text of the finding)
    "host required -> optional": (
        _host_set("client_certificate", "optional"),
        "",
        "client_certificate lowered: required -> optional",
    ),
    "host required -> off": (_host_off, "", "client_certificate lowered: required -> off"),
    "require_client_certificate removed": (
        _drop_admin_check,
        "admin",
        "require_client_certificate removed",
    ),
    "SAN glob widened": (
        _set("admin.allow_client_sans", ["spiffe://example.com/*"]),
        "admin",
        "SAN list widened: spiffe://example.com/*",
    ),
    "SAN entry added": (
        _set("admin.allow_client_sans", ["spiffe://example.com/ops/*", "spiffe://x/dev"]),
        "admin",
        "SAN list widened: spiffe://x/dev",
    ),
    "SAN list removed": (
        _set("admin.allow_client_sans", None),
        "admin",
        "SAN allow-list removed",
    ),
    "JWT removed": (_jwt_removed, "billing", "JWT (idp) removed"),
    "JWT made optional": (_jwt_optional, "reports", "JWT made optional"),
    "audience added": (
        lambda d: d["jwt_providers"]["idp"].update(audiences=["billing", "other"]),
        "billing",
        "JWT audiences widened: + other",
    ),
    "replay removed": (_set("billing.replay_protection", None), "billing", "replay protection"),
    "local limit removed": (
        _set("billing.rate_limit", None),
        "billing",
        "local rate limit removed",
    ),
    "local limit loosened": (
        _set("billing.rate_limit", {"requests": 2, "per": "1s", "by": "jwt_sub"}),
        "billing",
        "local rate limit loosened: 60/1m -> 2/1s",
    ),
    "global limit loosened": (
        _set("billing.global_rate_limit", {"requests": 100, "per": "1m", "by": "jwt_sub"}),
        "billing",
        "global rate limit loosened",
    ),
    "access to shadow": (_set("reports.access.shadow", True), "reports", "moved to shadow"),
    "access turned to allow": (
        _set("reports.access", {"default": "allow", "deny": [{"methods": ["DELETE"]}]}),
        "reports",
        "access default turned to allow",
    ),
    "deny rule removed": (
        _set("reports.access.deny", []),
        "reports",
        "deny rule removed: methods=DELETE",
    ),
    "allow rule added": (
        _set("reports.access.allow", [{"jwt_claims": {"grp": "auditors"}}, {"methods": ["GET"]}]),
        "reports",
        "allow rule added: methods=GET",
    ),
    "min_version lowered": (_legacy, "", "min_version lowered: 1.2 -> 1.0"),
    "legacy TLS on": (_legacy, "", "allow_legacy_tls turned on"),
    "upstream TLS removed": (_no_upstream_tls, "admin", "upstream TLS removed"),
    "upstream mTLS removed": (
        lambda d: (_upstream("certificate", None)(d), d["secrets"].pop("gw")),
        "admin",
        "upstream mutual TLS removed",
    ),
    "upstream SAN pinning removed": (
        _upstream("subject_alt_names", None),
        "admin",
        "upstream SAN pinning removed",
    ),
    "path parameters allowed": (
        _host_set("path_parameters", "allow", "billing"),
        "",
        "path_parameters: reject -> allow",
    ),
    "case_sensitive on a protected route": (
        _set("admin.case_sensitive", True),
        "admin",
        "case_sensitive",
    ),
    "open route moved above the protected one": (
        _open_route_above,
        "admin",
        "(now reaches route docs): client certificate no longer required",
    ),
    "protected route renamed while its check is dropped": (
        _rename_and_drop,
        "admin",
        "(now reaches route admin-v2): client certificate no longer required",
    ),
    "a route's match widened over the others": (
        _healthz_wider,
        "admin",
        "(now reaches route healthz)",
    ),
    "an exact open path above a protected prefix": (
        _exact_open_path_above,
        "admin",
        "GET /billing/admin/audit (now reaches route audit)",
    ),
    "a refused path now reaches the upstream": (
        _blocked_opened,
        "blocked",
        "now reaches upstream billing (was refused: 403)",
    ),
    "nodes changed while a check is dropped": (
        _nodes_renamed_and_dropped,
        "admin",
        "require_client_certificate removed",
    ),
}


@pytest.mark.parametrize("name", sorted(WEAKENINGS))
def test_each_weakening_is_flagged_naming_its_route(name: str, tmp_path: Path) -> None:
    edit, where, text = WEAKENINGS[name]
    got = found(edit, tmp_path)
    lines = [w.line() for w in got]
    hits = [w for w in got if w.route == where and text in w.line()]
    assert hits, f"{name}: not flagged as {where!r}: {text!r}; got {lines}"
    assert all(w.listener == "https" for w in hits)


def _tighter_limit(d: dict[str, Any]) -> None:
    route(d, "billing")["rate_limit"] = {"requests": 30, "per": "1m", "by": "jwt_sub"}


def _narrower_sans(d: dict[str, Any]) -> None:
    route(d, "admin")["allow_client_sans"] = ["spiffe://example.com/ops/alice"]


def _rename_keep_checks(d: dict[str, Any]) -> None:
    route(d, "admin")["name"] = "administration"


def _route_below(d: dict[str, Any]) -> None:
    routes(d).append({"name": "status", "path": "/status", "upstream": "billing"})


def _optional_to_required(d: dict[str, Any]) -> None:
    _host(d, "billing")["client_certificate"] = "required"


STRENGTHENINGS: dict[str, Callable[[dict[str, Any]], None]] = {
    "nothing": lambda d: None,
    "host optional -> required": _optional_to_required,
    "SANs narrowed": _narrower_sans,
    "rate limit tightened": _tighter_limit,
    "route renamed, checks kept": _rename_keep_checks,
    "open route added below the others": _route_below,
    "min_version raised": lambda d: d["listeners"][0].update(tls={"min_version": "1.3"}),
    "upstream SAN narrowed": _upstream("subject_alt_names", ["billing.internal"]),
    "JWT added to the strict host": _set("all.jwt", "idp", "strict"),
    "deny rule added": _set("reports.access.deny", [{"methods": ["DELETE"]}, {"paths": ["/x"]}]),
    "upstream min_version raised": _upstream("min_version", "1.3"),
    "case-insensitive billing route": _set("billing.case_sensitive", False),
}


@pytest.mark.parametrize("name", sorted(STRENGTHENINGS))
def test_strengthening_is_not_flagged(name: str, tmp_path: Path) -> None:
    got = found(STRENGTHENINGS[name], tmp_path)
    assert got == [], [w.line() for w in got]


def test_glob_cover() -> None:
    assert glob_covers("spiffe://example.com/*", "spiffe://example.com/ops/*")
    assert glob_covers("a*b*", "a*b")
    assert not glob_covers("spiffe://example.com/ops/*", "spiffe://example.com/*")
    assert not glob_covers("a*b", "a*")
    assert not glob_covers("ab", "a*")


# -- the command ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder, _ = sample_copy(tmp_path_factory.mktemp("sample"))
    return folder


def _edited(sample: Path, into: Path, old: str, new: str) -> Path:
    folder = into / "snapshots"
    folder.mkdir(parents=True)
    text = (sample / "billing-edge.yaml").read_text()
    assert old in text
    (folder / "billing-edge.yaml").write_text(text.replace(old, new))
    (into / "certs").symlink_to(sample.parent / "certs")
    return folder


def test_diff_fail_on_weaken_names_the_admin_route(
    sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the reviewer's edit (issue #14): only the requirement goes; the SAN list stays and
    # checks presented certificates only
    checks = "            require_client_certificate: true\n"
    new = _edited(sample, tmp_path, checks, "")
    assert main(["diff", str(sample), str(new)]) == 0  # marked, but no exit status asked
    plain = capsys.readouterr()
    assert "! weakens nodes edge-*: listener https, host billing, route admin:" in plain.out
    assert main(["diff", str(sample), str(new), "--fail-on-weaken"]) == 3
    out = capsys.readouterr()
    assert out.out == plain.out
    lines = [line for line in out.out.splitlines() if line.startswith("! weakens")]
    assert lines == [
        "! weakens nodes edge-*: listener https, host billing, route admin: client "
        "certificate no longer required (require_client_certificate removed)"
    ]
    assert "1 change(s) weaken a route or host" in out.err


def test_diff_fail_on_weaken_passes_a_strengthening(
    sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    new = _edited(sample, tmp_path, "{requests: 60, per: 1m", "{requests: 30, per: 1m")
    assert main(["diff", str(sample), str(new), "--fail-on-weaken"]) == 0
    out = capsys.readouterr()
    assert "! weakens" not in out.out and "weaken a route" not in out.err
    assert main(["diff", str(sample), str(sample), "--fail-on-weaken"]) == 0
    assert capsys.readouterr().out.startswith("no differences")


def test_any_two_golden_policies_compare(tmp_path: Path) -> None:
    """Every pair of golden policies (and the sample's shape, BASE) compares without error;
    a policy compared with itself weakens nothing."""
    from test_policy_golden import CASES, prepare

    matrices = {"base": matrix(BASE, tmp_path / "base")}
    for case in CASES:
        folder, _ = prepare(case, tmp_path / "golden")
        loaded = pipeline.load(folder)
        assert loaded.snapshots is not None, loaded.errors
        matrices[case] = access_matrix(loaded.snapshots.groups[0].policy)
    for a, old in matrices.items():
        assert weakenings(old, old) == [], a
        for b, new in matrices.items():
            assert isinstance(weakenings(old, new), list), (a, b)


def test_a_listener_turned_into_a_redirect_weakens_nothing(tmp_path: Path) -> None:
    def redirect(d: dict[str, Any]) -> None:
        d["listeners"][0] = {
            "name": "https",
            "address": "127.0.0.1:8443",
            "redirect_to_https": True,
            "https_port": 9443,
        }
        d["secrets"] = {}
        d.pop("guard")
        d.pop("jwt_providers")
        d["upstreams"]["billing"].pop("tls")

    assert found(redirect, tmp_path) == []
    back = copy.deepcopy(BASE)
    redirect(back)
    old, new = matrix(back, tmp_path / "a"), matrix(BASE, tmp_path / "b")
    assert weakenings(old, new) == []  # a redirect listener turned into an HTTPS one


def test_a_redirect_listener_that_now_serves_plain_http_is_flagged(tmp_path: Path) -> None:
    old = copy.deepcopy(BASE)
    old["listeners"].append(
        {"name": "http", "address": "127.0.0.1:8080", "redirect_to_https": True}
    )
    new = copy.deepcopy(BASE)
    new["listeners"].append(
        {
            "name": "http",
            "address": "127.0.0.1:8080",
            "hosts": [
                {
                    "name": "plain",
                    "domains": ["*"],
                    "routes": [{"prefix": "/", "upstream": "billing"}],
                }
            ],
        }
    )
    got = weakenings(matrix(old, tmp_path / "a"), matrix(new, tmp_path / "b"))
    assert [w.line() for w in got] == [
        "listener http, host *: no longer redirects to HTTPS: plain HTTP requests reach routes"
    ]
