"""The policy schema: listeners, hosts and routes (TLS, matches, rewrites, access rules,
rate limits, JWT and introspection requirements).
"""

from __future__ import annotations

import ipaddress
import re
from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from xdsplane.policy import ciphers
from xdsplane.policy.model.common import (
    _TLS_ORDER,
    Duration,
    HttpMethod,
    ListenAddress,
    Model,
    Name,
    Regex,
    TlsVersion,
    _one_of,
    duration_seconds,
)

# -- listeners, hosts, routes ----------------------------------------------------------------


_DEFAULT_ALPN: list[Literal["h2", "http/1.1"]] = ["h2", "http/1.1"]


def _check_cipher_suite(value: str) -> str:
    ciphers.check_name(value)
    return value


CipherSuite = Annotated[
    str,
    Field(
        description="a BoringSSL cipher suite name (or its IANA name), or an equal-preference "
        "group [A|B]; TLS 1.2 and below only",
        examples=["ECDHE-ECDSA-AES128-GCM-SHA256"],
    ),
    AfterValidator(_check_cipher_suite),
]
ALLOW_LEGACY_TLS = (
    "allow min_version below 1.2 and cipher suites without forward secrecy or AEAD "
    "(a warning at load); for PCI, leave false"
)


class Tls(Model):
    """Downstream TLS settings of a listener."""

    min_version: TlsVersion = "1.2"
    max_version: TlsVersion = "1.3"
    cipher_suites: list[CipherSuite] | None = Field(
        None,
        description="BoringSSL cipher names for TLS 1.2 and below (TLS 1.3 suites are not "
        "configurable in Envoy); default: Envoy's",
    )
    alpn: list[Literal["h2", "http/1.1"]] = Field(default_factory=lambda: list(_DEFAULT_ALPN))
    allow_legacy_tls: bool = Field(False, description=ALLOW_LEGACY_TLS)

    @model_validator(mode="after")
    def _order(self) -> Tls:
        if _TLS_ORDER[self.min_version] > _TLS_ORDER[self.max_version]:
            raise ValueError(
                f"min_version {self.min_version} is above max_version {self.max_version}"
            )
        return self


class HeaderMatch(Model):
    name: str = Field(min_length=1)
    exact: str | None = None
    prefix: str | None = None
    regex: Regex | None = None
    present: bool | None = None
    invert: bool = False

    @model_validator(mode="after")
    def _one(self) -> HeaderMatch:
        _one_of(self, ("exact", "prefix", "regex", "present"))
        return self


class RegexRewrite(Model):
    pattern: Regex
    substitution: str


class Rewrite(Model):
    prefix: str | None = Field(None, description="replaces the matched prefix")
    regex: RegexRewrite | None = None
    host: str | None = Field(None, description="the Host header sent upstream")

    @model_validator(mode="after")
    def _one(self) -> Rewrite:
        _one_of(self, ("prefix", "regex"), required=False)
        return self


RetryOn = Literal[
    "5xx",
    "gateway-error",
    "reset",
    "connect-failure",
    "retriable-4xx",
    "refused-stream",
    "envoy-ratelimited",
    "http3-post-connect-failure",
]
_DEFAULT_RETRY_ON: list[RetryOn] = ["connect-failure", "refused-stream", "reset"]


class Retries(Model):
    attempts: int = Field(ge=1, le=10)
    on: list[RetryOn] = Field(default_factory=lambda: list(_DEFAULT_RETRY_ON))
    per_try_timeout: Duration | None = None


class DirectResponse(Model):
    status: int = Field(ge=200, le=599)
    body: str = ""


def _check_cidr(value: str) -> str:
    try:
        ipaddress.ip_network(value, strict=True)
    except ValueError:
        try:
            network = ipaddress.ip_network(value, strict=False)
        except ValueError:
            raise ValueError(
                f"not an IP address or CIDR range: {value!r} (e.g. 10.0.0.0/8, 192.0.2.7)"
            ) from None
        raise ValueError(
            f"{value!r} has bits set after the prefix length; did you mean {network}?"
        ) from None
    return value


