"""gRPC services -> what gRPC's own xDS client asks for (docs/grpc.md).

A client dialing ``xds:///NAME`` asks for the Listener named exactly NAME: an
``api_listener`` holding an HttpConnectionManager with the router filter and RDS over ADS
(gRFC A27). Its RouteConfiguration (also NAME) has one virtual host for NAME whose routes
match on the call's path, ``/SERVICE/METHOD`` (gRFC A28). Upstreams a gRPC service uses
become EDS Clusters whose TLS comes from bootstrap certificate providers (gRFC A29), never
SDS; each provider instance has the name of the policy secret it reads
(``xdsplane/policy/grpc_providers.py``).

| policy | resources |
| --- | --- |
| gRPC service `NAME` | Listener `NAME`, RouteConfiguration `NAME` (virtual host `NAME`) |
| route `R` (default `route-N`; `default` for `upstream:`) | Route `R` |
| upstream `U` used by gRPC | Cluster `U` (EDS), ClusterLoadAssignment `U` (one locality) |
| secret `S` named in the upstream's `tls` | certificate provider instance `S` |
"""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.common.fault.v3 import fault_pb2 as common_fault_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2

from xdsplane.policy.model import (
    GRPC_STATUS_CODES,
    GrpcFault,
    GrpcRetries,
    GrpcRoute,
    GrpcService,
    Upstream,
    UpstreamTls,
)
from xdsplane.policy.translate.clusters import locality_lb_endpoints, outlier_detection
from xdsplane.policy.translate.common import (
    ads,
    duration,
    pack,
    transport_socket,
    u32,
)
from xdsplane.policy.translate.routes import header_matcher

FAULT_FILTER = "envoy.filters.http.fault"
CHANNEL_ID = "io.grpc.channel_id"  # the filter state key gRPC hashes a channel by (gRFC A42)
_ROUTER = "envoy.filters.http.router"


def listener(service: GrpcService) -> Any:
    """The api_listener NAME: router (and fault, when a route injects faults), RDS NAME."""
    filters = []
    if any(r.fault is not None for r in service.effective_routes()):
        filters.append(
            hcm_pb2.HttpFilter(name=FAULT_FILTER, typed_config=pack(fault_pb2.HTTPFault()))
        )
    filters.append(hcm_pb2.HttpFilter(name=_ROUTER, typed_config=pack(router_pb2.Router())))
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=service.name,
        rds=hcm_pb2.Rds(config_source=ads(), route_config_name=service.name),
        http_filters=filters,
    )
    return listener_pb2.Listener(
        name=service.name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(hcm))
    )


def route_configuration(service: GrpcService) -> Any:
    routes = [_route(i, r) for i, r in enumerate(service.effective_routes())]
    return route_pb2.RouteConfiguration(
        name=service.name,
        virtual_hosts=[rc.VirtualHost(name=service.name, domains=[service.name], routes=routes)],
    )


def _route(index: int, r: GrpcRoute) -> Any:
    match = rc.RouteMatch(headers=[header_matcher(h) for h in r.headers])
    if r.method is not None:
        match.path = f"/{r.service}/{r.method}"
    elif r.service is not None:
        match.prefix = f"/{r.service}/"
    else:
        match.prefix = ""
    action = rc.RouteAction()
    if r.upstream is not None:
        action.cluster = r.upstream
    else:
        action.weighted_clusters.CopyFrom(
            rc.WeightedCluster(
                clusters=[
                    rc.WeightedCluster.ClusterWeight(name=up, weight=u32(w))
                    for up, w in (r.weighted or {}).items()
                ]
            )
        )
    if r.timeout is not None:
        action.max_stream_duration.CopyFrom(
            rc.RouteAction.MaxStreamDuration(max_stream_duration=duration(r.timeout))
        )
    if r.retries is not None:
        action.retry_policy.CopyFrom(retry_policy(r.retries))
    if r.hash is not None:
        hp = rc.RouteAction.HashPolicy()
        if r.hash.header is not None:
            hp.header.header_name = r.hash.header
        else:
            hp.filter_state.key = CHANNEL_ID
        action.hash_policy.append(hp)
    route = rc.Route(name=r.name or f"route-{index}", match=match, route=action)
    if r.fault is not None:
        route.typed_per_filter_config[FAULT_FILTER].CopyFrom(pack(fault(r.fault)))
    return route


