"""Small builders shared by the translators."""

from __future__ import annotations

from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, secret_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from xdsplane.policy.model import TlsVersion, duration_seconds, split_host_port

TLS_VERSIONS = {
    "1.0": common_pb2.TlsParameters.TLSv1_0,
    "1.1": common_pb2.TlsParameters.TLSv1_1,
    "1.2": common_pb2.TlsParameters.TLSv1_2,
    "1.3": common_pb2.TlsParameters.TLSv1_3,
}


def pack(message: Any) -> Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed


def duration(value: str) -> Any:
    seconds = duration_seconds(value)
    whole = int(seconds)
    return duration_pb2.Duration(seconds=whole, nanos=round((seconds - whole) * 1e9))


def u32(value: int) -> Any:
    return wrappers_pb2.UInt32Value(value=value)


def socket_address(value: str) -> Any:
    host, port = split_host_port(value)
    return address_pb2.Address(
        socket_address=address_pb2.SocketAddress(address=host, port_value=port)
    )


def one_endpoint_cluster(name: str, kind: Any, connect_timeout: str, host: str, port: int) -> Any:
    """A cluster of ``kind`` whose one endpoint is host:port, its load assignment inline."""
    return cluster_pb2.Cluster(
        name=name,
        type=kind,
        connect_timeout=duration(connect_timeout),
        load_assignment=endpoint_pb2.ClusterLoadAssignment(
            cluster_name=name,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[
                        endpoint_components_pb2.LbEndpoint(
                            endpoint=endpoint_components_pb2.Endpoint(
                                address=address_pb2.Address(
                                    socket_address=address_pb2.SocketAddress(
                                        address=host, port_value=port
                                    )
                                )
                            )
                        )
                    ]
                )
            ],
        ),
    )


def ads() -> Any:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def sds(name: str) -> Any:
    return secret_pb2.SdsSecretConfig(name=name, sds_config=ads())


def tls_params(low: TlsVersion, high: TlsVersion, ciphers: list[str] | None = None) -> Any:
    params = common_pb2.TlsParameters(
        tls_minimum_protocol_version=TLS_VERSIONS[low],
        tls_maximum_protocol_version=TLS_VERSIONS[high],
    )
    if ciphers:
        params.cipher_suites.extend(ciphers)
    return params


def transport_socket(context: Any) -> Any:
    return base_pb2.TransportSocket(name="envoy.transport_sockets.tls", typed_config=pack(context))
