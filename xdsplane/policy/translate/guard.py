"""Replay protection: ``guard`` -> a cluster for ``xdsplane guard``; ``replay_protection`` on
routes -> Envoy's ext_authz filter asking it.

The filter sits in the HCM of every host (filter chain) with a replay-protected route, after
jwt_authn (whose verified payload it forwards: ``metadata_context_namespaces``) and before
RBAC and the router. Each route of that HCM carries an ``ExtAuthzPerRoute``: ``disabled``
unless the route has ``replay_protection``, so only those routes call the guard.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import config_source_pb2, grpc_service_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2

from xdsplane.names import GUARD_CHECK_EXTENSION, GUARD_CHECK_REVOCATION, GUARD_CLUSTER
from xdsplane.policy.model import Guard, Host, Route, duration_seconds
from xdsplane.policy.translate import clusters, introspection, jwt
from xdsplane.policy.translate.common import duration

CLUSTER = GUARD_CLUSTER
FILTER = "envoy.filters.http.ext_authz"
CHECK_EXTENSION = GUARD_CHECK_EXTENSION
CHECK_REVOCATION = GUARD_CHECK_REVOCATION
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"

CONNECTIONS = 8
"""HTTP/2 connections each Envoy worker thread keeps to the guard: its address is listed
this many times in the cluster (Envoy keeps each as a host of its own, with its own
connection, and sends Checks to them round robin). ``xdsplane guard --workers N`` shares
one port with ``SO_REUSEPORT``, which spreads connections over the workers, not requests:
with one connection per Envoy thread, a few threads' connections often all landed on one
worker (85-100 % of the Checks, BENCHMARKS.md section 10). More connections per thread
spread the Checks over the workers (the kernel hashes each at random: with 8, a thread's
Checks split 4/4 or 5/3 over 2 workers seven times in ten; with 4, 3/1 or 4/0 five times
in eight); they cost one TLS handshake each, once."""


def needs_ext_authz(hosts: Iterable[Host]) -> bool:
    return any(
        r.replay_protection or r.revocation_check or r.introspection is not None
        for h in hosts
        for r in h.routes
    )


def cluster(guard: Guard) -> Any:
    """The guard's cluster: STATIC for an IP address, STRICT_DNS for a host name; HTTP/2;
    with ``tls``, mutual TLS (the same UpstreamTlsContext as an upstream's ``tls``); the
    address listed ``CONNECTIONS`` times (that many connections per Envoy thread)."""
    # mTLS as to an upstream: the guard serves only callers with its client SAN.
    c = clusters.grpc_service_cluster(CLUSTER, guard.address, guard.tls)
    group = c.load_assignment.endpoints[0]
    for _ in range(CONNECTIONS - 1):  # one connection per listed endpoint (CONNECTIONS)
        group.lb_endpoints.add().CopyFrom(group.lb_endpoints[0])
    return c


def timeout(guard: Guard, introspection_timeout: float = 0.0) -> str:
    """How long Envoy waits for the guard: its ``timeout``, plus the longest endpoint timeout
    of the introspection providers the HCM's routes name (the guard may have to ask one)."""
    if not introspection_timeout:
        return guard.timeout
    total = duration_seconds(guard.timeout) + introspection_timeout
    return f"{round(total * 1000)}ms"


def filter_config(guard: Guard, introspection_timeout: float = 0.0) -> Any:
    return ext_authz_pb2.ExtAuthz(
        grpc_service=grpc_service_pb2.GrpcService(
            envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=CLUSTER),
            timeout=duration(timeout(guard, introspection_timeout)),
        ),
        transport_api_version=config_source_pb2.V3,
        failure_mode_allow=guard.fail_open,
        metadata_context_namespaces=[jwt.FILTER],
        # The client certificate (PEM, URL-encoded) in the CheckRequest: the guard refuses a
        # revoked one (xdsplane revoke --cert).
        include_peer_certificate=True,
    )


def per_route(route: Route) -> Any | None:
    """Disabled unless the route is replay-protected (then the HCM-level filter applies) or
    has ``revocation_check`` (then the guard is told, in a context extension Envoy sets and
    a client cannot, to check revocation only)."""
    if route.introspection is not None:
        return introspection.per_route(route)
    if route.replay_protection:
        return None
    if route.revocation_check:
        return ext_authz_pb2.ExtAuthzPerRoute(
            check_settings=ext_authz_pb2.CheckSettings(
                context_extensions={CHECK_EXTENSION: CHECK_REVOCATION}
            )
        )
    return disabled()


def disabled() -> Any:
    """The ExtAuthzPerRoute of a route that never asks the guard."""
    return ext_authz_pb2.ExtAuthzPerRoute(disabled=True)
