"""Rate limits: ``rate_limit`` on routes -> Envoy's local_ratelimit filter (a token bucket
per client identity, in each Envoy); ``global_rate_limit`` -> Envoy's ratelimit filter asking
``xdsplane guard`` (fixed windows per identity, shared by every Envoy through its store).

Both filters sit in the HCM of every host (filter chain) with such a route, after jwt_authn
(the ``jwt_sub`` identity is the verified payload it writes into dynamic metadata) and before
ext_authz, RBAC and the router: a request refused for its rate does not spend its token's
one use. The HCM-level configs do nothing by themselves; each limited route carries its own
per-route config, so editing a limit changes only the RouteConfiguration (RDS: no drain).

Identities (the descriptor entry each request gets):

- ``source_address``: key ``remote_address``, the client's IP as Envoy sees it;
- ``jwt_sub``: key ``jwt_sub``, the ``sub`` claim from ``envoy.filters.http.jwt_authn`` /
  ``jwt_payload`` (a token without ``sub``, or no token, counts as ``anonymous``);
- ``client_certificate``: key ``client_san``, the client certificate's first URI SAN, else
  its first DNS SAN (a CEL expression); without a certificate ``anonymous``.

Local: one bucket per distinct value (a descriptor entry without a value: Envoy keeps at
most ``max_dynamic_descriptors`` of them, least recently used dropped). Global: the
descriptor ``[("route", "<listener>/<host>/<route>"), (<key>, <value>)]`` in domain
``xdsplane``; the guard derives its rules from the same policy (``xdsplane guard --policy``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from envoy.config.core.v3 import base_pb2, config_source_pb2, extension_pb2, grpc_service_pb2
from envoy.config.ratelimit.v3 import rls_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.extensions.filters.http.local_ratelimit.v3 import local_rate_limit_pb2 as local_pb2
from envoy.extensions.filters.http.ratelimit.v3 import rate_limit_pb2 as global_pb2
from envoy.extensions.rate_limit_descriptors.expr.v3 import expr_pb2
from envoy.type.metadata.v3 import metadata_pb2
from envoy.type.v3 import percent_pb2, token_bucket_pb2
from google.protobuf import wrappers_pb2

from xdsplane.names import RATE_LIMIT_DOMAIN as DOMAIN
from xdsplane.names import RATE_LIMIT_KEYS as KEYS
from xdsplane.names import ROUTE_KEY, route_id
from xdsplane.policy.model import Guard, Host, RateLimit, RateLimitBy, Route
from xdsplane.policy.translate import guard, jwt
from xdsplane.policy.translate.common import duration, pack, u32

LOCAL_FILTER = "envoy.filters.http.local_ratelimit"
GLOBAL_FILTER = "envoy.filters.http.ratelimit"
ANONYMOUS = "anonymous"
MAX_IDENTITIES = 10_000
"""Per-identity buckets one route keeps in each Envoy (least recently used dropped)."""


# The client certificate's first URI SAN, else its first DNS SAN; "anonymous" without one.
_SAN_EXPR = (
    f'connection.uri_san_peer_certificate != "" ? connection.uri_san_peer_certificate : '
    f'(connection.dns_san_peer_certificate != "" ? connection.dns_san_peer_certificate : '
    f'"{ANONYMOUS}")'
)


def needs_local(hosts: Iterable[Host]) -> bool:
    return any(r.rate_limit is not None for h in hosts for r in h.routes)


def needs_global(hosts: Iterable[Host]) -> bool:
    return any(r.global_rate_limit is not None for h in hosts for r in h.routes)


def identity_action(by: RateLimitBy) -> Any:
    """The descriptor action giving the request's identity for ``by``."""
    if by == "source_address":
        return rc.RateLimit.Action(remote_address=rc.RateLimit.Action.RemoteAddress())
    if by == "jwt_sub":
        return rc.RateLimit.Action(
            metadata=rc.RateLimit.Action.MetaData(
                descriptor_key=KEYS[by],
                metadata_key=metadata_pb2.MetadataKey(
                    key=jwt.FILTER,
                    path=[
                        metadata_pb2.MetadataKey.PathSegment(key=jwt.PAYLOAD_KEY),
                        metadata_pb2.MetadataKey.PathSegment(key="sub"),
                    ],
                ),
                default_value=ANONYMOUS,
                source=rc.RateLimit.Action.MetaData.DYNAMIC,
            )
        )
    return rc.RateLimit.Action(
        extension=extension_pb2.TypedExtensionConfig(
            name="envoy.rate_limit_descriptors.expr",
            typed_config=pack(expr_pb2.Descriptor(descriptor_key=KEYS[by], text=_SAN_EXPR)),
        )
    )


