"""Replay protection: ``guard`` -> a cluster for ``xdsplane guard``; ``replay_protection`` on
routes -> Envoy's ext_authz filter asking it.

The filter sits in the HCM of every host (filter chain) with a replay-protected route, after
jwt_authn (whose verified payload it forwards: ``metadata_context_namespaces``) and before
RBAC and the router. Each route of that HCM carries an ``ExtAuthzPerRoute``: ``disabled``
unless the route has ``replay_protection``, so only those routes call the guard.

``guard.transport: http``: the filter's ``http_service`` asks the guard's HTTP/1.1 front
(``xdsplane guard --http-address``) through its own cluster, with the same timeout,
``failure_mode_allow`` and mTLS. What gRPC's CheckRequest carried travels as what Envoy
alone sets on the check request (BENCHMARKS.md section 10; tests/test_ext_authz_http_envoy.py
pins it for Envoy 1.40):

- the route's mode: the path prefix ``/xdsplane-check/replay`` (the filter's) or
  ``/xdsplane-check/revocation`` (a per-route ``check_settings.http_service``), followed by
  the client's path;
- the verified claims and the client certificate: ``authorization_request.headers_to_add``
  with ``%DYNAMIC_METADATA(jwt_authn:jwt_payload)%`` and ``%DOWNSTREAM_PEER_CERT%``. They
  exist on the check request only (Envoy adds nothing for the upstream), an absent one
  is not added, and a client's own header of that name reaches neither the guard
  (``allowed_headers`` names none of the client's headers; ``authorization`` is
  disallowed: the guard has no use for a token) nor the upstream (``HTTP_ONLY_HEADERS``:
  the HCM's header_mutation filter removes them from every request first);
- the answer: ``x-guard-reason`` (and ``www-authenticate``) to the client on a refusal
  (``allowed_client_headers``), nothing to the upstream on an allow
  (``allowed_upstream_headers`` matches no header the guard sends), and the access log's
  ``guard_reason`` and ``jti_sha256`` as ext_authz dynamic metadata
  (``dynamic_metadata_from_headers``).

Introspection routes need gRPC (the policy check refuses them with ``transport: http``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2, config_source_pb2, grpc_service_pb2, http_uri_pb2
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2
from envoy.type.matcher.v3 import string_pb2

from xdsplane.names import (
    GUARD_CHECK_EXTENSION,
    GUARD_CHECK_REVOCATION,
    GUARD_CLUSTER,
    GUARD_HTTP_CERT_HEADER,
    GUARD_HTTP_CLUSTER,
    GUARD_HTTP_PATH,
    GUARD_HTTP_PAYLOAD_HEADER,
    GUARD_HTTP_REPLAY,
    GUARD_HTTP_REVOCATION,
    GUARD_REASON_KEY,
    JTI_HASH_KEY,
)
from xdsplane.policy.model import Guard, Host, Route, duration_seconds
from xdsplane.policy.translate import clusters, introspection, jwt
from xdsplane.policy.translate.common import duration

CLUSTER = GUARD_CLUSTER
HTTP_CLUSTER = GUARD_HTTP_CLUSTER
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


def http_cluster(guard: Guard) -> Any:
    """With ``transport: http``: the cluster of the guard's HTTP/1.1 front (the same TLS).
    One endpoint: HTTP/1.1 opens a connection per check in flight, which SO_REUSEPORT
    spreads over ``--workers``."""
    assert guard.http_address is not None
    return clusters.http1_service_cluster(HTTP_CLUSTER, guard.http_address, guard.tls)


def resources(guard: Guard) -> list[Any]:
    """The guard's clusters: gRPC always (rate limits), HTTP with ``transport: http``."""
    out = [cluster(guard)]
    if guard.transport == "http":
        out.append(http_cluster(guard))
    return out


def timeout(guard: Guard, introspection_timeout: float = 0.0) -> str:
    """How long Envoy waits for the guard: its ``timeout``, plus the longest endpoint timeout
    of the introspection providers the HCM's routes name (the guard may have to ask one)."""
    if not introspection_timeout:
        return guard.timeout
    total = duration_seconds(guard.timeout) + introspection_timeout
    return f"{round(total * 1000)}ms"


def _exact(*names: str) -> Any:
    return string_pb2.ListStringMatcher(patterns=[string_pb2.StringMatcher(exact=n) for n in names])


HTTP_ONLY_HEADERS = (GUARD_HTTP_PAYLOAD_HEADER, GUARD_HTTP_CERT_HEADER)
"""Set by Envoy on the check request; removed from every request of the HCM first."""

# Matches no header the guard sends: an allowed request reaches the upstream unchanged.
_NOTHING_UPSTREAM = "x-xdsplane-guard-sends-nothing-upstream"


def http_service(guard: Guard, mode: str, introspection_timeout: float = 0.0) -> Any:
    """The HttpService of ``transport: http`` for a route mode (``replay``, ``revocation``):
    the filter's and each revocation-only route's (the same but for the path prefix)."""
    add = [
        (GUARD_HTTP_PAYLOAD_HEADER, f"%DYNAMIC_METADATA({jwt.FILTER}:{jwt.PAYLOAD_KEY})%"),
        (GUARD_HTTP_CERT_HEADER, "%DOWNSTREAM_PEER_CERT%"),
    ]
    return ext_authz_pb2.HttpService(
        server_uri=http_uri_pb2.HttpUri(
            uri=f"http://{HTTP_CLUSTER}",
            cluster=HTTP_CLUSTER,
            timeout=duration(timeout(guard, introspection_timeout)),
        ),
        path_prefix=GUARD_HTTP_PATH + mode,
        authorization_request=ext_authz_pb2.AuthorizationRequest(
            headers_to_add=[base_pb2.HeaderValue(key=k, value=v) for k, v in add]
        ),
        authorization_response=ext_authz_pb2.AuthorizationResponse(
            allowed_upstream_headers=_exact(_NOTHING_UPSTREAM),
            allowed_client_headers=_exact("x-guard-reason", "www-authenticate", "content-type"),
            dynamic_metadata_from_headers=_exact(GUARD_REASON_KEY, JTI_HASH_KEY),
        ),
    )


def filter_config(guard: Guard, introspection_timeout: float = 0.0) -> Any:
    if guard.transport == "http":
        return ext_authz_pb2.ExtAuthz(
            http_service=http_service(guard, GUARD_HTTP_REPLAY, introspection_timeout),
            transport_api_version=config_source_pb2.V3,
            failure_mode_allow=guard.fail_open,
            # Of the client's own headers, none but the request id (for logs): the guard
            # reads only what headers_to_add sets. The token stays out of the guard.
            allowed_headers=_exact("x-request-id"),
            disallowed_headers=_exact("authorization", "cookie"),
        )
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


def per_route(route: Route, guard: Guard | None = None) -> Any | None:
    """Disabled unless the route is replay-protected (then the HCM-level filter applies) or
    has ``revocation_check`` (then the guard is told, in a context extension Envoy sets and
    a client cannot, to check revocation only; over ``transport: http``, in the path prefix
    of the route's own http_service)."""
    if route.introspection is not None:
        return introspection.per_route(route)
    if route.replay_protection:
        return None
    if route.revocation_check and guard is not None and guard.transport == "http":
        return ext_authz_pb2.ExtAuthzPerRoute(
            check_settings=ext_authz_pb2.CheckSettings(
                http_service=http_service(guard, GUARD_HTTP_REVOCATION)
            )
        )
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
