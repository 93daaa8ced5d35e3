"""Upstreams -> Cluster (EDS over ADS) and ClusterLoadAssignment."""

from __future__ import annotations

import ipaddress
from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2, protocol_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2
from envoy.type.matcher.v3 import string_pb2

from xdsplane.policy.model import OutlierDetection, Upstream, UpstreamTls, split_host_port
from xdsplane.policy.translate.common import (
    ads,
    duration,
    one_endpoint_cluster,
    pack,
    sds,
    socket_address,
    tls_params,
    transport_socket,
    u32,
)

_LB = {
    "round_robin": cluster_pb2.Cluster.ROUND_ROBIN,
    "least_request": cluster_pb2.Cluster.LEAST_REQUEST,
    "random": cluster_pb2.Cluster.RANDOM,
    "ring_hash": cluster_pb2.Cluster.RING_HASH,
}
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def uses_eds(up: Upstream) -> bool:
    """IP endpoints are served over EDS; host names need Envoy's DNS (STRICT_DNS)."""
    for e in up.all_endpoints():
        host, _ = split_host_port(e)
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
    return True


def cluster(name: str, up: Upstream) -> Any:
    c = cluster_pb2.Cluster(
        name=name,
        connect_timeout=duration(up.connect_timeout),
        lb_policy=_LB[up.lb],
    )
    if uses_eds(up):
        c.type = cluster_pb2.Cluster.EDS
        c.eds_cluster_config.CopyFrom(cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads()))
    else:
        c.type = cluster_pb2.Cluster.STRICT_DNS
        c.load_assignment.CopyFrom(load_assignment(name, up))
    if up.localities is not None:
        # Without it Envoy ignores the localities' weights (and spreads over all endpoints).
        c.common_lb_config.locality_weighted_lb_config.SetInParent()
    if up.http2:
        opts = http_protocol_options_pb2.HttpProtocolOptions(
            explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
                http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
            )
        )
        c.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(pack(opts))
    if up.limits is not None:
        t = circuit_breaker_pb2.CircuitBreakers.Thresholds(priority=base_pb2.DEFAULT)
        for field in ("max_connections", "max_pending_requests", "max_requests", "max_retries"):
            value = getattr(up.limits, field)
            if value is not None:
                getattr(t, field).CopyFrom(u32(value))
        c.circuit_breakers.thresholds.append(t)
    if up.health_check is not None:
        hc = up.health_check
        c.health_checks.append(
            health_check_pb2.HealthCheck(
                timeout=duration(hc.timeout),
                interval=duration(hc.interval),
                healthy_threshold=u32(hc.healthy_threshold),
                unhealthy_threshold=u32(hc.unhealthy_threshold),
                http_health_check=health_check_pb2.HealthCheck.HttpHealthCheck(path=hc.path),
            )
        )
    if up.tls is not None:
        c.transport_socket.CopyFrom(upstream_tls(up.tls))
    if up.outlier_detection is not None:
        c.outlier_detection.CopyFrom(outlier_detection(up.outlier_detection))
    return c


def outlier_detection(od: OutlierDetection) -> Any:
    """Failure-percentage ejection only, the rule Envoy and gRPC share: Envoy's
    consecutive-5xx and success-rate rules (on by default there) are switched off."""
    return outlier_detection_pb2.OutlierDetection(
        interval=duration(od.interval),
        base_ejection_time=duration(od.base_ejection_time),
        max_ejection_percent=u32(od.max_ejection_percent),
        enforcing_consecutive_5xx=u32(0),
        enforcing_consecutive_gateway_failure=u32(0),
        enforcing_success_rate=u32(0),
        failure_percentage_threshold=u32(od.failure_percentage),
        enforcing_failure_percentage=u32(100),
        failure_percentage_minimum_hosts=u32(od.minimum_hosts),
        failure_percentage_request_volume=u32(od.request_volume),
    )


