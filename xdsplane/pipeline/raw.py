"""Raw resources: Envoy v3 resources as they are served, each a mapping with ``@type``.

    resources:
      - "@type": type.googleapis.com/envoy.config.cluster.v3.Cluster
        name: billing
        ...

A file holding only ``nodes`` and ``resources`` is a raw snapshot file; in a policy file
``resources`` is the escape hatch, merged with what the policy compiles to.
"""

from __future__ import annotations

from typing import Any

from xdsplane.config.errors import ConfigError
from xdsplane.config.protos import parse_message
from xdsplane.config.yamlsrc import Document
from xdsplane.snapshot import Resource, make_resource
from xdsplane.types import ResourceType


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
        resource = make_resource(rtype, msg, str(loc))
        if not resource.name:
            field = "cluster_name" if rtype is ResourceType.ENDPOINT else "name"
            errors.append(ConfigError(loc, f"{rtype.short} resource has no {field}"))
            continue
        out.append(resource)
    return out
