"""The policy schema: xDS-enabled gRPC servers (gRFC A36)."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated

from pydantic import (
    AfterValidator,
    Field,
    model_validator,
)

from xdsplane.policy.model.common import (
    Model,
    Name,
    _check_ip_address,
    split_host_port,
)
from xdsplane.policy.model.routes import (
    ClientCertificate,
)

# -- xDS-enabled gRPC servers (gRFC A36) ----------------------------------------------------

# A method path as gRPC sends it: /package.Service/Method; /package.Service/ is the service.
GRPC_METHOD_PATTERN = re.compile(
    r"/[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*/([A-Za-z_][A-Za-z0-9_]*)?"
)


def _check_grpc_method_path(value: str) -> str:
    if not GRPC_METHOD_PATTERN.fullmatch(value):
        raise ValueError(
            f"not a gRPC service or method: {value!r} (write /package.Service/ for every "
            "method of a service, /package.Service/Method for one)"
        )
    return value


GrpcMethod = Annotated[
    str,
    Field(
        description="/package.Service/ (every method of the service) or "
        "/package.Service/Method (one method), as gRPC sends it: case matters",
        examples=["/billing.Billing/Charge"],
    ),
    AfterValidator(_check_grpc_method_path),
]


def _check_san_glob(value: str) -> str:
    """A URI glob starts with its scheme (``spiffe://``); a DNS glob has no ':', '/' or '='.

    gRPC's RBAC matches a certificate's URI SANs, or its DNS SANs when it has no URI SAN,
    or its subject DN when it has neither: these rules keep a glob from matching a subject
    DN ('CN=...') or a SAN of the other kind."""
    if not value:
        raise ValueError("a SAN glob cannot be empty")
    if "://" in value:
        scheme = value.split("://", 1)[0]
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
            raise ValueError(
                f"a URI SAN glob starts with its scheme, written out (got {value!r}, e.g. "
                "spiffe://example.com/ops/*)"
            )
    elif any(c in value for c in ":/="):
        raise ValueError(
            f"not a DNS SAN glob: {value!r} (a URI SAN glob has a scheme, e.g. spiffe://...)"
        )
    return value


SanGlob = Annotated[
    str,
    Field(
        description="a client certificate SAN glob: URI if it has ://, else DNS; "
        "'*' matches any run of characters",
        examples=["spiffe://example.com/ops/*"],
    ),
    AfterValidator(_check_san_glob),
]


class GrpcRbacRule(Model):
    """An RPC to one of ``methods`` passes when the client certificate matches one of
    ``client_sans``."""

    methods: list[GrpcMethod] = Field(min_length=1)
    client_sans: list[SanGlob] = Field(
        min_length=1,
        description="the validated client certificate has a SAN matching one of these globs",
    )


def _check_canonical_ip(value: str) -> str:
    host, port = split_host_port(value)
    ip = ipaddress.ip_address(host)
    canonical = f"[{ip.compressed}]:{port}" if ip.version == 6 else f"{ip.compressed}:{port}"
    if value != canonical:
        raise ValueError(
            f"write {value!r} as {canonical!r}: the gRPC server asks for its Listener by "
            "this exact spelling"
        )
    return value


GrpcAddress = Annotated[
    str,
    Field(
        description="IP:PORT the gRPC server listens on, exactly as it binds it "
        "([::]:PORT for IPv6)",
        examples=["0.0.0.0:50051"],
    ),
    AfterValidator(_check_ip_address),
    AfterValidator(_check_canonical_ip),
]


class GrpcServer(Model):
    """An xDS-enabled gRPC server (``grpc.server(..., xds=True)``): its TLS, and who may call
    which method. Served as the Listener the server asks for,
    ``grpc/server?xds.resource.listening_address=ADDRESS``."""

    name: Name
    address: GrpcAddress
    certificate: Name = Field(
        description="secret with the server certificate (a certificate provider of the same "
        "name in the server's bootstrap)"
    )
    client_certificate: ClientCertificate = Field(
        "off",
        description="required: refuse handshakes without a client certificate from "
        "client_ca; optional: ask for one, and check the one given; off: do not ask",
    )
    client_ca: Name | None = Field(
        None, description="secret with the CA for client certificates (a certificate provider)"
    )
    rbac: list[GrpcRbacRule] | None = Field(
        None,
        min_length=1,
        description="who may call which method; present: an RPC no rule allows is refused "
        "(PERMISSION_DENIED)",
    )

    @model_validator(mode="after")
    def _client(self) -> GrpcServer:
        if self.client_certificate != "off" and self.client_ca is None:
            raise ValueError(f"client_certificate: {self.client_certificate} needs client_ca")
        if self.client_certificate == "off" and self.client_ca is not None:
            raise ValueError("client_ca is set but client_certificate is off")
        if self.rbac is not None and self.client_certificate == "off":
            raise ValueError(
                "rbac matches client certificates: set client_certificate: required (or "
                "optional) and client_ca"
            )
        return self
