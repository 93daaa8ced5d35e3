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
| jwt provider `P` | jwt_authn provider `P`, requirements `P` and `P/optional` (ECDS) |
| jwt providers of a group | TypedExtensionConfig `envoy.filters.http.jwt_authn` |
| `jwks_uri` of jwt provider `P` | Cluster `xdsplane-jwks-P` |
| guard | Cluster `xdsplane-guard` |
| `access_log.otlp` | Cluster `xdsplane-otlp` |
| `introspection: P` on a route | its ExtAuthzPerRoute's context extensions (the guard asks `P`) |
| gRPC server `G` on `A` (IP:PORT) | Listener `grpc/server?xds.resource.listening_address=A` |
| gRPC service `NAME` | Listener `NAME` (api_listener), RouteConfiguration `NAME` (see `grpc.py`) |
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from xdsplane.policy.merge import GroupPolicy, Origin, Part
from xdsplane.policy.model import (
    AccessLog,
    GrpcServer,
    GrpcService,
    Guard,
    IntrospectionProvider,
    Listener,
    Secret,
    Upstream,
)
from xdsplane.policy.translate import (
    clusters,
    grpc,
    grpc_servers,
    guard,
    jwt,
    listeners,
    otlp,
    routes,
    secrets,
)
from xdsplane.types import ResourceType


@dataclass(frozen=True, slots=True)
class Built:
    type: ResourceType
    message: Any
    origin: Origin


def secret_resources(name: str, part: Part[Secret], files: Mapping[str, bytes]) -> list[Built]:
    message = secrets.secret(name, part.value, part.origin.folder, files)
    return [Built(ResourceType.SECRET, message, part.origin)]


def upstream_resources(name: str, part: Part[Upstream]) -> list[Built]:
    out = [Built(ResourceType.CLUSTER, clusters.cluster(name, part.value), part.origin)]
    if clusters.uses_eds(part.value):
        cla = clusters.load_assignment(name, part.value)
        out.append(Built(ResourceType.ENDPOINT, cla, part.origin))
    return out


def grpc_upstream_resources(name: str, part: Part[Upstream]) -> list[Built]:
    """An upstream as gRPC clients take it: EDS, TLS from certificate providers."""
    return [
        Built(ResourceType.CLUSTER, grpc.cluster(name, part.value), part.origin),
        Built(ResourceType.ENDPOINT, grpc.load_assignment(name, part.value), part.origin),
    ]


def grpc_service_resources(part: Part[GrpcService]) -> list[Built]:
    return [
        Built(ResourceType.LISTENER, grpc.listener(part.value), part.origin),
        Built(ResourceType.ROUTE, grpc.route_configuration(part.value), part.origin),
    ]


def jwt_providers(policy: GroupPolicy, files: Mapping[str, bytes]) -> dict[str, jwt.Provider]:
    """Every JWT provider with the contents of its JWKS file (read into ``files``)."""
    out = {}
    for name, ppart in policy.jwt_providers.items():
        if ppart.value.jwks_file is None:
            out[name] = jwt.Provider(ppart.value, b"")  # jwks_uri: Envoy fetches the set
            continue
        path = secrets.resolve(ppart.origin.folder, ppart.value.jwks_file)
        out[name] = jwt.Provider(ppart.value, files[path])
    return out


def jwt_resources(policy: GroupPolicy, providers: Mapping[str, jwt.Provider]) -> list[Built]:
    """The jwt_authn configuration served over ECDS, when any route names a provider (its
    source is the first provider it holds), and the Cluster of each such provider with a
    ``jwks_uri``."""
    names = jwt.group_providers(p.value for p in policy.listeners.values())
    if not names:
        return []
    message = jwt.extension_config(names, providers)
    out = [Built(ResourceType.EXTENSION, message, policy.jwt_providers[names[0]].origin)]
    for name in names:
        spec = providers[name].spec
        if spec.jwks_uri is not None:
            cluster = jwt.jwks_cluster(name, spec)
            out.append(Built(ResourceType.CLUSTER, cluster, policy.jwt_providers[name].origin))
    return out


def guard_resources(part: Part[Guard]) -> list[Built]:
    return [Built(ResourceType.CLUSTER, c, part.origin) for c in guard.resources(part.value)]


def otlp_resources(part: Part[AccessLog]) -> list[Built]:
    """The OTLP collector's Cluster, when the access log sends there."""
    if part.value.otlp is None:
        return []
    return [Built(ResourceType.CLUSTER, otlp.cluster(part.value.otlp), part.origin)]


def listener_resources(
    part: Part[Listener],
    log: AccessLog | None,
    providers: Mapping[str, jwt.Provider] | None = None,
    guard_spec: Guard | None = None,
    introspected: Mapping[str, IntrospectionProvider] | None = None,
    vhost: routes.VirtualHostOf | None = None,
) -> list[Built]:
    message = listeners.listener(part.value, log, providers, guard_spec, introspected)
    out = [Built(ResourceType.LISTENER, message, part.origin)]
    for rc in routes.route_configurations(part.value, vhost, guard_spec):
        out.append(Built(ResourceType.ROUTE, rc, part.origin))
    return out


def grpc_server_resources(part: Part[GrpcServer]) -> list[Built]:
    return [Built(ResourceType.LISTENER, grpc_servers.listener(part.value), part.origin)]
