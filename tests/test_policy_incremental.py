"""Incremental policy checks give exactly what a full check gives.

A long-lived loader keeps each host's checks by the host's content, with a reverse index of
the names they looked up (``policy/check_hosts.py``): after an edit only what changed, and
what refers to what changed, is checked again. Under random edits of a policy folder (routes
pointed at upstreams that exist or not, upstreams removed while a route names them, secrets
renamed, duplicates, a guard added or removed, TLS turned on and off, lines inserted, a file
moved to a node group) the checks of a long-lived cache must give the very errors of a cold
check, in the same order, with the same usage; and a long-lived loader the very result of a
new loader.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_incremental import load, outcome, write

from xdsplane.pipeline import FolderLoader
from xdsplane.pipeline.groups import merge_and_check, node_groups, scope_of
from xdsplane.policy.check_cache import HostChecks

SETTINGS = settings(
    max_examples=int(os.environ.get("XDSPLANE_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

UPSTREAMS = ["u0", "u1", "u2", "u3"]  # u3 is not defined at first
SECRETS = ["cert-a", "cert-b", "ca-a"]
PROVIDERS = ["idp", "idp2"]


def upstream(i: int) -> dict[str, Any]:
    return {"endpoints": [f"10.0.0.{i + 1}:8080"]}


def route(i: int, up: str) -> dict[str, Any]:
    return {"name": f"r{i}", "prefix": f"/r{i}/", "upstream": up}


def host(h: int, n: int) -> dict[str, Any]:
    return {
        "name": f"h{h}",
        "domains": [f"h{h}.example.com"],
        "routes": [route(i, UPSTREAMS[(h + i) % 3]) for i in range(n)],
    }


def initial() -> dict[str, Any]:
    return {
        "defs": {
            "upstreams": {f"u{i}": upstream(i) for i in range(3)},
            "secrets": {
                "cert-a": {"certificate": "a.crt", "private_key": "a.key"},
                "ca-a": {"ca": "ca.crt"},
            },
            "jwt_providers": {
                "idp": {
                    "issuer": "https://idp.example.com",
                    "audiences": ["api"],
                    "jwks_file": "jwks.json",
                    "max_lifetime": "5m",
                },
                "idp2": {
                    "issuer": "https://idp2.example.com",
                    "audiences": ["api"],
                    "jwks_file": "jwks.json",
                },
            },
        },
        "l0": {"name": "l0", "address": "127.0.0.1:10000", "hosts": [host(0, 3), host(1, 2)]},
        "l1": {"name": "l1", "address": "127.0.0.1:10001", "hosts": [host(2, 2), host(3, 3)]},
        "l0_extra": {},  # what l0's file holds besides its listener (a gRPC service)
        "l1_extra": {},  # definitions written in l1's file too (duplicates, or moved there)
        "l1_nodes": False,
        "pad": {"defs": 0, "l0": 0, "l1": 0},
    }


def render(state: dict[str, Any], root: Path) -> None:
    files = {
        "defs": dict(state["defs"]),
        "l0": {"listeners": [state["l0"]], **state["l0_extra"]},
        "l1": {"listeners": [state["l1"]], **state["l1_extra"]},
    }
    if state["l1_nodes"]:
        files["l1"]["nodes"] = ["edge-1"]
    for name, body in files.items():
        text = "# pad\n" * state["pad"][name] + yaml.safe_dump(body, sort_keys=True)
        path = root / f"{name}.yaml"
        if not path.exists() or path.read_text() != text:
            write(path, text)


def _routes(state: dict[str, Any], a: int) -> list[dict[str, Any]]:
    listener = state["l0" if a % 2 == 0 else "l1"]
    hosts = listener["hosts"]
    return hosts[(a // 2) % len(hosts)]["routes"]  # type: ignore[no-any-return]


def _route(state: dict[str, Any], a: int, b: int) -> dict[str, Any] | None:
    routes = _routes(state, a)
    return routes[b % len(routes)] if routes else None


def _host(state: dict[str, Any], a: int) -> dict[str, Any]:
    hosts = state["l0" if a % 2 == 0 else "l1"]["hosts"]
    return hosts[(a // 2) % len(hosts)]  # type: ignore[no-any-return]


def apply(state: dict[str, Any], edit: tuple[str, int, int]) -> None:
    kind, a, b = edit
    defs = state["defs"]
    r = _route(state, a, b)
    if kind == "route-upstream" and r is not None:
        r["upstream"] = UPSTREAMS[(a + b) % len(UPSTREAMS)]
    elif kind == "route-prefix" and r is not None:
        r["prefix"] = f"/p{b}/"
    elif kind == "route-add":
        routes = _routes(state, a)
        routes.insert(b % (len(routes) + 1), route(10 + b, UPSTREAMS[b % 4]))
    elif kind == "route-remove" and r is not None:
        _routes(state, a).remove(r)
    elif kind == "route-bad" and r is not None:  # a schema error inside one host
        r["prefix"] = f"p{b}/"
    elif kind == "host-swap":  # hosts that did not change, at other places
        hosts = state["l0" if a % 2 == 0 else "l1"]["hosts"]
        i, j = b % len(hosts), (b + 1) % len(hosts)
        hosts[i], hosts[j] = hosts[j], hosts[i]
    elif kind == "route-dup-name" and r is not None:
        r["name"] = "r0"
    elif kind == "upstream-remove":
        defs["upstreams"].pop(UPSTREAMS[b % 4], None)
    elif kind == "upstream-add":
        defs["upstreams"][UPSTREAMS[b % 4]] = upstream(b)
    elif kind == "upstream-ring-hash":
        name = UPSTREAMS[b % 4]
        if name in defs["upstreams"]:
            ups = dict(defs["upstreams"][name])
            if ups.get("lb") == "ring_hash":
                del ups["lb"]
            else:
                ups["lb"] = "ring_hash"
            defs["upstreams"][name] = ups
    elif kind == "upstream-tls":  # TLS to the upstream (its checks read the secrets)
        name = UPSTREAMS[a % 4]
        if name in defs["upstreams"]:
            ups = dict(defs["upstreams"][name])
            if "tls" in ups:
                del ups["tls"]
            else:
                ups["tls"] = {"ca": SECRETS[b % 3]}
                if b % 2:
                    ups["tls"]["certificate"] = SECRETS[(b + 1) % 3]
            defs["upstreams"][name] = ups
    elif kind == "upstream-localities":  # a locality given twice is an upstream's own error
        name = UPSTREAMS[a % 4]
        if name in defs["upstreams"]:
            zone = {"zone": "z1", "weight": 1, "endpoints": ["10.0.1.1:8080"]}
            other = {"zone": f"z{b % 2 + 1}", "weight": 1, "endpoints": ["10.0.1.2:8080"]}
            defs["upstreams"][name] = {"localities": [zone, other]}
    elif kind == "grpc-service":  # gRPC uses an upstream (then not checked for Envoy)
        extra = state["l0_extra"]
        if "grpc_services" in extra:
            del extra["grpc_services"]
        else:
            extra["grpc_services"] = [{"name": "billing.grpc:50051", "upstream": UPSTREAMS[b % 4]}]
    elif kind == "upstream-dup":  # the same name in a second file
        extra = state["l1_extra"].setdefault("upstreams", {})
        extra[UPSTREAMS[b % 4]] = upstream(b + 5)
    elif kind == "upstream-move":  # from one file to the other
        name = UPSTREAMS[b % 4]
        if name in defs["upstreams"]:
            state["l1_extra"].setdefault("upstreams", {})[name] = defs["upstreams"].pop(name)
    elif kind == "extra-clear":
        state["l1_extra"] = {}
    elif kind == "secret-rename":  # the certificate renamed, hosts still naming the old name
        old, new = SECRETS[a % 2], SECRETS[b % 2]
        if old in defs["secrets"] and new not in defs["secrets"]:
            defs["secrets"][new] = defs["secrets"].pop(old)
    elif kind == "secret-kind":
        name = SECRETS[b % 3]
        if name in defs["secrets"]:
            ca = "ca" in defs["secrets"][name]
            defs["secrets"][name] = (
                {"certificate": "x.crt", "private_key": "x.key"} if ca else {"ca": "x.crt"}
            )
    elif kind == "tls":
        listener = state["l0" if a % 2 == 0 else "l1"]
        if "tls" in listener:
            del listener["tls"]
            for h in listener["hosts"]:
                h.pop("certificate", None)
                h.pop("client_ca", None)
                h.pop("client_certificate", None)
        else:
            listener["tls"] = {}
            for h in listener["hosts"]:
                h["certificate"] = SECRETS[b % 3]
    elif kind == "host-cert":
        h = _host(state, a)
        h["certificate"] = SECRETS[b % 3]
    elif kind == "host-client-ca":
        h = _host(state, a)
        h["client_ca"] = SECRETS[b % 3]
        h["client_certificate"] = "optional"
    elif kind == "host-dup":
        hosts = state["l0" if a % 2 == 0 else "l1"]["hosts"]
        hosts.append(copy.deepcopy(hosts[b % len(hosts)]))
    elif kind == "host-remove":
        hosts = state["l0" if a % 2 == 0 else "l1"]["hosts"]
        if len(hosts) > 1:
            hosts.pop(b % len(hosts))
    elif kind == "host-domain":
        _host(state, a)["domains"] = [f"h{b % 3}.example.com"]
    elif kind == "jwt" and r is not None:
        r["jwt"] = PROVIDERS[b % 2]
        if b % 4 < 3:
            r["replay_protection"] = True
    elif kind == "jwt-off" and r is not None:
        r.pop("jwt", None)
    elif kind == "replay" and r is not None:
        r["replay_protection"] = not r.get("replay_protection", False)
    elif kind == "provider-toggle":
        name = PROVIDERS[b % 2]
        if name in defs["jwt_providers"]:
            del defs["jwt_providers"][name]
        else:
            defs["jwt_providers"][name] = {
                "issuer": f"https://{name}.example.com",
                "audiences": ["api"],
                "jwks_file": "jwks.json",
            }
    elif kind == "provider-lifetime":
        name = PROVIDERS[b % 2]
        if name in defs["jwt_providers"]:
            p = dict(defs["jwt_providers"][name])
            if "max_lifetime" in p:
                del p["max_lifetime"]
            else:
                p["max_lifetime"] = "5m"
            defs["jwt_providers"][name] = p
    elif kind == "guard":
        if "guard" in defs:
            del defs["guard"]
        else:
            defs["guard"] = {"address": "127.0.0.1:18081", "fail_open": bool(b % 2)}
    elif kind == "introspection" and r is not None:
        if "introspection" in r:
            del r["introspection"]
        else:
            r.pop("jwt", None)
            r.pop("replay_protection", None)
            r["introspection"] = "intro"
    elif kind == "introspection-provider":
        providers = defs.setdefault("introspection_providers", {})
        if "intro" in providers:
            del providers["intro"]
        else:
            providers["intro"] = {
                "endpoint": "http://127.0.0.1:9000/introspect",
                "client_id": "edge",
                "client_secret_file": "secret",
            }
    elif kind == "limit" and r is not None:
        if "global_rate_limit" in r:
            del r["global_rate_limit"]
        else:
            r["global_rate_limit"] = {"requests": 5, "per": "1m"}
    elif kind == "revocation" and r is not None:
        r["revocation_check"] = not r.get("revocation_check", False)
    elif kind == "address":
        state["l1"]["address"] = "127.0.0.1:10000" if b % 2 else "127.0.0.1:10001"
    elif kind == "pad":
        state["pad"][("defs", "l0", "l1")[a % 3]] = b % 4
    elif kind == "nodes":
        state["l1_nodes"] = not state["l1_nodes"]


KINDS = [
    "route-upstream",
    "route-prefix",
    "route-add",
    "route-remove",
    "route-dup-name",
    "route-bad",
    "host-swap",
    "upstream-remove",
    "upstream-add",
    "upstream-ring-hash",
    "upstream-tls",
    "upstream-localities",
    "grpc-service",
    "upstream-dup",
    "upstream-move",
    "extra-clear",
    "secret-rename",
    "secret-kind",
    "tls",
    "host-cert",
    "host-client-ca",
    "host-dup",
    "host-remove",
    "host-domain",
    "jwt",
    "jwt-off",
    "replay",
    "provider-toggle",
    "provider-lifetime",
    "guard",
    "introspection",
    "introspection-provider",
    "limit",
    "revocation",
    "address",
    "pad",
    "nodes",
]
EDITS = st.tuples(st.sampled_from(KINDS), st.integers(0, 7), st.integers(0, 7))


def checked(loader: FolderLoader, kept: dict[str, HostChecks] | None) -> object:
    """Each group's check errors (in order, as strings) and usage, by a cache or cold."""
    try:
        units = loader.units()
    except Exception as e:  # a file that does not parse: the same for both
        return ("unparsed", str(e))
    groups = node_groups(units)
    out = []
    for group in groups:
        hosts = kept.setdefault(group.name, HostChecks()) if kept is not None else None
        _, usage, errors = merge_and_check(group.units, scope_of(group, groups), hosts)
        paths = {id(u.doc): u.doc.path for u in units}
        used = {
            kind: sorted((paths[doc], keys) for doc, keys in getattr(usage, kind))
            for kind in ("secrets", "upstreams", "jwt_providers", "introspection_providers")
        }
        out.append((group.name, [str(e) for e in errors], used))
    return out


