"""``access_log.otlp`` -> Envoy's OpenTelemetry access logger (OTLP/gRPC) and the Cluster of
the collector.

Each record carries the same fields as the file's JSON line, as OTLP attributes (one
string attribute per field, same names: docs/observability.md has the schema); its body is
a short ``METHOD PATH STATUS`` line for people. Envoy batches records and flushes them
every second (``buffer_flush_interval``' default) over one gRPC stream to the cluster.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from envoy.config.accesslog.v3 import accesslog_pb2
from envoy.config.core.v3 import config_source_pb2, extension_pb2, grpc_service_pb2
from envoy.extensions.access_loggers.grpc.v3 import als_pb2
from envoy.extensions.access_loggers.open_telemetry.v3 import logs_service_pb2
from envoy.extensions.formatter.cel.v3 import cel_pb2
from opentelemetry.proto.common.v1 import common_pb2 as otel_common_pb2

from xdsplane.names import OTLP_CLUSTER
from xdsplane.policy.model import OtlpLog
from xdsplane.policy.translate import clusters
from xdsplane.policy.translate.common import duration, pack

CLUSTER = OTLP_CLUSTER
LOGGER = "envoy.access_loggers.open_telemetry"
BODY = "%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %RESPONSE_CODE%"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def cluster(otlp: OtlpLog) -> Any:
    """The collector's cluster: STATIC for an IP address, STRICT_DNS for a host name;
    HTTP/2 (gRPC); with ``tls``, (mutual) TLS as to an upstream."""
    return clusters.grpc_service_cluster(CLUSTER, otlp.address, otlp.tls)


def access_log(
    otlp: OtlpLog, fields: Mapping[str, str], cel: bool, log_filter: Any | None = None
) -> Any:
    """One OpenTelemetry access logger writing ``fields`` (key -> command operator) as the
    record's attributes."""
    config = logs_service_pb2.OpenTelemetryAccessLogConfig(
        common_config=als_pb2.CommonGrpcAccessLogConfig(
            log_name=otlp.log_name,
            grpc_service=grpc_service_pb2.GrpcService(
                envoy_grpc=grpc_service_pb2.GrpcService.EnvoyGrpc(cluster_name=CLUSTER),
                timeout=duration(otlp.timeout),
            ),
            transport_api_version=config_source_pb2.V3,
        ),
        body=otel_common_pb2.AnyValue(string_value=BODY),
        attributes=otel_common_pb2.KeyValueList(
            values=[
                otel_common_pb2.KeyValue(key=k, value=otel_common_pb2.AnyValue(string_value=v))
                for k, v in fields.items()
            ]
        ),
    )
    if cel:
        config.formatters.append(
            extension_pb2.TypedExtensionConfig(
                name="envoy.formatter.cel", typed_config=pack(cel_pb2.Cel())
            )
        )
    out = accesslog_pb2.AccessLog(name=LOGGER, typed_config=pack(config))
    if log_filter is not None:
        out.filter.CopyFrom(log_filter)
    return out
