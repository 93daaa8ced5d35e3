"""The policy schema: gRPC services for proxyless gRPC clients (docs/grpc.md)."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, get_args

from pydantic import (
    AfterValidator,
    Field,
    model_validator,
)

from xdsplane.policy.model.common import (
    Duration,
    Model,
    Name,
    _one_of,
    duration_seconds,
)
from xdsplane.policy.model.routes import (
    HeaderMatch,
)

# -- gRPC services (proxyless gRPC clients, docs/grpc.md) -------------------------------------

_AUTHORITY = re.compile(r"[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?")
_GRPC_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_GRPC_METHOD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check_authority(value: str) -> str:
    if not _AUTHORITY.fullmatch(value):
        raise ValueError(
            f"not a gRPC authority: {value!r} (a lower-case host name, optionally :PORT, as "
            "clients dial it: xds:///billing.grpc:50051 -> billing.grpc:50051)"
        )
    _, _, port = value.partition(":")
    if port and not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} out of range 1-65535 in {value!r}")
    return value


def _check_grpc_service_name(value: str) -> str:
    if not _GRPC_NAME.fullmatch(value):
        raise ValueError(
            f"not a fully qualified gRPC service name: {value!r} (e.g. billing.v1.Billing)"
        )
    return value


def _check_grpc_method(value: str) -> str:
    if not _GRPC_METHOD.fullmatch(value):
        raise ValueError(f"not a gRPC method name: {value!r} (e.g. Charge)")
    return value


Authority = Annotated[
    str,
    Field(
        description="host[:port], as clients dial it after xds:///", examples=["billing.grpc:50051"]
    ),
    AfterValidator(_check_authority),
]
GrpcServiceName = Annotated[
    str,
    Field(
        description="a fully qualified gRPC service, package included",
        examples=["billing.v1.Billing"],
    ),
    AfterValidator(_check_grpc_service_name),
]
GrpcMethodName = Annotated[
    str,
    Field(description="a method of `service`", examples=["Charge"]),
    AfterValidator(_check_grpc_method),
]
GrpcRetryOn = Literal[
    "cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable"
]
_DEFAULT_GRPC_RETRY_ON: list[GrpcRetryOn] = ["unavailable"]
GrpcStatusName = Literal[
    "cancelled",
    "unknown",
    "invalid-argument",
    "deadline-exceeded",
    "not-found",
    "already-exists",
    "permission-denied",
    "resource-exhausted",
    "failed-precondition",
    "aborted",
    "out-of-range",
    "unimplemented",
    "internal",
    "unavailable",
    "data-loss",
    "unauthenticated",
]
GRPC_STATUS_CODES: dict[str, int] = {name: i + 1 for i, name in enumerate(get_args(GrpcStatusName))}


class GrpcBackoff(Model):
    base_interval: Duration = Field("25ms", description="first wait before a retry (jittered)")
    max_interval: Duration | None = Field(None, description="longest wait; default: 10 x base")

    @model_validator(mode="after")
    def _order(self) -> GrpcBackoff:
        if self.max_interval is not None and duration_seconds(self.max_interval) < duration_seconds(
            self.base_interval
        ):
            raise ValueError("max_interval is below base_interval")
        return self


class GrpcRetries(Model):
    """gRPC's retry policy (gRFC A44): only these status codes, a count and a backoff."""

    on: list[GrpcRetryOn] = Field(
        default_factory=lambda: list(_DEFAULT_GRPC_RETRY_ON),
        min_length=1,
        description="the status codes that are retried (the only ones gRPC retries on)",
    )
    num_retries: int = Field(
        1, ge=1, le=4, description="retries after the first attempt (gRPC caps attempts at 5)"
    )
    backoff: GrpcBackoff | None = Field(None, description="default: 25ms base, 250ms max")


class GrpcFaultDelay(Model):
    fixed: Duration = Field(description="how long the call is held before it goes out")
    percent: int = Field(100, ge=0, le=100, description="share of calls delayed")


class GrpcFaultAbort(Model):
    status: GrpcStatusName = Field(description="the gRPC status the call fails with")
    percent: int = Field(100, ge=0, le=100, description="share of calls failed")


class GrpcFault(Model):
    """Fault injection as gRPC implements it (gRFC A33): delay, abort, max_active_faults."""

    delay: GrpcFaultDelay | None = None
    abort: GrpcFaultAbort | None = None
    max_active_faults: int | None = Field(None, ge=1, description="at most this many at once")

    @model_validator(mode="after")
    def _some(self) -> GrpcFault:
        if self.delay is None and self.abort is None:
            raise ValueError("a fault needs delay or abort")
        return self