Cidr = Annotated[
    str,
    Field(description="an IP address or CIDR range", examples=["10.0.0.0/8"]),
    AfterValidator(_check_cidr),
]


def _check_path_glob(value: str) -> str:
    if not value.startswith("/"):
        raise ValueError(f"a path must start with '/' (got {value!r})")
    return value


PathGlob = Annotated[
    str,
    Field(description="a path glob: '*' matches any run of characters, '/' included"),
    AfterValidator(_check_path_glob),
]
ClaimValue = str | bool | int


def _check_claim_values(value: Any) -> Any:
    """One clear message for a wrong claim value (instead of one per member of the union)."""
    values = value if isinstance(value, list) else [value]
    if isinstance(value, list) and not value:
        raise ValueError("a claim needs at least one value")
    for v in values:
        if not isinstance(v, str | bool | int):
            got = "null" if v is None else f"{v!r}" if isinstance(v, float) else "a mapping"
            got = "a list" if isinstance(v, list) else got
            raise ValueError(
                "a claim value is a string, a boolean or a whole number, or a list of them "
                f"(got {got})"
            )
    return value


def _check_claim_name(value: str) -> str:
    if not value:
        raise ValueError("a claim name cannot be empty")
    return value


ClaimValues = Annotated[ClaimValue | list[ClaimValue], BeforeValidator(_check_claim_values)]
ClaimName = Annotated[str, AfterValidator(_check_claim_name)]
ACCESS_RULE_KEYS = ("client_sans", "jwt_claims", "sources", "methods", "paths")


class AccessRule(Model):
    """A rule of a route's ``access``: every given key must match; a list matches when one
    of its entries does."""

    client_sans: list[str] | None = Field(
        None,
        min_length=1,
        description="the validated client certificate has a SAN matching one of these globs",
    )
    jwt_claims: dict[ClaimName, ClaimValues] | None = Field(
        None,
        min_length=1,
        description="claim -> value(s): each claim of the verified token equals one of the "
        "values, or is a list holding one of them",
    )
    sources: list[Cidr] | None = Field(
        None, min_length=1, description="the connection's peer address is in one of these"
    )
    methods: list[HttpMethod] | None = Field(None, min_length=1)
    paths: list[PathGlob] | None = Field(
        None, min_length=1, description="the path (without query) matches one of these globs"
    )

    @model_validator(mode="after")
    def _not_empty(self) -> AccessRule:
        if all(getattr(self, key) is None for key in ACCESS_RULE_KEYS):
            raise ValueError(
                "an empty rule would match every request: give at least one of "
                + ", ".join(ACCESS_RULE_KEYS)
            )
        return self


class Access(Model):
    """Who may use a route: deny rules refuse, and with ``default: deny`` only requests an
    allow rule matches pass. ``shadow: true`` only logs what would be refused."""

    default: Literal["allow", "deny"] = Field(
        "allow", description="deny: only requests matching an allow rule pass"
    )
    shadow: bool = Field(
        False, description="evaluate and log the decision (access log), never refuse"
    )
    allow: list[AccessRule] = Field(
        default_factory=list, description="with default: deny, the requests that pass"
    )
    deny: list[AccessRule] = Field(
        default_factory=list, description="requests refused (403), even if an allow rule matches"
    )

    @model_validator(mode="after")
    def _meaningful(self) -> Access:
        if self.default == "allow" and self.allow:
            raise ValueError(
                "allow rules need default: deny (with default: allow, every request that no "
                "deny rule matches passes anyway)"
            )
        if self.default == "allow" and not self.deny:
            raise ValueError(
                "this access lets every request through: add deny rules, or default: deny "
                "with allow rules"
            )
        return self


RateLimitBy = Literal["client_certificate", "jwt_sub", "source_address"]


class RateLimit(Model):
    """A token bucket per client identity, kept by each Envoy (``rate_limit:``)."""

    requests: int = Field(ge=1, le=1_000_000_000, description="requests allowed per `per`")
    per: Duration = Field(description="the period the budget refills over, e.g. 1s, 1m, 1h")
    by: RateLimitBy = Field(
        "source_address",
        description="whose budget: client_certificate (its URI SAN, else DNS SAN), jwt_sub "
        "(the verified token's sub) or source_address (the client IP)",
    )

    @field_validator("per")
    @classmethod
    def _at_least(cls, value: str) -> str:
        if duration_seconds(value) < 0.05:
            raise ValueError(f"per must be at least 50ms (got {value!r})")
        return value


