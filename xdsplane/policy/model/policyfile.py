"""The policy schema: a policy file (access log, guard, and everything above)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    Field,
    model_validator,
)

from xdsplane.policy.model.common import (
    Address,
    Duration,
    Model,
    Name,
)
from xdsplane.policy.model.grpcservers import (
    GrpcServer,
)
from xdsplane.policy.model.grpcservices import (
    GrpcService,
)
from xdsplane.policy.model.introspection import (
    IntrospectionProvider,
)
from xdsplane.policy.model.jwtproviders import (
    JwtProvider,
)
from xdsplane.policy.model.routes import (
    Listener,
)
from xdsplane.policy.model.secret import (
    Secret,
)
from xdsplane.policy.model.upstreams import (
    Upstream,
    UpstreamTls,
)

# -- the file --------------------------------------------------------------------------------


class OtlpLog(Model):
    """An OpenTelemetry collector that gets every access-log record over OTLP/gRPC."""

    address: Address = Field(description="the collector's OTLP/gRPC address, HOST:PORT")
    tls: UpstreamTls | None = Field(
        None,
        description="TLS to the collector, as for an upstream: ca, sni, subject_alt_names, "
        "certificate (mutual TLS); required unless the address is loopback",
    )
    log_name: str = Field(
        "xdsplane", min_length=1, max_length=128, description="the records' log_name attribute"
    )
    timeout: Duration = Field("5s", description="how long one export call may take")


class AccessLog(Model):
    path: str = Field("/dev/stdout", description="file Envoy appends to")
    format: Literal["json", "text"] = "json"
    otlp: OtlpLog | None = Field(
        None, description="also send each record to an OpenTelemetry collector (OTLP/gRPC)"
    )


class Guard(Model):
    """Where ``xdsplane guard`` (ext_authz) listens, for routes with replay_protection."""

    address: Address = Field(description="the guard's gRPC address, HOST:PORT")
    transport: Literal["grpc", "http"] = Field(
        "grpc",
        description="how Envoy asks the guard for routes with replay_protection or "
        "revocation_check: grpc (ext_authz's gRPC Check at address), or http (ext_authz's "
        "HTTP/1.1 http_service at http_address, served by xdsplane guard --http-address: "
        "about a quarter of gRPC's CPU per request; introspection routes need grpc). Rate "
        "limits (global_rate_limit) always use gRPC at address",
    )
    http_address: Address | None = Field(
        None,
        description="with transport: http, the guard's HTTP ext_authz front, HOST:PORT "
        "(xdsplane guard --http-address); the same tls applies",
    )

    @model_validator(mode="after")
    def _http(self) -> Guard:
        if self.transport == "http" and self.http_address is None:
            raise ValueError(
                "transport: http needs http_address (xdsplane guard --http-address HOST:PORT)"
            )
        if self.transport == "grpc" and self.http_address is not None:
            raise ValueError("http_address is used only with transport: http")
        return self

    fail_open: bool = Field(
        False, description="the guard unreachable: let requests through (true) or refuse"
    )
    timeout: Duration = Field("250ms", description="how long Envoy waits for the guard")
    tls: UpstreamTls | None = Field(
        None,
        description="mutual TLS to the guard, as for an upstream: certificate (Envoy's client "
        "certificate, required), ca, sni, subject_alt_names",
    )


class PolicyFile(Model):
    """One policy file. Several files in a folder form one policy per node group."""

    nodes: list[str] | None = Field(
        None, min_length=1, description="globs on node id or cluster; absent: every node"
    )
    secrets: dict[Name, Secret] = Field(default_factory=dict)
    listeners: list[Listener] = Field(default_factory=list)
    upstreams: dict[Name, Upstream] = Field(default_factory=dict)
    access_log: AccessLog | None = None
    jwt_providers: dict[Name, JwtProvider] = Field(
        default_factory=dict, description="issuers of bearer tokens that routes can require"
    )
    introspection_providers: dict[Name, IntrospectionProvider] = Field(
        default_factory=dict,
        description="OAuth 2.0 token introspection endpoints (RFC 7662) that routes can "
        "require, asked by the guard",
    )
    guard: Guard | None = Field(
        None, description="the xdsplane guard that replay-protected routes ask"
    )
    grpc_services: list[GrpcService] = Field(
        default_factory=list,
        description="what proxyless gRPC clients dialing xds:///NAME get (docs/grpc.md)",
    )
    grpc_servers: list[GrpcServer] = Field(
        default_factory=list,
        description="xDS-enabled gRPC servers (grpc.server(..., xds=True)): TLS and RBAC",
    )
    resources: list[dict[str, Any]] = Field(
        default_factory=list, description="raw Envoy v3 resources with @type, served as they are"
    )


TOP_LEVEL_KEYS = tuple(PolicyFile.model_fields)
