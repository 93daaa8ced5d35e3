"""Bearer-token checks: ``jwt_providers`` -> Envoy's jwt_authn filter, ``jwt:`` on routes ->
per-route requirements.

The filter sits in the HCM of every host (filter chain) with a JWT route, before RBAC and the
router. Its configuration is not in the Listener: the HCM's filter entry (named
``envoy.filters.http.jwt_authn``) has ``config_discovery`` over ADS, and the configuration is
served over ECDS as the ``TypedExtensionConfig`` of that name (Envoy asks for a filter's
configuration by the filter's name). One such resource per node group holds every provider
the group's routes name, with its key set inline (``local_jwks``), and one requirement per
provider and mode. It has no ``rules``: each route of a JWT host carries a ``PerRouteConfig``
(keyed by the filter's name, as before), either ``requirement_name`` (the provider, or
``NAME/optional`` which lets a request without a token through) or ``disabled``.

So adding, moving or dropping ``jwt:`` on a route changes only the RouteConfiguration (RDS),
and a new JWKS file or a changed issuer, audience, lifetime or clock skew changes only the
ECDS resource: Envoy applies it to the next request on every listener using it, open
connections included, and no listener is modified or drained. The Listener changes only when
a host gains or loses its JWT routes or the headers of ``forward_claims`` change; a listener
that gains the filter warms until Envoy has the configuration.

Forwarded claim headers are first removed from every request (header_mutation filter before
jwt_authn, in the Listener): a client cannot send ``x-jwt-sub`` itself on a route without a
token or with a token that lacks the claim.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.common.mutation_rules.v3 import mutation_rules_pb2
from envoy.config.core.v3 import (
    backoff_pb2,
    base_pb2,
    config_source_pb2,
    extension_pb2,
    http_uri_pb2,
)
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from google.protobuf import empty_pb2

from xdsplane.policy.model import Host, JwtProvider, Listener, Route, duration_seconds
from xdsplane.policy.translate.common import (
    ads,
    duration,
    one_endpoint_cluster,
    pack,
    sds,
    transport_socket,
    u32,
)

FILTER = "envoy.filters.http.jwt_authn"
"""The HCM's filter name, hence the name of its ECDS resource and the per-route config key."""
CONFIG_TYPE = "type.googleapis.com/" + config_pb2.JwtAuthentication.DESCRIPTOR.full_name
STRIP_FILTER = "envoy.filters.http.header_mutation"
PAYLOAD_KEY = "jwt_payload"
"""Verified claims land in dynamic metadata ``envoy.filters.http.jwt_authn`` / this key."""
OPTIONAL = "/optional"


JWKS_CLUSTER_PREFIX = "xdsplane-jwks-"
"""A provider with ``jwks_uri`` fetches its key set through the Cluster of this prefix and
its name."""
JWKS_CACHE = "5m"
"""Envoy's default cache duration of a remote key set, written out."""
JWKS_TIMEOUT = "5s"
JWKS_RETRIES = 3
"""Retries of one failed fetch (backoff 0.5s to 5s); after that Envoy tries again every
``failed_refetch_duration`` (1s)."""


@dataclass(frozen=True, slots=True)
class Provider:
    """A provider's settings and the contents of its JWKS file (empty for ``jwks_uri``)."""

    spec: JwtProvider
    jwks: bytes


def jwks_cluster_name(provider: str) -> str:
    return JWKS_CLUSTER_PREFIX + provider


@dataclass(frozen=True, slots=True)
class JwksUri:
    """The parts of a ``jwks_uri`` the cluster needs."""

    tls: bool
    host: str
    port: int
    is_ip: bool


def parse_jwks_uri(uri: str) -> JwksUri:
    u = urlsplit(uri)
    host = u.hostname or ""
    tls = u.scheme == "https"
    try:
        ipaddress.ip_address(host)
        is_ip = True
    except ValueError:
        is_ip = False
    return JwksUri(tls, host, u.port or (443 if tls else 80), is_ip)


def jwks_cluster(provider: str, spec: JwtProvider) -> Any:
    """The Cluster Envoy fetches a remote key set through: STATIC for an IP, LOGICAL_DNS
    for a host name (one connection target at a time, as for a web service behind many
    addresses); for https, TLS with SNI = the host, the ``ca`` secret (SDS) and the host
    as the required SAN (Envoy checks no name unless told)."""
    assert spec.jwks_uri is not None
    uri = parse_jwks_uri(spec.jwks_uri)
    name = jwks_cluster_name(provider)
    timeout = spec.jwks_timeout or JWKS_TIMEOUT
    kind = cluster_pb2.Cluster.STATIC if uri.is_ip else cluster_pb2.Cluster.LOGICAL_DNS
    c = one_endpoint_cluster(name, kind, timeout, uri.host, uri.port)
    if uri.tls:
        assert spec.ca is not None
        san = common_pb2.SubjectAltNameMatcher(
            san_type=(
                common_pb2.SubjectAltNameMatcher.IP_ADDRESS
                if uri.is_ip
                else common_pb2.SubjectAltNameMatcher.DNS
            ),
            matcher=string_pb2.StringMatcher(exact=uri.host),
        )
        common = tls_pb2.CommonTlsContext(
            combined_validation_context=tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
                default_validation_context=common_pb2.CertificateValidationContext(
                    match_typed_subject_alt_names=[san]
                ),
                validation_context_sds_secret_config=sds(spec.ca),
            )
        )
        ctx = tls_pb2.UpstreamTlsContext(common_tls_context=common)
        if not uri.is_ip:
            ctx.sni = uri.host
        c.transport_socket.CopyFrom(transport_socket(ctx))
    return c


