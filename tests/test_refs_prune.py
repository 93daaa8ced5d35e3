"""refs.py walks only into message types that may hold a reference, a secret field or an
``Any`` (``_matters``); the pruned walk finds what the full walk finds, in the same order,
with the same "may hold key material" answer, on every resource of the golden policies, the
corpus and the benchmark folder; and finds what the walk before it found (its code is kept
here as the oracle)."""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message
from test_policy_corpus import make_pki

from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader, refs
from xdsplane.redact import SECRET_PROTO_FIELDS
from xdsplane.snapshot import Resource
from xdsplane.types import ResourceType

ROOT = Path(__file__).resolve().parent.parent


# The walk as it was before the pruning (commit 851403a), kept here as the oracle.
def reference_walk(msg: Message, secret: list[bool] | None = None) -> Iterator[refs.Ref]:
    """The references in ``msg``; ``secret`` (when given) gets True appended if a field that
    holds key material is set (``redact.SECRET_PROTO_FIELDS``) or an ``Any`` cannot be read."""
    name = msg.DESCRIPTOR.full_name
    if name == refs._ANY:
        cls = refs.find_message(msg.type_url.rsplit("/", 1)[-1])
        if cls is not None:
            inner = cls()
            try:
                msg.Unpack(inner)
            except Exception:
                if secret is not None:
                    secret.append(True)
                return
            yield from reference_walk(inner, secret)
        elif secret is not None:
            secret.append(True)
        return
    if name == refs._SDS and msg.HasField("sds_config") and refs._is_ads(msg.sds_config):
        yield (ResourceType.SECRET, msg.name, "secret")
    elif name == refs._RDS and refs._is_ads(msg.config_source):
        yield (ResourceType.ROUTE, msg.route_config_name, "route configuration")
    elif refs._discovered(msg):
        # A filter configured over ECDS: Envoy asks for the configuration by the filter's name.
        f: Any = msg
        yield (ResourceType.EXTENSION, f.name, "filter configuration")
    elif name == refs._CLUSTER:
        c: Any = msg
        if c.type == c.EDS and refs._is_ads(c.eds_cluster_config.eds_config):
            yield (
                ResourceType.ENDPOINT,
                c.eds_cluster_config.service_name or c.name,
                "endpoints (ClusterLoadAssignment)",
            )
    elif name == refs._ROUTE_ACTION:
        a: Any = msg
        if a.cluster:
            yield (ResourceType.CLUSTER, a.cluster, "cluster")
        for wc in a.weighted_clusters.clusters:
            yield (ResourceType.CLUSTER, wc.name, "cluster")
    for field, value in msg.ListFields():
        if secret is not None and field.name in SECRET_PROTO_FIELDS:
            secret.append(True)
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            for v in value.values():
                if isinstance(v, Message):
                    yield from reference_walk(v, secret)
        elif field.is_repeated:
            for v in value:
                yield from reference_walk(v, secret)
        else:
            yield from reference_walk(value, secret)


def reference_scan(resource: Resource) -> tuple[tuple[Any, ...], bool]:
    secret: list[bool] = []
    found = tuple(dict.fromkeys(reference_walk(resource.message, secret)))
    return found, bool(secret) or resource.type is ResourceType.SECRET


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
    assert pruned == [reference_scan(r) for r in resources]
    assert [refs.references(r) for r in resources] == [found for found, _ in pruned]
    monkeypatch.setattr(refs, "_matters", lambda desc: True)
    monkeypatch.setattr(refs, "_PLANS", {})  # plans made again, walking every field
    full = [refs.scan(r) for r in resources]
    assert pruned == full
    assert sum(len(found) for found, _ in full) > 100  # references were there to find
    assert any(secret for _, secret in full)


def test_types_without_references_are_not_walked() -> None:
    cluster: Any = ResourceType.CLUSTER.message_class.DESCRIPTOR
    listener: Any = ResourceType.LISTENER.message_class.DESCRIPTOR
    assert not refs._matters(cluster.fields_by_name["circuit_breakers"].message_type)
    assert not refs._matters(listener.fields_by_name["address"].message_type)
    assert refs._matters(cluster)
    assert refs._matters(cluster.fields_by_name["transport_socket"].message_type)