def _bucket(limit: RateLimit) -> Any:
    return token_bucket_pb2.TokenBucket(
        max_tokens=limit.requests,
        tokens_per_fill=u32(limit.requests),
        fill_interval=duration(limit.per),
    )


def _all() -> Any:
    return base_pb2.RuntimeFractionalPercent(
        default_value=percent_pb2.FractionalPercent(
            numerator=100, denominator=percent_pb2.FractionalPercent.HUNDRED
        )
    )


def local_filter_config() -> Any:
    """HCM level: no bucket, so only routes with their own config are limited."""
    return local_pb2.LocalRateLimit(stat_prefix="route_rate_limit")


def local_per_route(limit: RateLimit, stat_prefix: str) -> Any:
    """A bucket of ``requests`` per ``per`` for each identity of the route; Envoy counts
    its decisions in ``<stat_prefix>.http_local_rate_limit.{ok,rate_limited}``."""
    return local_pb2.LocalRateLimit(
        stat_prefix=stat_prefix,
        # Only requests that yield no identity would use this one; each identity has its own
        # bucket below, and spending one must not spend this shared one too.
        token_bucket=_bucket(limit),
        always_consume_default_token_bucket=wrappers_pb2.BoolValue(value=False),
        filter_enabled=_all(),
        filter_enforced=_all(),
        descriptors=[
            ratelimit_pb2.LocalRateLimitDescriptor(
                # An entry without a value: one bucket per distinct value.
                entries=[ratelimit_pb2.RateLimitDescriptor.Entry(key=KEYS[limit.by])],
                token_bucket=_bucket(limit),
            )
        ],
        rate_limits=[rc.RateLimit(actions=[identity_action(limit.by)])],
        max_dynamic_descriptors=u32(MAX_IDENTITIES),
        enable_x_ratelimit_headers=ratelimit_pb2.DRAFT_VERSION_03,
    )


def global_filter_config(spec: Guard) -> Any:
    """HCM level: ask the guard; its being unreachable follows ``guard.fail_open``."""
    return global_pb2.RateLimit(
        domain=DOMAIN,
        timeout=duration(spec.timeout),
        failure_mode_deny=not spec.fail_open,
        enable_x_ratelimit_headers=global_pb2.RateLimit.DRAFT_VERSION_03,
        rate_limit_service=rls_pb2.RateLimitServiceConfig(
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=guard.CLUSTER),
                timeout=duration(spec.timeout),
            ),
            transport_api_version=config_source_pb2.V3,
        ),
    )


def global_per_route(listener: str, host: str, route_name: str, route: Route) -> Any:
    """The descriptor ``[(route, id), (key, identity)]`` of a globally limited route."""
    limit = route.global_rate_limit
    assert limit is not None
    return global_pb2.RateLimitPerRoute(
        rate_limits=[
            rc.RateLimit(
                actions=[
                    rc.RateLimit.Action(
                        generic_key=rc.RateLimit.Action.GenericKey(
                            descriptor_key=ROUTE_KEY,
                            descriptor_value=route_id(listener, host, route_name),
                        )
                    ),
                    identity_action(limit.by),
                ]
            )
        ]
    )
