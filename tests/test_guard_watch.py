"""The guard's watched files, through a real ``xdsplane guard`` process: ``--limits FILE``
given alone, and each file mounted the way Kubernetes mounts a ConfigMap (the files are
symlinks into ``..data``, a symlink that an update swaps in one rename). Each change is
proved in force by a call to the guard (a rate limit's ``requests_per_unit``, a Check).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from harness import ProcessGroup, XdsServer, wait_until
from test_guard import Guard, allowed, denied
from test_ratelimit import SHARED_POLICY

from xdsplane import jwt
from xdsplane.pki import write_atomic

LIMITS = """\
domain: shared
descriptors:
  - key: tenant
    rate_limit: {{unit: hour, requests_per_unit: {n}}}
"""


class ConfigMap:
    """A folder laid out and updated as the kubelet does a ConfigMap volume: the files are
    ``name -> ..data/name``, ``..data -> ..<version>``; an update writes a new version
    folder, points ``..data_tmp`` at it, renames that over ``..data`` and removes the old
    version."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.version: Path | None = None
        self.n = 0

    def publish(self, files: dict[str, str]) -> None:
        self.n += 1
        version = self.folder / f"..2026_12_05_06_00_{self.n:02d}.{os.getpid()}"
        version.mkdir()
        for name, text in files.items():
            (version / name).write_text(text, encoding="utf-8")
        tmp = self.folder / "..data_tmp"
        tmp.symlink_to(version.name)
        os.replace(tmp, self.folder / "..data")
        for name in files:
            link = self.folder / name
            if not link.is_symlink():
                link.symlink_to(f"..data/{name}")
        if self.version is not None:
            shutil.rmtree(self.version)
        self.version = version


def tenant_limit(g: Guard) -> int:
    r = g.limit("shared", [("tenant", "t1")])
    return int(r.statuses[0].current_limit.requests_per_unit)


def route_limit(g: Guard) -> int:
    r = g.limit("xdsplane", [("route", "http/api/shared"), ("jwt_sub", "alice")])
    return int(r.statuses[0].current_limit.requests_per_unit)


def test_a_limits_file_given_alone_is_watched(procs: ProcessGroup, tmp_path: Path) -> None:
    limits = tmp_path / "limits.yaml"
    write_atomic(limits, LIMITS.format(n=3).encode())
    g = Guard(procs, "guard", "--limits", str(limits)).launch().ready()
    try:
        assert tenant_limit(g) == 3
        write_atomic(limits, LIMITS.format(n=7).encode())  # a rename over the file
        wait_until(lambda: tenant_limit(g) == 7, 10, what="the new limit in force")
        limits.write_text(LIMITS.format(n=8), encoding="utf-8")  # an edit in place
        wait_until(lambda: tenant_limit(g) == 8, 10, what="the edited limit in force")
        # a bad edit is refused, the last good limits stay and the guard serves on
        limits.write_text("domain: shared\ndescriptors: nine\n", encoding="utf-8")
        wait_until(lambda: "limits not reloaded" in g.proc.tail(), 10, what="refused")
        assert tenant_limit(g) == 8 and g.proc.alive()
        assert g.health()["limits_reload"]["failures"] >= 1
    finally:
        g.close()


def test_a_limits_configmap_swap_is_followed(procs: ProcessGroup, tmp_path: Path) -> None:
    cm = ConfigMap(tmp_path / "guard-config")
    cm.publish({"limits.yaml": LIMITS.format(n=3)})
    g = Guard(procs, "guard", "--limits", str(cm.folder / "limits.yaml")).launch().ready()
    try:
        assert tenant_limit(g) == 3
        for n in (5, 11):  # twice: the watch goes on after a swap
            cm.publish({"limits.yaml": LIMITS.format(n=n)})
            wait_until(lambda n=n: tenant_limit(g) == n, 10, what=f"limit {n} in force")
    finally:
        g.close()


def test_a_policy_configmap_swap_is_followed(procs: ProcessGroup, tmp_path: Path) -> None:
    keys = jwt.jwks(jwt.new_key())
    (tmp_path / "jwks.json").write_bytes(keys)  # ../jwks.json from the folder
    cm = ConfigMap(tmp_path / "policy")

    def policy(n: int) -> str:
        text = SHARED_POLICY.format(node="edge-a", guard="127.0.0.1:1", port=1001, upstream=9)
        return text.replace("requests: 4, per: 1h", f"requests: {n}, per: 1h")

    cm.publish({"a.yaml": policy(4)})
    g = Guard(procs, "guard", "--policy", str(cm.folder)).launch().ready()
    try:
        assert route_limit(g) == 4
        for n in (9, 6):
            cm.publish({"a.yaml": policy(n)})
            wait_until(lambda n=n: route_limit(g) == n, 10, what=f"limit {n} in force")
        assert "limits reloaded" in g.proc.tail()
    finally:
        g.close()


def test_a_revocations_configmap_swap_is_followed(procs: ProcessGroup, tmp_path: Path) -> None:
    cm = ConfigMap(tmp_path / "revocations")
    cm.publish({"revoked.yaml": "[]\n"})
    g = Guard(procs, "guard", "--revocations", str(cm.folder / "revoked.yaml")).launch().ready()

    def check_mallory() -> Any:
        claims = {"jti": f"j-{time.monotonic_ns()}", "sub": "mallory", "exp": time.time() + 60}
        return g.check(claims)

    try:
        assert allowed(check_mallory())
        entry = '[{kind: sub, value: mallory, until: "2099-01-01T00:00:00Z", reason: test}]\n'
        cm.publish({"revoked.yaml": entry})
        wait_until(lambda: not allowed(check_mallory()), 10, what="the revocation in force")
        assert denied(check_mallory())[0] == 403
        cm.publish({"revoked.yaml": "[]\n"})
        wait_until(lambda: allowed(check_mallory()), 10, what="the revocation lifted")
    finally:
        g.close()


def test_serve_follows_a_policy_configmap_swap(procs: ProcessGroup, tmp_path: Path) -> None:
    """``xdsplane serve``, the other reader of a policy folder (docs/scaling.md mounts it
    from a ConfigMap): each swap of ``..data`` is a reload that serves the new policy."""
    cm = ConfigMap(tmp_path / "policy")

    def policy(body: str) -> str:
        return (
            "listeners:\n  - name: http\n    address: 127.0.0.1:10000\n    hosts:\n"
            "      - name: web\n        domains: ['*']\n        routes:\n"
            f"          - {{path: /hello, direct_response: {{status: 200, body: {body}}}}}\n"
        )

    def digest() -> str:
        groups = server.status()["groups"]
        assert len(groups) == 1, groups
        return str(groups[0]["digest"])

    cm.publish({"policy.yaml": policy("one")})
    server = XdsServer(procs, cm.folder).start()
    seen = {digest()}
    for body in ("two", "three"):
        cm.publish({"policy.yaml": policy(body)})
        now = wait_until(lambda: digest() not in seen and digest(), 10, what=f"{body} served")
        seen.add(now)
    assert server.status()["reload"]["errors"] == []