def retry_policy(retries: GrpcRetries) -> Any:
    policy = rc.RetryPolicy(retry_on=",".join(retries.on), num_retries=u32(retries.num_retries))
    if retries.backoff is not None:
        b = rc.RetryPolicy.RetryBackOff(base_interval=duration(retries.backoff.base_interval))
        if retries.backoff.max_interval is not None:
            b.max_interval.CopyFrom(duration(retries.backoff.max_interval))
        policy.retry_back_off.CopyFrom(b)
    return policy


def _percent(value: int) -> Any:
    return percent_pb2.FractionalPercent(
        numerator=value, denominator=percent_pb2.FractionalPercent.HUNDRED
    )


def fault(f: GrpcFault) -> Any:
    out = fault_pb2.HTTPFault()
    if f.delay is not None:
        out.delay.CopyFrom(
            common_fault_pb2.FaultDelay(
                fixed_delay=duration(f.delay.fixed), percentage=_percent(f.delay.percent)
            )
        )
    if f.abort is not None:
        out.abort.CopyFrom(
            fault_pb2.FaultAbort(
                grpc_status=GRPC_STATUS_CODES[f.abort.status], percentage=_percent(f.abort.percent)
            )
        )
    if f.max_active_faults is not None:
        out.max_active_faults.CopyFrom(u32(f.max_active_faults))
    return out


# -- upstreams -------------------------------------------------------------------------------


def cluster(name: str, up: Upstream) -> Any:
    """An EDS cluster as gRPC takes it: round robin, max_requests, TLS from certificate
    providers."""
    c = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=ads()),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
    )
    if up.lb == "ring_hash":
        c.lb_policy = cluster_pb2.Cluster.RING_HASH
        c.ring_hash_lb_config.hash_function = cluster_pb2.Cluster.RingHashLbConfig.XX_HASH
    if up.outlier_detection is not None:
        c.outlier_detection.CopyFrom(outlier_detection(up.outlier_detection))
    if up.limits is not None and up.limits.max_requests is not None:
        c.circuit_breakers.thresholds.append(
            circuit_breaker_pb2.CircuitBreakers.Thresholds(
                priority=base_pb2.DEFAULT, max_requests=u32(up.limits.max_requests)
            )
        )
    if up.tls is not None:
        c.transport_socket.CopyFrom(upstream_tls(up.tls))
    return c


def upstream_tls(t_: UpstreamTls) -> Any:
    """(m)TLS from a gRPC client: the CA (and the client certificate) from the certificate
    provider instances named like their secrets, the upstream's SANs matched exactly."""
    validation = common_pb2.CertificateValidationContext(
        ca_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
            instance_name=t_.ca
        ),
        match_subject_alt_names=[string_pb2.StringMatcher(exact=s) for s in t_.subject_alt_names],
    )
    common = tls_pb2.CommonTlsContext(validation_context=validation)
    if t_.certificate is not None:
        common.tls_certificate_provider_instance.CopyFrom(
            common_pb2.CertificateProviderPluginInstance(instance_name=t_.certificate)
        )
    return transport_socket(tls_pb2.UpstreamTlsContext(common_tls_context=common))


def load_assignment(name: str, up: Upstream) -> Any:
    """The upstream's localities with their weights; without localities, one locality
    (gRPC NACKs an endpoint group without one) of weight 1 (gRPC drops a locality without
    a weight)."""
    return endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=locality_lb_endpoints(up, (base_pb2.Locality(sub_zone=name), 1)),
    )