def upstream_tls(t_: UpstreamTls) -> Any:
    """The transport socket of a cluster that speaks (mutual) TLS to its endpoints: Envoy's
    client certificate and the CA over SDS, the SANs and SNI to verify and send."""
    common = tls_pb2.CommonTlsContext(tls_params=tls_params(t_.min_version, t_.max_version))
    if t_.certificate is not None:
        common.tls_certificate_sds_secret_configs.append(sds(t_.certificate))
    validation = common_pb2.CertificateValidationContext()
    for san in t_.subject_alt_names:
        kind = (
            common_pb2.SubjectAltNameMatcher.URI
            if "://" in san
            else common_pb2.SubjectAltNameMatcher.DNS
        )
        validation.match_typed_subject_alt_names.append(
            common_pb2.SubjectAltNameMatcher(
                san_type=kind, matcher=string_pb2.StringMatcher(exact=san)
            )
        )
    common.combined_validation_context.CopyFrom(
        tls_pb2.CommonTlsContext.CombinedCertificateValidationContext(
            default_validation_context=validation,
            validation_context_sds_secret_config=sds(t_.ca),
        )
    )
    ctx = tls_pb2.UpstreamTlsContext(common_tls_context=common)
    if t_.sni:
        ctx.sni = t_.sni
    return transport_socket(ctx)


def load_assignment(name: str, up: Upstream) -> Any:
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name, endpoints=locality_lb_endpoints(up, None)
    )


def locality_lb_endpoints(up: Upstream, default: Any) -> list[Any]:
    """The endpoint groups of ``up``: one per locality, with its weight; without
    localities, one group of ``default`` (a ``(Locality, weight)`` pair, or None for a
    group with neither)."""
    groups: list[tuple[Any, int | None, list[str]]]
    if up.localities is not None:
        groups = [
            (
                base_pb2.Locality(region=loc.key()[0], zone=loc.key()[1], sub_zone=loc.key()[2]),
                loc.weight,
                loc.endpoints,
            )
            for loc in up.localities
        ]
    elif default is not None:
        groups = [(default[0], default[1], up.endpoints or [])]
    else:
        groups = [(None, None, up.endpoints or [])]
    out = []
    for locality, weight, endpoints in groups:
        group = endpoint_components_pb2.LocalityLbEndpoints(
            lb_endpoints=[
                endpoint_components_pb2.LbEndpoint(
                    endpoint=endpoint_components_pb2.Endpoint(address=socket_address(e))
                )
                for e in endpoints
            ]
        )
        if locality is not None:
            group.locality.CopyFrom(locality)
        if weight is not None:
            group.load_balancing_weight.CopyFrom(u32(weight))
        out.append(group)
    return out


def grpc_service_cluster(name: str, address: str, tls: UpstreamTls | None) -> Any:
    """A cluster for a gRPC service Envoy itself calls (the guard, an OTLP collector):
    STATIC for an IP address, STRICT_DNS for a host name; HTTP/2; with ``tls``, (mutual)
    TLS as to an upstream."""
    host, port = split_host_port(address)
    try:
        ipaddress.ip_address(host)
        kind = cluster_pb2.Cluster.STATIC
    except ValueError:
        kind = cluster_pb2.Cluster.STRICT_DNS
    c = one_endpoint_cluster(name, kind, "1s", host, port)
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http2_protocol_options=protocol_pb2.Http2ProtocolOptions()
        )
    )
    c.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(pack(opts))
    if tls is not None:
        c.transport_socket.CopyFrom(upstream_tls(tls))
    return c


HTTP1_IDLE_TIMEOUT = "60s"
"""An idle connection to an HTTP/1.1 service Envoy calls is closed by Envoy after this:
before the guard's front closes it (httpfront.IDLE_SECONDS, 300 s), so that Envoy never
sends a check on a connection the guard is closing."""


def http1_service_cluster(name: str, address: str, tls: UpstreamTls | None) -> Any:
    """``grpc_service_cluster``'s twin for an HTTP/1.1 service (the guard's ext_authz front):
    one check per connection at a time, so Envoy opens as many as are in flight."""
    c = grpc_service_cluster(name, address, tls)
    opts = http_protocol_options_pb2.HttpProtocolOptions(
        common_http_protocol_options=protocol_pb2.HttpProtocolOptions(
            idle_timeout=duration(HTTP1_IDLE_TIMEOUT)
        ),
        explicit_http_config=http_protocol_options_pb2.HttpProtocolOptions.ExplicitHttpConfig(
            http_protocol_options=protocol_pb2.Http1ProtocolOptions()
        ),
    )
    c.typed_extension_protocol_options[_HTTP_OPTIONS].CopyFrom(pack(opts))
    return c
