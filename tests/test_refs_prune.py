"""refs.py walks only into message types that may hold a reference, a secret field or an
``Any`` (``_matters``); the pruned walk finds what the full walk finds, in the same order,
with the same "may hold key material" answer, on every resource of the golden policies, the
corpus and the benchmark folder."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import pytest
from test_policy_corpus import make_pki

from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader, refs
from xdsplane.snapshot import Resource

ROOT = Path(__file__).resolve().parent.parent


def resources_of(folder: Path) -> list[Resource]:
    try:
        result = FolderLoader(folder).load()
    except ConfigErrors:
        return []
    return [
        r for g in result.groups for named in g.snapshot.resources.values() for r in named.values()
    ]


def folders(tmp: Path) -> list[Path]:
    out = [ROOT / "tests" / "corpus" / "good"]
    for case in sorted((ROOT / "tests" / "golden").iterdir()):
        if case.is_dir():
            copy = tmp / case.name
            shutil.copytree(case, copy)
            make_pki(copy)
            out.append(copy)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import _snapgen
    finally:
        sys.path.pop(0)
    bench = tmp / "bench"
    _snapgen.generate(bench, _snapgen.Shape(clusters=40, listeners=4, cluster_files=2))
    out.append(bench)
    return out


def test_pruned_walk_finds_what_the_full_walk_finds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    resources = [r for folder in folders(tmp_path) for r in resources_of(folder)]
    assert len(resources) > 100
    pruned = [refs.scan(r) for r in resources]
    monkeypatch.setattr(refs, "_matters", lambda desc: True)
    full = [refs.scan(r) for r in resources]
    assert pruned == full
    assert sum(len(found) for found, _ in full) > 100  # references were there to find
    assert any(secret for _, secret in full)


def test_types_without_references_are_not_walked() -> None:
    from xdsplane.types import ResourceType

    cluster: Any = ResourceType.CLUSTER.message_class.DESCRIPTOR
    listener: Any = ResourceType.LISTENER.message_class.DESCRIPTOR
    assert not refs._matters(cluster.fields_by_name["circuit_breakers"].message_type)
    assert not refs._matters(listener.fields_by_name["address"].message_type)
    assert refs._matters(cluster)
    assert refs._matters(cluster.fields_by_name["transport_socket"].message_type)