@SETTINGS
@given(st.lists(EDITS, min_size=1, max_size=12))
def test_incremental_checks_equal_a_full_check(edits: list[tuple[str, int, int]]) -> None:
    """After each random edit, the errors of a kept cache (same messages, same file:line,
    same order) and usage equal a cold check's; and a kept loader's whole result (its
    errors, or every resource) equals a new loader's."""
    root = Path(tempfile.mkdtemp(prefix="xdsplane-policy-incremental-"))
    try:
        state = initial()
        render(state, root)
        loader, kept = FolderLoader(root), FolderLoader(root)
        caches: dict[str, HostChecks] = {}
        assert checked(kept, caches) == checked(FolderLoader(root), None)
        assert outcome(load(loader)) == outcome(load(FolderLoader(root)))
        for edit in edits:
            apply(state, edit)
            render(state, root)
            assert checked(kept, caches) == checked(FolderLoader(root), None), edit
            assert outcome(load(loader)) == outcome(load(FolderLoader(root))), edit
    finally:
        shutil.rmtree(root, ignore_errors=True)


SCENARIOS: list[tuple[str, list[tuple[str, int, int]]]] = [
    # an upstream removed while a route names it, then defined again
    ("no upstream named 'u0'", [("upstream-remove", 0, 0), ("upstream-add", 0, 0)]),
    # a route pointed at an upstream that does not exist, then one that does
    (
        "no upstream named 'u3'",
        [("route-upstream", 0, 3), ("upstream-add", 0, 3), ("route-upstream", 0, 1)],
    ),
    # a host naming only an upstream that is missing, then another upstream removed: its
    # error quotes the list of upstreams, which changed
    (
        "no upstream named 'u3' (upstreams: u1, u2)",
        [("route-remove", 2, 0), ("route-upstream", 2, 1), ("upstream-remove", 0, 0)],
    ),
    # an upstream with TLS (its checks are kept while the upstreams and secrets are the
    # same): its CA turned into a certificate, then back; renamed away, then back
    (
        "secret 'ca-a' is a certificate; a CA bundle (ca:) is needed",
        [
            ("upstream-tls", 1, 2),
            ("secret-kind", 0, 2),
            ("secret-kind", 0, 2),
            ("secret-rename", 0, 1),
            ("secret-rename", 1, 0),
        ],
    ),
    # the same with every upstream moved to another file: their parts stay the very same
    # objects while the secrets' file changes, and while a gRPC service in a third file
    # uses the upstream with TLS (its checks are then gRPC's)
    (
        "secret 'ca-a' is a certificate; a CA bundle (ca:) is needed",
        [
            ("upstream-add", 0, 3),
            ("upstream-tls", 3, 2),
            ("upstream-move", 0, 0),
            ("upstream-move", 0, 1),
            ("upstream-move", 0, 2),
            ("upstream-move", 0, 3),
            ("secret-kind", 0, 2),
            ("grpc-service", 0, 3),
            ("grpc-service", 0, 3),
            ("secret-kind", 0, 2),
        ],
    ),
    # an upstream naming a secret that does not exist, its file unchanged when another
    # file's nodes split the folder into groups (the message names the group), and back
    (
        "no secret named 'cert-b' for nodes *",
        [("upstream-tls", 0, 1), ("nodes", 0, 0), ("nodes", 0, 0)],
    ),
    # the same upstream used by gRPC (not checked for Envoy), then not; a locality twice
    (
        "locality zone=z1 is given twice",
        [
            ("upstream-tls", 1, 2),
            ("secret-kind", 0, 2),
            ("grpc-service", 0, 1),
            ("grpc-service", 0, 1),
            ("upstream-localities", 2, 0),
            ("pad", 0, 2),
            ("upstream-localities", 2, 1),
        ],
    ),
    # a duplicate upstream in a second file, then removed
    ("duplicate upstream name 'u1'", [("upstream-dup", 0, 1), ("extra-clear", 0, 0)]),
    # TLS on (hosts named a certificate), the certificate renamed, then named back
    (
        "no secret named 'cert-a'",
        [("tls", 0, 0), ("secret-rename", 0, 1), ("secret-rename", 1, 0)],
    ),
    # replay protection without a guard, a provider without max_lifetime, then fixed
    (
        "jwt provider 'idp' needs max_lifetime",
        [("jwt", 0, 0), ("provider-lifetime", 0, 0), ("guard", 0, 0), ("provider-lifetime", 0, 0)],
    ),
    # the same, the route's file moved down by lines inserted (the message quotes its line)
    (
        "jwt provider 'idp' needs max_lifetime",
        [("jwt", 0, 0), ("provider-lifetime", 0, 0), ("pad", 1, 3), ("pad", 1, 1)],
    ),
    # introspection through a guard that fails open, the guard's file moved down
    (
        "introspection needs guard.fail_open: false",
        [
            ("introspection-provider", 0, 0),
            ("introspection", 0, 0),
            ("guard", 0, 1),
            ("pad", 0, 2),
            ("guard", 0, 0),
        ],
    ),
    # a schema error in one host of a file, then fixed; hosts swapped
    (
        "prefix must start with '/'",
        [("route-bad", 0, 1), ("host-swap", 0, 0), ("route-prefix", 0, 1)],
    ),
    # a duplicate host, then removed; lines inserted above everything
    ("duplicate host name 'h0'", [("host-dup", 0, 0), ("pad", 1, 3), ("host-remove", 0, 2)]),
]