_GLOBAL_UNITS = {1.0: "second", 60.0: "minute", 3600.0: "hour"}


class GlobalRateLimit(RateLimit):
    """A fixed-window counter per client identity shared by every Envoy through the guard."""

    @field_validator("per")
    @classmethod
    def _unit(cls, value: str) -> str:
        if duration_seconds(value) not in _GLOBAL_UNITS:
            raise ValueError(
                f"per must be 1s, 1m or 1h for a global_rate_limit (the guard counts in "
                f"windows of a second, a minute or an hour; got {value!r})"
            )
        return value

    @property
    def unit(self) -> str:
        """The guard's window: second, minute or hour."""
        return _GLOBAL_UNITS[duration_seconds(self.per)]


def _check_scope(value: str) -> str:
    # RFC 6749 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E )
    if not value or any(c in '"\\' or not 0x21 <= ord(c) <= 0x7E for c in value):
        raise ValueError(f"not a scope token: {value!r} (printable ASCII, no space, '\"' or '\\')")
    return value


Scope = Annotated[
    str,
    Field(description="an OAuth scope token, e.g. billing:read"),
    AfterValidator(_check_scope),
]

_REQUIREMENTS = {
    "jwt",
    "jwt_optional",
    "introspection",
    "require_scopes",
    "replay_protection",
    "revocation_check",
    "require_client_certificate",
    "allow_client_sans",
    "access",
    "rate_limit",
    "global_rate_limit",
}
# Envoy's own rule for path_separated_prefix.
PATH_PREFIX_PATTERN = re.compile(r"[^?#]+[^?#/]")


