"""The policy schema: upstreams (TLS to the service, limits, health checks, outlier
detection, localities).
"""

from __future__ import annotations

from typing import Literal

from pydantic import (
    Field,
    model_validator,
)

from xdsplane.policy.model.common import (
    _TLS_ORDER,
    Address,
    Duration,
    Model,
    Name,
    TlsVersion,
    _one_of,
)
from xdsplane.policy.model.routes import (
    ALLOW_LEGACY_TLS,
)

# -- upstreams -------------------------------------------------------------------------------


class UpstreamTls(Model):
    """TLS from Envoy to the upstream; with `certificate`, mutual TLS."""

    ca: Name = Field(description="secret with the CA that verifies the upstream")
    certificate: Name | None = Field(None, description="secret with Envoy's client certificate")
    sni: str | None = None
    subject_alt_names: list[str] = Field(
        default_factory=list, description="the upstream certificate must carry one of these"
    )
    min_version: TlsVersion = "1.2"
    max_version: TlsVersion = "1.3"
    allow_legacy_tls: bool = Field(False, description=ALLOW_LEGACY_TLS)

    @model_validator(mode="after")
    def _order(self) -> UpstreamTls:
        if _TLS_ORDER[self.min_version] > _TLS_ORDER[self.max_version]:
            raise ValueError(
                f"min_version {self.min_version} is above max_version {self.max_version}"
            )
        return self


class UpstreamLimits(Model):
    """Circuit breakers for the upstream."""

    max_connections: int | None = Field(None, ge=1)
    max_pending_requests: int | None = Field(None, ge=1)
    max_requests: int | None = Field(None, ge=1)
    max_retries: int | None = Field(None, ge=0)


class HealthCheck(Model):
    path: str = "/healthz"
    interval: Duration = "5s"
    timeout: Duration = "1s"
    healthy_threshold: int = Field(2, ge=1)
    unhealthy_threshold: int = Field(3, ge=1)


# ring_hash needs a hash policy on the routes: only gRPC routes can say what to hash on
# (`hash:`), so an Envoy route to a ring_hash upstream is refused (it would silently behave
# like random). maglev is not offered.
LbPolicy = Literal["round_robin", "least_request", "random", "ring_hash"]


class OutlierDetection(Model):
    """Take endpoints that fail often out of the rotation for a while, by failure
    percentage: the one ejection rule Envoy and gRPC (gRFC A50) both implement. Envoy's
    consecutive-error and success-rate rules are switched off, so both behave alike."""

    failure_percentage: int = Field(
        ge=1,
        le=100,
        description="eject an endpoint whose share of failed requests in an interval is at "
        "least this (percent)",
    )
    interval: Duration = Field("10s", description="how often endpoints are judged")
    base_ejection_time: Duration = Field(
        "30s", description="first ejection's length; it grows with each ejection"
    )
    max_ejection_percent: int = Field(
        10, ge=1, le=100, description="at most this share of the endpoints is ejected at once"
    )
    minimum_hosts: int = Field(
        5, ge=1, description="judge only when at least this many endpoints have enough requests"
    )
    request_volume: int = Field(
        50, ge=1, description="an endpoint needs this many requests in an interval to be judged"
    )


# The sum of a cluster's locality weights must fit in a uint32 (Envoy refuses the
# assignment, gRPC NACKs it otherwise).
MAX_LOCALITY_WEIGHT_SUM = 2**32 - 1


class Locality(Model):
    """A failure domain (region, zone, sub-zone) holding some of an upstream's endpoints,
    with its share of the requests. At least one of region, zone and sub_zone names it."""

    region: str | None = Field(None, min_length=1, description="the locality's region")
    zone: str | None = Field(None, min_length=1, description="its zone within the region")
    sub_zone: str | None = Field(None, min_length=1, description="its sub-zone within the zone")
    weight: int = Field(
        ge=1,
        le=MAX_LOCALITY_WEIGHT_SUM,
        description="share of the requests: this weight over the sum of the localities' weights",
    )
    endpoints: list[Address] = Field(min_length=1)

    @model_validator(mode="after")
    def _named(self) -> Locality:
        if self.region is None and self.zone is None and self.sub_zone is None:
            raise ValueError("a locality needs at least one of region, zone, sub_zone")
        return self

    def key(self) -> tuple[str, str, str]:
        return (self.region or "", self.zone or "", self.sub_zone or "")

    def label(self) -> str:
        names = ("region", "zone", "sub_zone")
        return ", ".join(f"{k}={v}" for k, v in zip(names, self.key(), strict=True) if v)


class Upstream(Model):
    endpoints: list[Address] | None = Field(
        None, min_length=1, description="where the service runs; or localities"
    )
    localities: list[Locality] | None = Field(
        None,
        min_length=1,
        description="the endpoints grouped by locality, each with a weight; or endpoints",
    )
    lb: LbPolicy = "round_robin"
    connect_timeout: Duration = "1s"
    http2: bool = Field(False, description="speak HTTP/2 to the upstream")
    tls: UpstreamTls | None = None
    limits: UpstreamLimits | None = None
    health_check: HealthCheck | None = None
    outlier_detection: OutlierDetection | None = Field(
        None, description="eject endpoints that fail often (Envoy and gRPC)"
    )

    @model_validator(mode="after")
    def _where(self) -> Upstream:
        _one_of(self, ("endpoints", "localities"))
        total = sum(loc.weight for loc in self.localities or ())
        if total > MAX_LOCALITY_WEIGHT_SUM:
            raise ValueError(
                f"the localities' weights add up to {total}, above {MAX_LOCALITY_WEIGHT_SUM}"
            )
        return self

    def all_endpoints(self) -> list[str]:
        """Every endpoint, in the order written (over the localities when there are)."""
        if self.localities is None:
            return list(self.endpoints or ())
        return [e for loc in self.localities for e in loc.endpoints]

    def placed_endpoints(self) -> list[tuple[tuple[str | int, ...], str]]:
        """Every endpoint with the keys that lead to it from the upstream."""
        if self.localities is None:
            return [(("endpoints", i), e) for i, e in enumerate(self.endpoints or ())]
        return [
            (("localities", j, "endpoints", i), e)
            for j, loc in enumerate(self.localities)
            for i, e in enumerate(loc.endpoints)
        ]
