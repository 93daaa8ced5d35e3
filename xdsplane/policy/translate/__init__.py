"""Pure functions from a checked policy to Envoy resources: no I/O, no globals.

Envoy names are derived from policy names, so `render` output and Envoy's config_dump read
back to the policy:

| policy | Envoy |
| --- | --- |
| listener `L` | Listener `L` |
| host `H` on TLS listener `L` | filter chain `L/H`, RouteConfiguration `L/H` |
| hosts of plain listener `L` | RouteConfiguration `L`, one virtual host per host |
| route `R` (default `route-N`) of host `H` | Route `H/R` |
| upstream `U` | Cluster `U`, ClusterLoadAssignment `U` |
| secret `S` | Secret `S` |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xdsplane.policy.merge import GroupPolicy, Origin
from xdsplane.policy.translate import clusters, listeners, routes, secrets
from xdsplane.types import ResourceType


@dataclass(frozen=True, slots=True)
class Built:
    type: ResourceType
    message: Any
    origin: Origin


def translate(policy: GroupPolicy, files: Mapping[str, bytes]) -> list[Built]:
    """Every resource the policy gives; ``files`` holds the contents of the secret files."""
    out: list[Built] = []
    for name, spart in sorted(policy.secrets.items()):
        out.append(
            Built(
                ResourceType.SECRET,
                secrets.secret(name, spart.value, spart.origin.folder, files),
                spart.origin,
            )
        )
    for name, upart in sorted(policy.upstreams.items()):
        out.append(Built(ResourceType.CLUSTER, clusters.cluster(name, upart.value), upart.origin))
        if clusters.uses_eds(upart.value):
            cla = clusters.load_assignment(name, upart.value)
            out.append(Built(ResourceType.ENDPOINT, cla, upart.origin))
    log = policy.access_log.value if policy.access_log is not None else None
    for _, lpart in sorted(policy.listeners.items()):
        listener = lpart.value
        out.append(Built(ResourceType.LISTENER, listeners.listener(listener, log), lpart.origin))
        for rc in routes.route_configurations(listener):
            out.append(Built(ResourceType.ROUTE, rc, lpart.origin))
    return out