class Route(Model):
    """One route of a host: a match (one of prefix, path_prefix, path, regex) and where it
    goes."""

    name: Name | None = Field(None, description="default: route-N, N its position from 0")
    prefix: str | None = Field(
        None,
        description="path prefix, e.g. /billing/; on a protected route that asks at least "
        "what every later route asks, a prefix ending in '/' also covers the path without "
        "it (/billing/admin/ covers /billing/admin)",
    )
    path_prefix: str | None = Field(
        None,
        description="segment-aware prefix: /billing/admin matches /billing/admin and "
        "/billing/admin/..., not /billing/administrator (no trailing '/')",
    )
    path: str | None = Field(None, description="exact path")
    regex: Regex | None = Field(None, description="RE2 regex over the whole path")
    case_sensitive: bool | None = Field(
        None,
        description="match the path case-sensitively; absent: false on a protected route "
        "that asks at least what every later route of its host asks, true on the others",
    )
    headers: list[HeaderMatch] = Field(default_factory=list)
    methods: list[HttpMethod] = Field(default_factory=list)
    upstream: Name | None = Field(None, description="an upstream's name")
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout: Duration | None = Field(None, description="whole-request timeout; default 15s")
    retries: Retries | None = None
    require_client_certificate: bool = Field(
        False,
        description="only requests on a connection with a validated client certificate "
        "pass (others get 403); checked per request, so the host can stay optional",
    )
    allow_client_sans: list[str] = Field(
        default_factory=list,
        description="a client certificate presented must carry a SAN matching one of these "
        "globs ('*' matches any run of characters), else 403; a request without one is not "
        "refused by this list: add require_client_certificate: true for that",
    )
    jwt: Name | None = Field(
        None,
        description="a jwt_providers name: requests need a valid bearer token from it "
        "(none or a bad one: 401; a wrong audience: 403)",
    )
    jwt_optional: Name | None = Field(
        None,
        description="a jwt_providers name: a request without a token passes, one with a "
        "token must carry a valid one from this provider",
    )
    introspection: Name | None = Field(
        None,
        description="an introspection_providers name: requests need a bearer token that "
        "provider's endpoint says is active (asked by the guard, RFC 7662; none, inactive or "
        "expired: 401); needs a top-level guard",
    )
    require_scopes: list[Scope] | None = Field(
        None,
        min_length=1,
        description="with introspection: the token's scope must hold every one of these "
        "(else 403, x-guard-reason: insufficient_scope)",
    )
    replay_protection: bool = Field(
        False,
        description="each token (its jti) is accepted once, as checked by the guard; needs "
        "jwt: and a top-level guard",
    )
    revocation_check: bool = Field(
        False,
        description="the guard refuses a revoked token (jti), subject (sub) or client "
        "certificate (xdsplane revoke); needs a top-level guard; replay_protection implies it",
    )
    access: Access | None = Field(
        None,
        description="allow or deny requests by client certificate, JWT claims, source "
        "address, method and path; absent: no rules beyond the keys above",
    )

    rate_limit: RateLimit | None = Field(
        None, description="a budget per client identity, counted by each Envoy on its own"
    )
    global_rate_limit: GlobalRateLimit | None = Field(
        None,
        description="a budget per client identity shared by every Envoy through the guard; "
        "needs a top-level guard",
    )

    @model_validator(mode="after")
    def _shape(self) -> Route:
        _one_of(self, ("prefix", "path_prefix", "path", "regex"))
        _one_of(self, ("upstream", "direct_response"))
        _one_of(self, ("jwt", "jwt_optional", "introspection"), required=False)
        if self.require_scopes is not None and self.introspection is None:
            raise ValueError(
                "require_scopes needs introspection: (the scopes come from the token's "
                "introspection answer)"
            )
        for field in ("prefix", "path_prefix", "path"):
            value = getattr(self, field)
            if value is not None and not value.startswith("/"):
                raise ValueError(f"{field} must start with '/'")
        if self.path_prefix is not None and not PATH_PREFIX_PATTERN.fullmatch(self.path_prefix):
            raise ValueError(
                f"path_prefix {self.path_prefix!r}: no trailing '/', no '?' or '#', and not "
                "'/' alone (for every path use prefix: /)"
            )
        if self.direct_response is not None and (self.rewrite or self.retries or self.timeout):
            raise ValueError("rewrite, retries and timeout apply to upstream routes only")
        return self

    @property
    def protected(self) -> bool:
        """Does the route ask something of the client?"""
        return bool(
            self.jwt
            or self.jwt_optional
            or self.introspection
            or self.replay_protection
            or self.revocation_check
            or self.require_client_certificate
            or self.allow_client_sans
            or self.access
            or self.rate_limit
            or self.global_rate_limit
        )

    @property
    def requirements_key(self) -> str:
        """What the route asks of the client, as text: equal keys, equal requirements."""
        return self.model_dump_json(include=_REQUIREMENTS)

    def asks_at_least(self, other: Route) -> bool:
        """Does this route ask everything ``other`` asks (so that sending it a request that
        would otherwise reach ``other`` never lets through less)?"""
        if other.jwt is not None and self.jwt != other.jwt:
            return False
        if other.jwt_optional is not None and other.jwt_optional not in (
            self.jwt,
            self.jwt_optional,
        ):
            return False
        if other.introspection is not None and self.introspection != other.introspection:
            return False
        if other.require_scopes and not set(other.require_scopes) <= set(self.require_scopes or ()):
            return False
        if other.replay_protection and not self.replay_protection:
            return False
        if other.revocation_check and not (self.revocation_check or self.replay_protection):
            return False
        if other.require_client_certificate and not self.require_client_certificate:
            return False
        if other.allow_client_sans and not (
            self.allow_client_sans and set(self.allow_client_sans) <= set(other.allow_client_sans)
        ):
            return False
        return all(
            getattr(other, key) is None or getattr(self, key) == getattr(other, key)
            for key in ("access", "rate_limit", "global_rate_limit")
        )

    @property
    def match_value(self) -> str:
        """The route's prefix, path_prefix, path or regex, whichever it has."""
        return self.prefix or self.path_prefix or self.path or self.regex or ""


ClientCertificate = Literal["required", "optional", "off"]
PathParameters = Literal["reject", "allow"]
OcspPolicy = Literal["lenient", "strict", "must_staple"]
_DOMAIN = re.compile(r"(\*\.)?[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\*")