def test_edits_that_break_and_fix_equal_a_full_check(tmp_path: Path) -> None:
    """Scenarios the random test may not draw every time, each step checked."""
    for n, (expected, steps) in enumerate(SCENARIOS):
        root = tmp_path / str(n)
        root.mkdir()
        state = initial()
        render(state, root)
        kept = FolderLoader(root)
        caches: dict[str, HostChecks] = {}
        checked(kept, caches)
        seen = []
        for edit in steps:
            apply(state, edit)
            render(state, root)
            cold = checked(FolderLoader(root), None)
            assert checked(kept, caches) == cold, (n, edit)
            if isinstance(cold, tuple):  # a file did not parse
                seen.append(cold[1])
            else:
                seen += [e for _, errors, _ in cold for e in errors]
        assert any(expected in e for e in seen), (n, seen)  # the scenario does break


def test_a_route_edit_checks_only_its_host(tmp_path: Path) -> None:
    """One route changed: that host is checked again, the others are reused; an upstream
    removed: the hosts naming it are checked again (the reverse index), and say so."""
    state = initial()
    render(state, tmp_path)
    loader = FolderLoader(tmp_path)
    caches: dict[str, HostChecks] = {}
    checked(loader, caches)
    (cache,) = caches.values()
    assert (cache.hits, cache.misses) == (0, 4)
    state["l0"]["hosts"][1]["routes"][0]["prefix"] = "/changed/"
    render(state, tmp_path)
    checked(loader, caches)
    assert (cache.hits, cache.misses) == (3, 5)
    # u0 is named by h0 (r0), h2 (r1) and h3 (r0); u1 and u2, parsed again, are equal
    del state["defs"]["upstreams"]["u0"]
    render(state, tmp_path)
    found = checked(loader, caches)
    assert (cache.hits, cache.misses) == (4, 8)
    assert isinstance(found, list)
    (_, errors, _), *_ = found
    assert sum("no upstream named 'u0'" in e for e in errors) == 3, errors


