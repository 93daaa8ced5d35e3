"""The policy schema. Names and defaults here are the stable, documented surface.

Every model forbids unknown keys and is strict about types (a port is a number, not a
string), so a typo is an error with its line, never a silently ignored setting.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from functools import cached_property
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from xdsplane.policy import ciphers

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?)(ms|s|m|h)$"
_DURATION = re.compile(DURATION_PATTERN)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

Name = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="lower-case letters, digits, '.', '_' and '-'; at most 64 characters",
    ),
]


def duration_seconds(value: str) -> float:
    """'1.5s' -> 1.5; '250ms' -> 0.25; '5m' -> 300.0."""
    m = _DURATION.match(value)
    if m is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 5s, 1m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(3)]


def _check_duration(value: str) -> str:
    seconds = duration_seconds(value)
    if seconds <= 0:
        raise ValueError(f"a duration must be more than 0 (got {value!r})")
    if seconds > 315_576_000_000:
        raise ValueError(f"a duration must be at most 10,000 years (got {value!r})")
    return value


Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, description="a duration: 250ms, 5s, 1m, 1h", examples=["5s"]),
    AfterValidator(_check_duration),
]


def is_duration_field(model: type[BaseModel], name: str) -> bool:
    """Is ``model.name`` a Duration (maybe optional)? For error messages."""
    field = model.model_fields.get(name)
    if field is None:
        return False
    found = [*field.metadata]
    todo = [field.annotation]
    while todo:
        t = todo.pop()
        found.extend(getattr(t, "__metadata__", ()))
        todo.extend(get_args(t))
    return any(isinstance(m, AfterValidator) and m.func is _check_duration for m in found)


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if len(port) > 5:
        raise ValueError(f"port out of range 1-65535 in {value!r}")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} out of range 1-65535 in {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
            raise ValueError(f"not an IP address or host name: {host!r}") from None
    return host, number


def _check_address(value: str) -> str:
    split_host_port(value)
    return value


def _check_ip_address(value: str) -> str:
    host, _ = split_host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"a listener binds an IP address, not {host!r}") from None
    return value


Address = Annotated[
    str,
    Field(description="HOST:PORT (IPv6 as [::1]:PORT)", examples=["10.0.0.12:9443"]),
    AfterValidator(_check_address),
]
ListenAddress = Annotated[
    str,
    Field(description="IP:PORT to listen on", examples=["0.0.0.0:8443"]),
    AfterValidator(_check_ip_address),
]
# What Python's re accepts and RE2 does not: lookarounds, backreferences, atomic groups.
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|\(\?P=|\(\?>|(?<!\\)(?:\\\\)*\\[1-9]")
# What RE2 accepts and Python's re does not: Unicode classes, \z, \Q...\E, \C.
_RE2_ONLY = re.compile(r"\\[pPzQEC]")


def _check_regex(value: str) -> str:
    """Envoy's regexes are RE2: catch what RE2 would reject before Envoy does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            re.compile(value)
    except re.error as e:
        if not _RE2_ONLY.search(value):  # else let Envoy judge
            raise ValueError(f"not a valid regex: {value!r} ({e})") from None
    bad = _RE2_UNSUPPORTED.search(value)
    if bad is not None:
        raise ValueError(
            f"not an RE2 regex: {value!r} (lookarounds, backreferences and atomic groups "
            f"such as {bad.group(0)!r} are not supported)"
        )
    return value


Regex = Annotated[
    str,
    Field(description="an RE2 regular expression (no lookarounds, no backreferences)"),
    AfterValidator(_check_regex),
]
TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"]
_TLS_ORDER = {"1.0": 0, "1.1": 1, "1.2": 2, "1.3": 3}


def _check_versions(low: TlsVersion, high: TlsVersion) -> None:
    if _TLS_ORDER[low] > _TLS_ORDER[high]:
        raise ValueError(f"min_version {low} is above max_version {high}")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _one_of(obj: BaseModel, fields: tuple[str, ...], required: bool = True) -> None:
    given = [f for f in fields if getattr(obj, f) is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(fields)} (got {', '.join(given)})")
    if required and not given:
        raise ValueError(f"give one of {', '.join(fields)}")


# -- secrets ---------------------------------------------------------------------------------


class Secret(Model):
    """Files served over SDS. Paths are relative to the policy file's folder.

    Either a certificate with its private key, or a CA bundle (optionally with a CRL).
    """

    certificate: str | None = Field(None, description="PEM certificate chain file")
    private_key: str | None = Field(None, description="PEM private key file")
    ca: str | None = Field(None, description="PEM CA bundle file, to verify peers")
    crl: str | None = Field(None, description="PEM certificate revocation list for `ca`")
    ocsp_staple: str | None = Field(
        None,
        description="DER OCSP response for `certificate`, stapled in TLS handshakes; checked "
        "at load: for this certificate, signed by its issuer, status good, current",
    )
    ocsp_issuer: str | None = Field(
        None,
        description="PEM certificate of the issuer that signs `ocsp_staple` "
        "(default: the second certificate of the `certificate` chain)",
    )

    @model_validator(mode="after")
    def _kind(self) -> Secret:
        cert = self.certificate is not None or self.private_key is not None
        ca = self.ca is not None or self.crl is not None
        if cert and ca:
            raise ValueError("a secret is either certificate+private_key or ca (+crl), not both")
        if cert and (self.certificate is None or self.private_key is None):
            raise ValueError("certificate and private_key go together")
        if self.crl is not None and self.ca is None:
            raise ValueError("crl needs ca")
        if (self.ocsp_staple is not None or self.ocsp_issuer is not None) and not cert:
            raise ValueError("ocsp_staple goes with certificate and private_key")
        if self.ocsp_issuer is not None and self.ocsp_staple is None:
            raise ValueError("ocsp_issuer needs ocsp_staple")
        if not cert and not ca:
            raise ValueError("give certificate and private_key, or ca")
        return self

    @property
    def is_certificate(self) -> bool:
        return self.certificate is not None


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
