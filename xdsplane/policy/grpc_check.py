"""What gRPC's own xDS client needs from a policy's ``grpc_services`` (docs/grpc.md).

gRPC ignores the xDS fields it does not implement (grpc/grpc doc/grpc_xds_features.md), so
a setting it would silently drop is refused here with its line rather than left to look
effective.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

from xdsplane.config.errors import ConfigError
from xdsplane.policy.merge import GroupPolicy, Origin, Part
from xdsplane.policy.model import GrpcRoute, GrpcService, Upstream, split_host_port

SecretCheck = Callable[[str | None, str, Origin, "str | int"], None]


def grpc_upstreams(policy: GroupPolicy) -> set[str]:
    """The upstreams a gRPC service of the group sends calls to."""
    out: set[str] = set()
    for part in policy.grpc_services.values():
        for r in part.value.effective_routes():
            if r.upstream is not None:
                out.add(r.upstream)
            out.update(r.weighted or {})
    return out


def _route_keys(service: GrpcService, index: int) -> tuple[str | int, ...]:
    return () if service.routes is None else ("routes", index)


def check_grpc(
    policy: GroupPolicy,
    where: str,
    envoy_upstreams: set[str],
    secret: Callable[..., None],
) -> tuple[list[ConfigError], set[str]]:
    """Errors of the group's gRPC services, and the upstreams they use."""
    errors: list[ConfigError] = []
    used: set[str] = set()
    for name, part in policy.grpc_services.items():
        service, origin = part.value, part.origin
        if name in policy.listeners:
            errors.append(
                ConfigError(
                    origin.at("name"),
                    f"gRPC service {name!r} has the name of listener {name!r}: both would be "
                    "the Listener resource of that name",
                )
            )
        for i, r in enumerate(service.effective_routes()):
            keys = _route_keys(service, i)
            errors += _route(policy, where, r, origin, keys, used)
    for name in sorted(used & set(policy.upstreams)):
        upart = policy.upstreams[name]
        if name in envoy_upstreams:
            errors.append(
                ConfigError(
                    upart.origin.key(),
                    f"upstream {name!r} is used by Envoy routes and by gRPC services of the "
                    "same node group: Envoy takes its TLS over SDS and gRPC from certificate "
                    "providers, so give each its own upstream",
                )
            )
        errors += _upstream(upart, secret)
    return errors, used


def _route(
    policy: GroupPolicy,
    where: str,
    r: GrpcRoute,
    origin: Origin,
    keys: tuple[str | int, ...],
    used: set[str],
) -> list[ConfigError]:
    errors = []
    targets = [("upstream", r.upstream)] if r.upstream is not None else []
    targets += [("weighted", u) for u in r.weighted or {}]
    for key, up in targets:
        if up is None:
            continue
        if up not in policy.upstreams:
            known = ", ".join(sorted(policy.upstreams)) or "none defined"
            at = origin.at(*keys, key) if key == "upstream" else origin.key(*keys, key, up)
            errors.append(ConfigError(at, f"no upstream named {up!r}{where} (upstreams: {known})"))
        else:
            used.add(up)
    for key, up in targets:
        part = policy.upstreams.get(up or "")
        if part is not None and part.value.lb == "ring_hash" and r.hash is None:
            errors.append(
                ConfigError(
                    origin.at(*keys, key)
                    if key == "upstream"
                    else origin.key(*keys, key, up or ""),
                    f"upstream {up!r} balances by ring_hash: give the route (or the service) "
                    "hash: {header: NAME} or {channel: true}, else every call hashes at random",
                )
            )
    for j, h in enumerate(r.headers):
        if h.name.lower().endswith("-bin"):
            errors.append(
                ConfigError(
                    origin.at(*keys, "headers", j, "name"),
                    f"header {h.name!r}: gRPC never matches binary (-bin) metadata",
                )
            )
    return errors


def _upstream(upart: Part[Upstream], secret: Callable[..., None]) -> list[ConfigError]:
    """What gRPC cannot do with an upstream: host names, other LB policies, health checks,
    circuit breakers other than max_requests, TLS settings other than CA, certificate and
    SANs."""
    up, origin = upart.value, upart.origin
    errors = []
    for keys, e in up.placed_endpoints():
        host, _ = split_host_port(e)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            errors.append(
                ConfigError(
                    origin.at(*keys),
                    f"endpoint {e!r}: gRPC clients take IP addresses over EDS, not host names",
                )
            )
    if up.lb not in ("round_robin", "ring_hash"):
        errors.append(
            ConfigError(
                origin.at("lb"),
                f"lb {up.lb!r}: gRPC's C-core client (Python, C++) does not implement it and "
                "would NACK the cluster; use round_robin or ring_hash",
            )
        )
    if up.health_check is not None:
        errors.append(
            ConfigError(origin.key("health_check"), "health_check: gRPC clients ignore it")
        )
    if up.limits is not None:
        for key in ("max_connections", "max_pending_requests", "max_retries"):
            if getattr(up.limits, key) is not None:
                errors.append(
                    ConfigError(
                        origin.key("limits", key),
                        f"limits.{key}: gRPC clients implement only max_requests",
                    )
                )
    if up.tls is not None:
        for key in ("sni", "min_version", "max_version", "allow_legacy_tls"):
            if key in up.tls.model_fields_set:
                errors.append(
                    ConfigError(
                        origin.key("tls", key),
                        f"tls.{key}: gRPC clients ignore it (they take ca, certificate and "
                        "subject_alt_names)",
                    )
                )
        secret(up.tls.ca, "ca", origin, "tls", "ca")
        secret(up.tls.certificate, "certificate", origin, "tls", "certificate")
    return errors