def _remote_jwks(provider: str, spec: JwtProvider) -> Any:
    """Fetched by Envoy's main thread at start (async_fetch, fast_listener: a slow or down
    IdP does not hold the listener; JWT routes answer 401 until a fetch succeeds), then
    again every ``jwks_cache``."""
    assert spec.jwks_uri is not None
    return config_pb2.RemoteJwks(
        http_uri=http_uri_pb2.HttpUri(
            uri=spec.jwks_uri,
            cluster=jwks_cluster_name(provider),
            timeout=duration(spec.jwks_timeout or JWKS_TIMEOUT),
        ),
        cache_duration=duration(spec.jwks_cache or JWKS_CACHE),
        async_fetch=config_pb2.JwksAsyncFetch(
            fast_listener=True, failed_refetch_duration=duration("1s")
        ),
        retry_policy=base_pb2.RetryPolicy(
            num_retries=u32(JWKS_RETRIES),
            retry_back_off=backoff_pb2.BackoffStrategy(
                base_interval=duration("500ms"), max_interval=duration("5s")
            ),
        ),
    )


def route_provider(route: Route) -> str | None:
    return route.jwt if route.jwt is not None else route.jwt_optional


def requirement_name(route: Route) -> str | None:
    if route.jwt is not None:
        return route.jwt
    if route.jwt_optional is not None:
        return route.jwt_optional + OPTIONAL
    return None


def hcm_hosts(listener: Listener, host: Host | None) -> list[Host]:
    """The hosts sharing one HCM: a TLS host alone, or every host of a plain listener."""
    return [host] if host is not None else list(listener.hosts)


def providers_of(hosts: Iterable[Host]) -> list[str]:
    """The provider names the routes of ``hosts`` use, sorted."""
    names = {route_provider(r) for h in hosts for r in h.routes}
    return sorted(n for n in names if n is not None)


def listener_providers(listener: Listener) -> list[str]:
    return providers_of(listener.hosts)


def group_providers(listeners: Iterable[Listener]) -> list[str]:
    """The provider names any route of ``listeners`` uses, sorted: the ECDS resource's."""
    return providers_of(h for lst in listeners for h in lst.hosts)


def _provider(name: str, spec: JwtProvider, jwks: bytes) -> Any:
    p = config_pb2.JwtProvider(
        issuer=spec.issuer,
        audiences=spec.audiences,
        require_expiration=True,
        # Only the Authorization header: a token in a query string ends up in logs.
        from_headers=[config_pb2.JwtHeader(name="Authorization", value_prefix="Bearer ")],
        forward=False,
        payload_in_metadata=PAYLOAD_KEY,
        clock_skew_seconds=int(duration_seconds(spec.clock_skew)),
        claim_to_headers=[
            config_pb2.JwtClaimToHeader(header_name=header, claim_name=claim)
            for claim, header in sorted(spec.forward_claims.items())
        ],
    )
    if spec.jwks_uri is not None:
        p.remote_jwks.CopyFrom(_remote_jwks(name, spec))
    else:
        p.local_jwks.CopyFrom(base_pb2.DataSource(inline_string=jwks.decode("utf-8")))
    if spec.max_lifetime is not None:
        p.max_lifetime.CopyFrom(duration(spec.max_lifetime))
    return p


def filter_config(names: list[str], providers: Mapping[str, Provider]) -> Any:
    """The HCM-level JwtAuthentication: providers and one requirement per mode, no rules."""
    out = config_pb2.JwtAuthentication()
    for name in names:
        found = providers[name]
        out.providers[name].CopyFrom(_provider(name, found.spec, found.jwks))
        out.requirement_map[name].CopyFrom(config_pb2.JwtRequirement(provider_name=name))
        out.requirement_map[name + OPTIONAL].CopyFrom(
            config_pb2.JwtRequirement(
                requires_any=config_pb2.JwtRequirementOrList(
                    requirements=[
                        config_pb2.JwtRequirement(provider_name=name),
                        config_pb2.JwtRequirement(allow_missing=empty_pb2.Empty()),
                    ]
                )
            )
        )
    return out


def config_discovery() -> Any:
    """Where the HCM's jwt_authn entry gets its configuration: ECDS over ADS, and only a
    JwtAuthentication is accepted. No default: a listener warms until it arrives."""
    return config_source_pb2.ExtensionConfigSource(config_source=ads(), type_urls=[CONFIG_TYPE])


def extension_config(names: list[str], providers: Mapping[str, Provider]) -> Any:
    """The ECDS resource: the filter's configuration under the filter's name."""
    return extension_pb2.TypedExtensionConfig(
        name=FILTER, typed_config=pack(filter_config(names, providers))
    )


def forwarded_headers(names: list[str], providers: Mapping[str, Provider]) -> list[str]:
    headers = {h.lower() for n in names for h in providers[n].spec.forward_claims.values()}
    return sorted(headers)


def strip_config(headers: list[str]) -> Any:
    """A header_mutation filter removing ``headers`` from every request."""
    return header_mutation_pb2.HeaderMutation(
        mutations=header_mutation_pb2.Mutations(
            request_mutations=[mutation_rules_pb2.HeaderMutation(remove=h) for h in headers]
        )
    )


def per_route(route: Route) -> Any:
    """A route under an HCM with jwt_authn: its requirement, or disabled."""
    name = requirement_name(route)
    if name is None:
        return disabled()
    return config_pb2.PerRouteConfig(requirement_name=name)


def disabled() -> Any:
    """The PerRouteConfig of a route whose requests jwt_authn leaves alone."""
    return config_pb2.PerRouteConfig(disabled=True)
