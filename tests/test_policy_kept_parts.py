"""A long-lived loader gives what a new loader gives while kept parts are reused.

An unchanged document gives the very same parts to every merge (``policy/merge.py``), and
what reads them keeps what it found while they are the same objects: the upstreams'
resources (``pipeline/translations.py``), their checks and the usage
(``policy/check_tables.py``), a Listener that came out byte for byte as before. Here the
upstreams stay in one file while what else their translation and checks read changes in
others, over steps that load (the secret files exist, every definition is used).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from test_incremental import load, outcome
from test_policy_incremental import PROVIDERS, apply, initial, render

from xdsplane import jwt, pki
from xdsplane.pipeline import FolderLoader

MOVED = [("upstream-move", 0, i) for i in range(3)]  # every upstream to l1's file
U3 = [("upstream-add", 0, 3), ("upstream-move", 0, 3), ("grpc-service", 0, 3)]  # for gRPC
# Steps whose loads must each give what a new loader gives. An unchanged file gives the
# very same parts to every merge, and what reads them keeps what it found while they are
# the same objects (the upstreams' resources, their checks, the usage): here the upstreams
# stay in one file while what else their translation and checks read changes in others.
LOADS: list[list[tuple[str, int, int]]] = [
    # u3 used by a gRPC service of another file, then by a route too (an error), then by
    # the route alone: translated for gRPC, then for Envoy, its file unchanged
    [*MOVED, *U3, ("route-prefix", 0, 0), ("route-upstream", 0, 3), ("grpc-service", 0, 3)],
    # the upstreams' CA turned into a certificate and back, in the secrets' file
    [*MOVED, ("secret-kind", 0, 2), ("secret-kind", 0, 2), ("route-prefix", 1, 1)],
    # a JWT provider changed in another file while the upstreams stay
    [*MOVED, ("provider-lifetime", 0, 1), ("route-prefix", 0, 1), ("provider-lifetime", 0, 1)],
    # an upstream changed and moved, another changed; a name defined twice across files
    [
        ("upstream-tls", 1, 2),
        ("upstream-move", 0, 1),
        ("upstream-tls", 2, 2),
        ("upstream-dup", 0, 0),
        ("extra-clear", 0, 0),
        ("upstream-add", 0, 1),
    ],
    # an upstream removed, a route naming it (an error), defined again
    [*MOVED, ("upstream-remove", 0, 2), ("upstream-add", 0, 2), ("route-prefix", 1, 0)],
]


def secret_files(root: Path) -> None:
    """The files the secrets and JWT providers of ``initial`` name, so that loads succeed."""
    pki.issue(root, "ca", None)
    pki.issue(root, "a", "ca", dns=["*.example.com"])
    pki.issue(root, "x", "ca", dns=["*.example.com"])
    (root / "jwks.json").write_bytes(jwt.jwks(jwt.new_key()))
    (root / "secret").write_text("s3cret\n")


def used(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with every definition used (an unused one is an error): routes of h0 name
    the JWT providers, u0 has TLS with the CA and the certificate."""
    r0, r1, *_ = state["l0"]["hosts"][0]["routes"]
    r0["jwt"], r1["jwt"] = PROVIDERS
    state["defs"]["upstreams"]["u0"]["tls"] = {"ca": "ca-a", "certificate": "cert-a"}
    return state


def test_kept_parts_load_as_a_new_loader(tmp_path: Path) -> None:
    """Each step of ``LOADS``: a long-lived loader gives what a new one gives (resources
    and versions, or the errors)."""
    for n, steps in enumerate(LOADS):
        root = tmp_path / str(n)
        root.mkdir()
        secret_files(root)
        state = used(initial())
        render(state, root)
        loader = FolderLoader(root)
        kinds = [outcome(load(loader))[0]]
        for edit in steps:
            apply(state, edit)
            render(state, root)
            got = outcome(load(loader))
            assert got == outcome(load(FolderLoader(root))), (n, edit)
            kinds.append(got[0])
        assert kinds.count("ok") > len(kinds) // 2, (n, kinds)  # mostly loads that succeed
