"""Raw snapshot files: ``nodes:`` globs and ``resources:`` in Envoy's own v3 form.

nodes: ["edge-*"]          # optional: globs on the node id or node cluster
resources:
  - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
    name: billing
    ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from xdsplane.config.errors import ConfigError
from xdsplane.config.protos import parse_message
from xdsplane.config.yamlsrc import Document
from xdsplane.snapshot import Resource, make_resource
from xdsplane.types import ResourceType

RAW_KEYS = frozenset({"nodes", "resources"})


@dataclass(frozen=True, slots=True)
class FileContent:
    """What one file contributes: the nodes it is for and its resources."""

    path: str
    nodes: tuple[str, ...] | None
    resources: tuple[Resource, ...]


def parse_nodes(doc: Document, errors: list[ConfigError]) -> tuple[str, ...] | None:
    value = doc.value.get("nodes") if isinstance(doc.value, dict) else None
    if value is None:
        return None
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        errors.append(
            ConfigError(doc.locate(("nodes",)), "nodes: expected a non-empty list of globs")
        )
        return None
    return tuple(sorted(set(value)))


def parse_resources(
    doc: Document, items: Any, keys: tuple[str | int, ...], errors: list[ConfigError]
) -> list[Resource]:
    """Parse a list of ``@type``-tagged mappings found at ``keys`` in ``doc``."""
    if items is None:
        return []
    if not isinstance(items, list):
        errors.append(ConfigError(doc.locate(keys), "resources: expected a list"))
        return []
    out: list[Resource] = []
    for i, item in enumerate(items):
        here = (*keys, i)
        loc = doc.locate(here)
        if not isinstance(item, dict):
            errors.append(ConfigError(loc, "a resource must be a mapping with '@type'"))
            continue
        url = item.get("@type")
        if not isinstance(url, str):
            errors.append(ConfigError(loc, "a resource needs '@type' (its type URL)"))
            continue
        rtype = ResourceType.from_url(url)
        if rtype is None:
            known = ", ".join(t.value for t in ResourceType)
            errors.append(
                ConfigError(
                    doc.locate((*here, "@type")),
                    f"unknown resource type {url!r}; served types are: {known}",
                )
            )
            continue
        body = {k: v for k, v in item.items() if k != "@type"}
        msg, errs = parse_message(body, rtype.message_class, doc, here)
        errors.extend(errs)
        if msg is None:
            continue
        source = f"{loc.path}:{loc.line}"
        resource = make_resource(rtype, msg, source)
        if not resource.name:
            field = "cluster_name" if rtype is ResourceType.ENDPOINT else "name"
            errors.append(ConfigError(loc, f"{rtype.short} resource has no {field}"))
            continue
        out.append(resource)
    return out


def parse_raw(doc: Document) -> tuple[FileContent | None, list[ConfigError]]:
    errors: list[ConfigError] = []
    if not isinstance(doc.value, dict):
        errors.append(
            ConfigError(doc.locate(()), "expected a mapping with 'nodes' and 'resources'")
        )
        return None, errors
    for key in doc.value:
        if key not in RAW_KEYS:
            errors.append(
                ConfigError(
                    doc.locate_key((key,)),
                    f"unknown key {key!r}; a snapshot file has: nodes, resources",
                )
            )
    nodes = parse_nodes(doc, errors)
    resources = parse_resources(doc, doc.value.get("resources"), ("resources",), errors)
    if errors:
        return None, errors
    return FileContent(doc.path, nodes, tuple(resources)), []