class GrpcHash(Model):
    """What a ring_hash upstream hashes on (gRFC A42): a request metadata value, or the
    channel (every call of one client channel to one endpoint)."""

    header: str | None = Field(
        None, min_length=1, description="request metadata (header) whose value is hashed"
    )
    channel: bool = Field(False, description="hash on the client channel")

    @model_validator(mode="after")
    def _one(self) -> GrpcHash:
        if (self.header is None) == (not self.channel):
            raise ValueError("give header: NAME or channel: true (one of them)")
        if self.header is not None and self.header.lower().endswith("-bin"):
            raise ValueError(f"header {self.header!r}: gRPC never hashes binary (-bin) metadata")
        return self


class GrpcRoute(Model):
    """One route of a gRPC service: which calls (service, method, headers) go where."""

    name: Name | None = Field(None, description="default: route-N, N its position from 0")
    service: GrpcServiceName | None = Field(
        None, description="match every method of this service (path prefix /SERVICE/); absent: any"
    )
    method: GrpcMethodName | None = Field(
        None, description="match only this method of `service` (exact path /SERVICE/METHOD)"
    )
    headers: list[HeaderMatch] = Field(
        default_factory=list, description="request metadata that must match too (all of them)"
    )
    upstream: Name | None = Field(None, description="send the calls to this upstream")
    weighted: dict[Name, int] | None = Field(
        None,
        min_length=1,
        description="upstream -> weight (1-1000): split calls among upstreams by weight",
    )
    timeout: Duration | None = Field(
        None, description="longest a call may take (max_stream_duration); default: the service's"
    )
    retries: GrpcRetries | None = Field(None, description="default: the service's")
    fault: GrpcFault | None = Field(None, description="inject delays or failures (testing)")
    hash: GrpcHash | None = Field(
        None, description="what ring_hash upstreams hash on; default: the service's"
    )

    @model_validator(mode="after")
    def _shape(self) -> GrpcRoute:
        _one_of(self, ("upstream", "weighted"))
        if self.method is not None and self.service is None:
            raise ValueError("method needs service")
        for up, weight in (self.weighted or {}).items():
            if not 1 <= weight <= 1000:
                raise ValueError(f"weight of {up!r} must be 1-1000 (got {weight})")
        return self


class GrpcService(Model):
    """What clients that dial ``xds:///NAME`` get: routes by service and method to upstreams."""

    name: Authority
    upstream: Name | None = Field(None, description="every call goes to this upstream (or routes)")
    weighted: dict[Name, int] | None = Field(
        None, min_length=1, description="upstream -> weight (1-1000), instead of upstream"
    )
    routes: list[GrpcRoute] | None = Field(
        None, min_length=1, description="routes tried in order; a call no route matches fails"
    )
    timeout: Duration | None = Field(None, description="default timeout of every route")
    retries: GrpcRetries | None = Field(None, description="default retries of every route")
    fault: GrpcFault | None = Field(None, description="fault injection on every call (testing)")
    hash: GrpcHash | None = Field(None, description="default hash of every route (ring_hash)")

    @model_validator(mode="after")
    def _shape(self) -> GrpcService:
        _one_of(self, ("upstream", "weighted", "routes"))
        for up, weight in (self.weighted or {}).items():
            if not 1 <= weight <= 1000:
                raise ValueError(f"weight of {up!r} must be 1-1000 (got {weight})")
        return self

    def effective_routes(self) -> list[GrpcRoute]:
        """The routes with the service's defaults filled in (one catch-all route for
        ``upstream:`` / ``weighted:``)."""
        if self.routes is None:
            return [
                GrpcRoute(
                    name="default",
                    service=None,
                    method=None,
                    upstream=self.upstream,
                    weighted=self.weighted,
                    timeout=self.timeout,
                    retries=self.retries,
                    fault=self.fault,
                    hash=self.hash,
                )
            ]
        out = []
        for r in self.routes:
            updates: dict[str, Any] = {}
            for key in ("timeout", "retries", "fault", "hash"):
                if getattr(r, key) is None and getattr(self, key) is not None:
                    updates[key] = getattr(self, key)
            out.append(r.model_copy(update=updates) if updates else r)
        return out
