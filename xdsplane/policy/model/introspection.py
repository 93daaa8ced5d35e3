"""The policy schema: introspection providers (RFC 7662)."""

from __future__ import annotations

import ipaddress
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    Field,
    field_validator,
    model_validator,
)

from xdsplane.policy.model.common import (
    Duration,
    Model,
    Name,
    duration_seconds,
)
from xdsplane.policy.model.jwtproviders import (
    _URI_HOST,
    HeaderName,
    JwtProvider,
)

# -- introspection providers (RFC 7662) ------------------------------------------------------

_LOOPBACK_NAMES = ("localhost",)


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: a plaintext endpoint there never leaves the host."""
    if host.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_endpoint(value: str) -> str:
    """An https:// URL (http:// only on a loopback host) with a host, no user info, no
    query and no fragment."""
    u = urlsplit(value)
    if u.scheme not in ("http", "https") or "://" not in value:
        raise ValueError(f"endpoint must start with https:// (got {value!r})")
    try:
        port = u.port
        host = u.hostname
    except ValueError as e:
        raise ValueError(f"not a URL: {value!r} ({e})") from None
    if not host or u.username is not None or u.fragment or u.query or port == 0:
        raise ValueError(
            f"endpoint needs a host, no user info, no ?query, no #fragment (got {value!r})"
        )
    if any(c.isspace() for c in value) or not _URI_HOST.fullmatch(host):
        raise ValueError(f"not a URL: {value!r}")
    if u.scheme == "http" and not is_loopback_host(host):
        raise ValueError(
            f"endpoint {value!r} is plaintext http:// off this host: the guard would send "
            "tokens and its client secret unencrypted; use https:// (http:// is allowed "
            "only on 127.0.0.1, ::1 or localhost)"
        )
    return value


IntrospectionEndpoint = Annotated[
    str,
    Field(
        description="https:// URL of the RFC 7662 endpoint (http:// only on loopback)",
        examples=["https://idp.example.com/oauth2/introspect"],
    ),
    AfterValidator(_check_endpoint),
]


class IntrospectionCache(Model):
    """How the guard remembers the endpoint's answers (per provider, in its memory)."""

    max_entries: int = Field(
        10_000, ge=1, le=10_000_000, description="answers kept; the least recently used go first"
    )
    max_ttl: Duration = Field(
        "60s",
        description="an active answer is kept until the token's exp, never longer than this",
    )
    negative_ttl: Duration = Field(
        "5s", description="an inactive answer is kept this long (at most 60s and max_ttl)"
    )

    @model_validator(mode="after")
    def _bounds(self) -> IntrospectionCache:
        neg = duration_seconds(self.negative_ttl)
        if neg > 60:
            raise ValueError(f"negative_ttl must be at most 60s (got {self.negative_ttl!r})")
        if neg > duration_seconds(self.max_ttl):
            raise ValueError(f"negative_ttl {self.negative_ttl} is above max_ttl {self.max_ttl}")
        return self


class IntrospectionProvider(Model):
    """An OAuth 2.0 authorization server whose opaque bearer tokens the guard introspects
    (RFC 7662) for the routes that name it (``introspection: NAME``)."""

    endpoint: IntrospectionEndpoint
    ca: Name | None = Field(
        None, description="a CA secret that verifies the https endpoint; needed for https"
    )
    client_id: str = Field(min_length=1, description="the guard's client id at the endpoint")
    client_secret_file: str = Field(
        min_length=1,
        description="file holding the client secret (one line; read by the guard, never "
        "printed); relative to the policy file's folder",
    )
    issuer: str | None = Field(
        None, min_length=1, description="an answer's iss, when present, must be exactly this"
    )
    audiences: list[str] | None = Field(
        None,
        min_length=1,
        description="an answer's aud, when present, must hold one of these (else 403)",
    )
    forward_claims: dict[str, HeaderName] = Field(
        default_factory=dict,
        description="claim of the answer (e.g. sub, scope) -> request header sent upstream "
        "with its value; client-sent copies are removed",
    )
    cache: IntrospectionCache | None = Field(
        None, description="how answers are kept; absent: every key's default"
    )
    timeout: Duration = Field("1s", description="the whole call to the endpoint")

    @property
    def cache_bounds(self) -> IntrospectionCache:
        return self.cache or IntrospectionCache.model_validate({})

    @model_validator(mode="after")
    def _tls(self) -> IntrospectionProvider:
        if self.endpoint.startswith("https://") and self.ca is None:
            raise ValueError(
                "endpoint is https: give ca, a CA secret that verifies the endpoint (for "
                "public CAs name the system bundle, e.g. secrets: {system-ca: {ca: "
                "/etc/ssl/certs/ca-certificates.crt}})"
            )
        if self.endpoint.startswith("http://") and self.ca is not None:
            raise ValueError("ca: endpoint is http://, there is no TLS to verify")
        if duration_seconds(self.timeout) > 60:
            raise ValueError(f"timeout must be at most 60s (got {self.timeout!r})")
        return self

    @field_validator("forward_claims")
    @classmethod
    def _distinct(cls, value: dict[str, str]) -> dict[str, str]:
        return JwtProvider._distinct(value)
