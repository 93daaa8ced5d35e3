"""Build Snapshot objects from Envoy messages, for protocol tests that need no files.

Every builder returns a Resource made by ``xdsplane.snapshot.make_resource``; ``snap``
turns any number of them into a Snapshot with ``Snapshot.build``. A ``tag`` argument
changes a resource's content (and so its version) without changing its name.
"""

from __future__ import annotations

from collections.abc import Iterable

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, extension_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.jwt_authn.v3 import config_pb2 as jwt_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2, duration_pb2

from xdsplane.snapshot import Resource, Snapshot, make_resource
from xdsplane.types import ResourceType

SDS = ResourceType.SECRET
CDS = ResourceType.CLUSTER
EDS = ResourceType.ENDPOINT
LDS = ResourceType.LISTENER
RDS = ResourceType.ROUTE
ECDS = ResourceType.EXTENSION


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def _address(port: int) -> address_pb2.Address:
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)
    )


def cluster_msg(name: str, tag: int = 1) -> cluster_pb2.Cluster:
    return cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.EDS,
        connect_timeout=duration_pb2.Duration(seconds=tag),
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
    )


def cluster(name: str, tag: int = 1) -> Resource:
    """An EDS cluster over ADS; ``tag`` is its connect timeout in seconds."""
    return make_resource(CDS, cluster_msg(name, tag), f"test:{name}")


def endpoints(name: str, port: int = 8080) -> Resource:
    msg = endpoint_pb2.ClusterLoadAssignment(
        cluster_name=name,
        endpoints=[
            endpoint_components_pb2.LocalityLbEndpoints(
                lb_endpoints=[
                    endpoint_components_pb2.LbEndpoint(
                        endpoint=endpoint_components_pb2.Endpoint(address=_address(port))
                    )
                ]
            )
        ],
    )
    return make_resource(EDS, msg, f"test:{name}")


def listener(name: str, route: str = "routes", port: int = 10000) -> Resource:
    """A listener whose HTTP connection manager takes ``route`` over RDS."""
    hcm = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        rds=hcm_pb2.Rds(route_config_name=route, config_source=_ads()),
    )
    packed = any_pb2.Any()
    packed.Pack(hcm)
    msg = listener_pb2.Listener(
        name=name,
        address=_address(port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager", typed_config=packed
                    )
                ]
            )
        ],
    )
    return make_resource(LDS, msg, f"test:{name}")


def route(name: str, cluster: str = "backend", prefix: str = "/") -> Resource:
    msg = route_pb2.RouteConfiguration(
        name=name,
        virtual_hosts=[
            route_components_pb2.VirtualHost(
                name="all",
                domains=["*"],
                routes=[
                    route_components_pb2.Route(
                        match=route_components_pb2.RouteMatch(prefix=prefix),
                        route=route_components_pb2.RouteAction(cluster=cluster),
                    )
                ],
            )
        ],
    )
    return make_resource(RDS, msg, f"test:{name}")


def secret(name: str, tag: str = "one") -> Resource:
    msg = secret_pb2.Secret(
        name=name,
        validation_context=common_pb2.CertificateValidationContext(
            trusted_ca=base_pb2.DataSource(inline_string=f"-----CA {tag}-----")
        ),
    )
    return make_resource(SDS, msg, f"test:{name}")


def extension(name: str, tag: str = "one") -> Resource:
    """A jwt_authn filter configuration served over ECDS; ``tag`` is its provider's issuer."""
    config = jwt_pb2.JwtAuthentication(
        providers={"idp": jwt_pb2.JwtProvider(issuer=f"https://{tag}.example.com")}
    )
    packed = any_pb2.Any()
    packed.Pack(config)
    msg = extension_pb2.TypedExtensionConfig(name=name, typed_config=packed)
    return make_resource(ECDS, msg, f"test:{name}")


def snap(*resources: Resource | Iterable[Resource]) -> Snapshot:
    """A Snapshot of the given resources (iterables are flattened)."""
    flat: list[Resource] = []
    for r in resources:
        if isinstance(r, Resource):
            flat.append(r)
        else:
            flat.extend(r)
    return Snapshot.build(flat)


def full(tag: int = 1, route_prefix: str = "/") -> Snapshot:
    """One of each type, wired together: listener -> route -> cluster -> endpoints, + secret
    and a filter configuration."""
    return snap(
        secret("ca"),
        extension("envoy.filters.http.jwt_authn"),
        cluster("backend", tag),
        endpoints("backend"),
        listener("http", "routes"),
        route("routes", "backend", route_prefix),
    )


def expected_sotw(
    rtype: ResourceType, version: str, nonce: str, resources: Iterable[Resource]
) -> discovery_pb2.DiscoveryResponse:
    """The response the server means, built through protobuf message objects."""
    resp = discovery_pb2.DiscoveryResponse(version_info=version, type_url=rtype.value, nonce=nonce)
    for r in resources:
        resp.resources.add().Pack(r.message)
    return resp