def test_hosts_that_did_not_change_are_not_validated_again(tmp_path: Path) -> None:
    """A file parsed again after an edit keeps the models of the hosts whose value did not
    change (the very objects: the checks and the translation find them by identity), even
    moved; the edited host is validated again."""
    state = initial()
    render(state, tmp_path)
    loader = FolderLoader(tmp_path)
    (before,) = [u for u in loader.units() if u.doc.path.endswith("l0.yaml")]
    h0, h1 = before.policy.listeners[0].hosts
    state["l0"]["hosts"][1]["routes"][0]["prefix"] = "/changed/"
    state["pad"]["l0"] = 2
    render(state, tmp_path)
    (after,) = [u for u in loader.units() if u.doc.path.endswith("l0.yaml")]
    assert after.doc is not before.doc
    new0, new1 = after.policy.listeners[0].hosts
    assert new0 is h0
    assert new1 is not h1 and new1.routes[0].prefix == "/changed/"
    state["l0"]["hosts"].reverse()
    render(state, tmp_path)
    (swapped,) = [u for u in loader.units() if u.doc.path.endswith("l0.yaml")]
    assert swapped.policy.listeners[0].hosts == [new1, new0]
    assert swapped.policy.listeners[0].hosts[0] is new1


def test_a_host_is_reused_only_for_the_very_same_yaml_value() -> None:
    """The key a host's model is kept by tells values apart by type too: a boolean, an
    integer and a float that Python finds equal are different YAML (and validate
    differently), as are a list and a single value."""
    from xdsplane.policy.parse import _value_key

    values = [
        {"a": 1},
        {"a": True},
        {"a": 1.0},
        {"a": "1"},
        {"a": [1]},
        {"a": None},
        {"a": 0.0},
        {"a": -0.0},
        {"a": {"b": 1}},
    ]
    assert len({_value_key(v) for v in values}) == len(values)
    assert _value_key({"a": [1, {"b": "x"}]}) == _value_key({"a": [1, {"b": "x"}]})
