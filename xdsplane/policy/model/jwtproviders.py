"""The policy schema: JWT providers."""

from __future__ import annotations

import re
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
    _one_of,
    duration_seconds,
)

# -- JWT providers ---------------------------------------------------------------------------

_HEADER_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")
_RESERVED_HEADERS = {"authorization", "host", "content-length", "transfer-encoding"}


def _check_header_name(value: str) -> str:
    if not _HEADER_NAME.fullmatch(value):
        raise ValueError(f"not an HTTP header name: {value!r}")
    if value.lower() in _RESERVED_HEADERS or value.lower().startswith("x-envoy-"):
        raise ValueError(f"header {value!r} cannot carry a claim")
    return value


HeaderName = Annotated[
    str,
    Field(description="an HTTP header name, e.g. x-jwt-sub"),
    AfterValidator(_check_header_name),
]


def _check_jwks_uri(value: str) -> str:
    """An absolute http:// or https:// URL with a host, no user info and no fragment."""
    u = urlsplit(value)
    if u.scheme not in ("http", "https") or "://" not in value:
        raise ValueError(f"jwks_uri must start with http:// or https:// (got {value!r})")
    try:
        port = u.port
        host = u.hostname
    except ValueError as e:
        raise ValueError(f"not a URL: {value!r} ({e})") from None
    if not host or u.username is not None or u.fragment or port == 0:
        raise ValueError(f"jwks_uri needs a host, no user info, no #fragment (got {value!r})")
    if not any(c.isspace() for c in value) and _URI_HOST.fullmatch(host):
        return value
    raise ValueError(f"not a URL: {value!r}")


_URI_HOST = re.compile(r"[A-Za-z0-9.-]+|[0-9A-Fa-f:.]+")

JwksUri = Annotated[
    str,
    Field(
        description="http:// or https:// URL of a JWKS", examples=["https://idp.example.com/jwks"]
    ),
    AfterValidator(_check_jwks_uri),
]


class JwtProvider(Model):
    """An issuer of JSON Web Tokens whose bearer tokens routes can require."""

    issuer: str = Field(min_length=1, description="the token's iss must be exactly this")
    audiences: list[str] = Field(min_length=1, description="the token's aud must hold one of these")
    jwks_file: str | None = Field(
        None,
        min_length=1,
        description="JWKS file (JSON) with the issuer's public keys; watched. Or jwks_uri",
    )
    jwks_uri: JwksUri | None = Field(
        None, description="http(s) URL Envoy fetches the issuer's JWKS from. Or jwks_file"
    )
    jwks_cache: Duration | None = Field(
        None, description="how long Envoy keeps a fetched key set (jwks_uri only); absent: 5m"
    )
    jwks_timeout: Duration | None = Field(
        None, description="connect and fetch timeout of jwks_uri; absent: 5s"
    )
    ca: Name | None = Field(
        None, description="a CA secret that verifies the https JWKS server; needed for https"
    )
    max_lifetime: Duration | None = Field(
        None, description="refuse tokens whose exp - iat (or exp - now) is longer than this"
    )
    forward_claims: dict[str, HeaderName] = Field(
        default_factory=dict,
        description="claim -> request header sent upstream with the claim's value",
    )
    clock_skew: Duration = Field("60s", description="tolerance on exp and nbf; whole seconds")

    @model_validator(mode="after")
    def _key_source(self) -> JwtProvider:
        _one_of(self, ("jwks_file", "jwks_uri"))
        if self.jwks_uri is None:
            given = [k for k in ("jwks_cache", "jwks_timeout", "ca") if getattr(self, k)]
            if given:
                raise ValueError(f"{', '.join(given)}: only with jwks_uri (not jwks_file)")
        elif self.jwks_uri.startswith("https://"):
            if self.ca is None:
                raise ValueError(
                    "jwks_uri is https: give ca, a CA secret that verifies the server (Envoy "
                    "verifies nothing without one; for public CAs name the system bundle, e.g. "
                    "secrets: {system-ca: {ca: /etc/ssl/certs/ca-certificates.crt}})"
                )
        elif self.ca is not None:
            raise ValueError("ca: jwks_uri is http://, there is no TLS to verify")
        return self

    @field_validator("clock_skew")
    @classmethod
    def _whole(cls, value: str) -> str:
        if duration_seconds(value) != int(duration_seconds(value)):
            raise ValueError(f"clock_skew must be whole seconds (got {value!r})")
        return value

    @field_validator("forward_claims")
    @classmethod
    def _distinct(cls, value: dict[str, str]) -> dict[str, str]:
        headers = [h.lower() for h in value.values()]
        dup = sorted({h for h in headers if headers.count(h) > 1})
        if dup:
            raise ValueError(f"two claims are sent in header {dup[0]!r}")
        return value
