"""Parsed documents -> a SnapshotSet: group by nodes, merge, check, translate, check again.

Pure but for ``read``, the function the caller gives to fetch the files secrets name (the
loader passes one that never serves a half-written file).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from xdsplane.config.check import Ref, check_snapshot, references
from xdsplane.config.errors import ConfigError, ConfigErrors, Location
from xdsplane.config.raw import parse_resources
from xdsplane.config.yamlsrc import Document
from xdsplane.policy import translate
from xdsplane.policy.check import Usage, UseKey, check_policy, use_key
from xdsplane.policy.merge import Fragment, GroupPolicy, Origin, merge
from xdsplane.policy.model import PolicyFile
from xdsplane.policy.parse import parse_policy
from xdsplane.policy.translate.secrets import paths
from xdsplane.snapshot import NodeGroup, Resource, Snapshot, SnapshotSet, make_resource
from xdsplane.types import ResourceType

Reader = Callable[[str], bytes]
RefsOf = Callable[[Resource], tuple[Ref, ...]]


@dataclass(frozen=True, slots=True)
class Unit:
    """One parsed document: who it is for, its policy and its raw resources."""

    doc: Document
    nodes: tuple[str, ...] | None
    policy: PolicyFile
    resources: tuple[Resource, ...]


def parse_unit(doc: Document) -> tuple[Unit | None, list[ConfigError]]:
    policy, errors = parse_policy(doc)
    if policy is None:
        return None, errors
    resources = parse_resources(doc, doc.value.get("resources"), ("resources",), errors)
    if errors:
        return None, errors
    nodes = tuple(sorted(set(policy.nodes))) if policy.nodes is not None else None
    return Unit(doc, nodes, policy, tuple(resources)), []


def group_name(nodes: tuple[str, ...] | None) -> str:
    return "*" if nodes is None else ",".join(nodes)


def _read_secret_files(
    policy: GroupPolicy, read: Reader, errors: list[ConfigError]
) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for part in policy.secrets.values():
        for field, path in paths(part.value, part.origin.folder).items():
            if path in files:
                continue
            try:
                data = read(path)
            except OSError as e:
                reason = e.strerror or str(e)
                errors.append(
                    ConfigError(part.origin.at(field), f"{field}: cannot read {path}: {reason}")
                )
                continue
            if b"-----BEGIN " not in data:
                errors.append(
                    ConfigError(part.origin.at(field), f"{field}: {path} holds no PEM data")
                )
                continue
            files[path] = data
    return files


def build(units: list[Unit], read: Reader, refs_of: RefsOf = references) -> SnapshotSet:
    """Raises ConfigErrors with every problem found, or returns what is to be served."""
    common = [u for u in units if u.nodes is None]
    order: list[tuple[str, ...]] = []
    members: dict[tuple[str, ...], list[Unit]] = {}
    for u in units:
        if u.nodes is not None:
            if u.nodes not in members:
                order.append(u.nodes)
                members[u.nodes] = []
            members[u.nodes].append(u)
    plan: list[tuple[tuple[str, ...] | None, list[Unit]]] = [
        (nodes, members[nodes] + common) for nodes in order
    ]
    if common:
        plan.append((None, common))
    errors: list[ConfigError] = []
    groups: list[NodeGroup] = []
    used = Usage()
    for nodes, members_ in plan:
        name = group_name(nodes)
        scope = name if len(plan) > 1 else ""
        snapshot, usage = _build_group(members_, scope, read, refs_of, errors)
        used.secrets |= usage.secrets
        used.upstreams |= usage.upstreams
        if snapshot is not None:
            groups.append(NodeGroup(name, nodes, snapshot))
    if not errors:
        errors.extend(_unused(units, used))
    if errors:
        raise ConfigErrors(list(dict.fromkeys(errors)))
    return SnapshotSet(tuple(groups))


def _build_group(
    units: list[Unit], scope: str, read: Reader, refs_of: RefsOf, errors: list[ConfigError]
) -> tuple[Snapshot | None, Usage]:
    before = len(errors)
    policy, errs = merge([Fragment(u.doc, u.policy) for u in units])
    errors.extend(errs)
    problems, usage = check_policy(policy)
    errors.extend(problems)
    files = _read_secret_files(policy, read, errors)
    if len(errors) > before:
        return None, usage
    built = translate.translate(policy, files)
    resources = [make_resource(b.type, b.message, b.origin.source) for b in built]
    for u in units:
        resources.extend(u.resources)
    merged = _merge_resources(resources, scope, errors)
    snapshot = Snapshot.build(merged)
    if len(errors) == before:
        errors.extend(check_snapshot(snapshot, scope, refs_of))
    return (snapshot if len(errors) == before else None), usage


def _merge_resources(
    resources: list[Resource], scope: str, errors: list[ConfigError]
) -> list[Resource]:
    by_key: dict[tuple[ResourceType, str], Resource] = {}
    for r in resources:
        key = (r.type, r.name)
        first = by_key.get(key)
        if first is not None:
            where = f" (for nodes {scope})" if scope else ""
            errors.append(
                ConfigError(
                    Location.parse(r.source),
                    f"duplicate {r.type.short} name {r.name!r}, first defined at "
                    f"{first.source}{where}",
                )
            )
            continue
        by_key[key] = r
    return list(by_key.values())


def _unused(units: list[Unit], used: Usage) -> list[ConfigError]:
    errors = []
    for u in units:
        for name in u.policy.secrets:
            origin = Origin(u.doc, ("secrets", name))
            if not _is_used(origin, used.secrets):
                errors.append(
                    ConfigError(
                        origin.key(), f"secret {name!r} is not used by any host or upstream"
                    )
                )
        for name in u.policy.upstreams:
            origin = Origin(u.doc, ("upstreams", name))
            if not _is_used(origin, used.upstreams):
                errors.append(
                    ConfigError(origin.key(), f"upstream {name!r} is not used by any route")
                )
    return errors


def _is_used(origin: Origin, used: set[UseKey]) -> bool:
    return use_key(origin) in used
