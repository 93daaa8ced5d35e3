"""The route a request reaches, as `diff --fail-on-weaken` simulates it (policy/reach.py),
is the route a real Envoy picks: every probe path the simulation uses, with each method and
with and without the header a route asks for, is sent to Envoy serving the same policy,
whose routes answer with their own name."""

from __future__ import annotations

import http.client
from pathlib import Path

import pytest
from harness import HOST, Envoy, ProcessGroup, XdsServer, exchange, free_port, http_get, wait_until

from xdsplane import pipeline
from xdsplane.policy.matrix import access_matrix
from xdsplane.policy.reach import HostRoutes, probes

ROUTES = [
    {"name": "m-post", "prefix": "/m/", "methods": ["POST"]},
    {"name": "hdr", "prefix": "/h/", "headers": [{"name": "x-probe", "present": True}]},
    {"name": "exact", "path": "/c"},
    {"name": "seg", "path_prefix": "/b", "case_sensitive": False},
    {"name": "pre", "prefix": "/a/"},
    {"name": "ci", "prefix": "/CI/", "case_sensitive": False},
    {"name": "rx", "regex": "^/d/[0-9]+$"},
    {"name": "rxi", "regex": "/e/[a-z]+", "case_sensitive": False},
    {"name": "narrow", "path": "/late/x"},
    {"name": "late", "prefix": "/late/"},
    {"name": "all", "prefix": "/z"},
]
EXTRA = ["/b/x", "/bx", "/B/Y", "/a", "/A/x", "/ci/x", "/d/12", "/d/x", "/E/abc", "/m/x", "/h/x"]


def _policy(port: int) -> str:
    lines = [
        "listeners:",
        "  - name: plain",
        f"    address: {HOST}:{port}",
        "    hosts:",
        "      - name: h",
        "        domains: ['*']",
        "        path_parameters: allow",
        "        routes:",
    ]
    for r in ROUTES:
        fields = {**r, "direct_response": {"status": 200, "body": r["name"]}}
        lines.append(f"          - {fields!r}".replace("True", "true"))
    return "\n".join(lines) + "\n"


@pytest.mark.envoy
def test_the_simulated_first_match_is_envoys(procs: ProcessGroup, tmp_path: Path) -> None:
    port = free_port()
    folder = tmp_path / "policy"
    folder.mkdir()
    (folder / "p.yaml").write_text(_policy(port))
    loaded = pipeline.load(folder)
    assert loaded.snapshots is not None, loaded.errors
    rows = access_matrix(loaded.snapshots.groups[0].policy)
    index = HostRoutes(rows)

    server = XdsServer(procs, folder).start()
    Envoy(procs, tmp_path, "edge-reach", server.xds_address).start()
    wait_until(lambda: http_get(port, "/zz").body == b"all", 30, what="Envoy serves the policy")

    paths = sorted({p for r in rows if r.match for p in probes(r.match)} | set(EXTRA))
    checked = 0
    for path in paths:
        for method in ("GET", "POST"):
            for headers in (False, True):
                want = index.first(path, method, headers)
                conn = http.client.HTTPConnection(HOST, port, timeout=5)
                got = exchange(conn, path, {"x-probe": "1"} if headers else {}, method=method)
                expected = want.route.encode() if want is not None else None
                if expected is None:
                    assert got.status == 404, (path, method, headers, got)
                else:
                    assert got.body == expected, (path, method, headers, got.status, got.body)
                checked += 1
    assert checked > 100