def _check_domain(value: str) -> str:
    if not _DOMAIN.fullmatch(value):
        raise ValueError(f"not a domain: {value!r} (a name, *.name, or *)")
    return value


Domain = Annotated[
    str,
    Field(description="a host name, *.name (any name ending in .name), or * (any host)"),
    AfterValidator(_check_domain),
]


class Host(Model):
    """A group of domains with its own TLS context, filter chain and route configuration."""

    name: Name
    domains: list[Domain] = Field(min_length=1)
    certificate: Name | None = Field(None, description="secret with the server certificate")
    client_certificate: ClientCertificate = "off"
    client_ca: Name | None = Field(None, description="secret with the CA for client certificates")
    ocsp: OcspPolicy | None = Field(
        None,
        description="OCSP stapling (Envoy's ocsp_staple_policy): lenient (staple when "
        "there is a response; an expired one is skipped), strict (an expired staple fails "
        "the handshake), must_staple (the certificate secret must have ocsp_staple); "
        "default: Envoy's (lenient)",
    )
    path_parameters: PathParameters = Field(
        "reject",
        description="paths with ';' (or %3B), which many servers read as segment parameters "
        "(/admin;x=1/users as /admin/users): reject (400, before any route) or allow (matched "
        "as written; only for upstreams that give ';' no meaning)",
    )
    routes: list[Route] = Field(min_length=1)

    def widens(self, index: int) -> bool:
        """May route ``index`` match more widely than written (any case, and a prefix
        ending in '/' its bare path too)? Only when it asks something and at least what
        every later route asks: the spellings it takes over would otherwise reach one of
        those, so taking them never lets a request through with fewer checks."""
        return self._widening[index]

    @cached_property
    def _widening(self) -> list[bool]:
        """``widens`` for every route, in one pass from the last: later routes that ask the
        same are compared once (a host of 2,000 routes stays linear)."""
        out: list[bool] = []
        later: dict[str, Route] = {}  # one later route per distinct set of requirements
        for r in reversed(self.routes):
            out.append(r.protected and all(r.asks_at_least(o) for o in later.values()))
            later.setdefault(r.requirements_key, r)
        return out[::-1]

    def case_sensitive(self, index: int) -> bool:
        r = self.routes[index]
        return not self.widens(index) if r.case_sensitive is None else r.case_sensitive

    @model_validator(mode="after")
    def _path_parameters(self) -> Host:
        if self.path_parameters == "reject":
            for i, r in enumerate(self.routes):
                if r.regex is None and ";" in r.match_value:
                    raise ValueError(
                        f"route {r.name or i} matches {r.match_value!r}, which has ';': with "
                        "path_parameters: reject such paths get 400 before any route; set "
                        "path_parameters: allow on the host"
                    )
        return self

    @model_validator(mode="after")
    def _client(self) -> Host:
        if self.client_certificate != "off" and self.client_ca is None:
            raise ValueError(f"client_certificate: {self.client_certificate} needs client_ca")
        if self.client_certificate == "off" and self.client_ca is not None:
            raise ValueError("client_ca is set but client_certificate is off")
        return self


class Listener(Model):
    """An address Envoy listens on. With `tls`, hosts are chosen by SNI."""

    name: Name
    address: ListenAddress
    tls: Tls | None = Field(None, description="present: HTTPS; every host needs a certificate")
    redirect_to_https: bool = Field(False, description="answer every request with a redirect")
    https_port: int = Field(443, ge=1, le=65535, description="port in the redirect location")
    hosts: list[Host] = Field(default_factory=list)

    @model_validator(mode="after")
    def _shape(self) -> Listener:
        if self.redirect_to_https:
            if self.hosts:
                raise ValueError("a redirect_to_https listener has no hosts")
            if self.tls is not None:
                raise ValueError("a redirect_to_https listener is plain HTTP: remove tls")
        elif not self.hosts:
            raise ValueError("a listener needs hosts (or redirect_to_https: true)")
        elif "https_port" in self.model_fields_set:
            raise ValueError("https_port applies only with redirect_to_https: true")
        return self
