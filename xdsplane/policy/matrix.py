"""The access matrix: who may reach what, one row per listener, host and route.

Computed from the merged, checked policy the translator turns into Envoy resources, with
the translator's own functions wherever they decide something (which RBAC policies a route
gets and whether they are enforced or shadow, the jwt_authn requirement, whether the guard
is asked, how a path is matched), so the matrix says what Envoy is given, not what a key
was meant to do. tests/test_routes_matrix.py checks every claim against the translated
resources. ``xdsplane routes`` prints it, the status page and /status show it per node group,
``xdsplane report`` puts it in the evidence page and ``diff --fail-on-weaken`` compares two.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from xdsplane.policy.merge import GroupPolicy
from xdsplane.policy.model import AccessRule, Guard, Host, JwtProvider, Listener, Route, Upstream
from xdsplane.policy.translate import authz, guard, jwt, routes
from xdsplane.redact import scrub

CERTIFICATE_ONLY = "certificate-only"
TOKEN = "token"
CERTIFICATE_AND_TOKEN = "certificate+token"
OPEN = "open"
REDIRECT = "redirect"


@dataclass(frozen=True, slots=True)
class Limit:
    requests: int
    per: str
    by: str


@dataclass(frozen=True, slots=True)
class Jwt:
    provider: str
    required: bool  # False: jwt_optional (a request without a token passes)
    issuer: str
    audiences: tuple[str, ...]
    max_lifetime: str | None


@dataclass(frozen=True, slots=True)
class Rbac:
    """The route's RBACPerRoute as the translator builds it: the DENY policies Envoy
    enforces and those it only evaluates and logs (shadow_rules)."""

    enforced: tuple[str, ...]
    shadow: tuple[str, ...]
    default: str | None  # access.default, None without access
    allow: tuple[str, ...]  # allow rules, as text
    deny: tuple[str, ...]  # deny rules, as text


@dataclass(frozen=True, slots=True)
class UpstreamTlsInfo:
    mtls: bool  # Envoy presents a client certificate
    sni: str | None
    subject_alt_names: tuple[str, ...]
    min_version: str
    max_version: str
    allow_legacy_tls: bool


@dataclass(frozen=True, slots=True)
class Match:
    kind: str  # prefix, path_prefix (segment-aware), path, regex
    value: str
    case_sensitive: bool
    methods: tuple[str, ...]
    headers: tuple[str, ...]  # header names a request must (not) carry


@dataclass(frozen=True, slots=True)
class RouteAccess:
    """One row of the matrix."""

    listener: str
    address: str
    tls: str | None  # "1.2-1.3"; None: plain HTTP
    allow_legacy_tls: bool
    host: str
    domains: tuple[str, ...]
    client_certificate: str  # the host's handshake: required, optional, off
    path_parameters: str
    route: str
    order: int
    match: Match | None  # None: the redirect listener's catch-all
    who: str  # certificate-only, token, certificate+token, open, redirect
    require_client_certificate: bool  # the route asks for a validated certificate itself
    client_sans: tuple[str, ...]  # a presented certificate's SAN must match one; (): any
    jwt: Jwt | None
    introspection: str | None  # the introspection provider the guard asks (opaque tokens)
    require_scopes: tuple[str, ...]
    replay_protection: bool
    revocation_check: bool  # the guard checks revocation (replay protection implies it)
    guard_fail_open: bool | None  # None: the route never asks the guard
    rate_limit: Limit | None
    global_rate_limit: Limit | None
    rbac: Rbac | None
    upstream: str | None
    endpoints: tuple[str, ...]
    upstream_tls: UpstreamTlsInfo | None
    direct_response: int | None
    redirect: str | None

    @property
    def certificate_required(self) -> bool:
        """A request reaches this route only with a validated client certificate."""
        return self.client_certificate == "required" or self.require_client_certificate

    def as_json(self) -> dict[str, Any]:
        """The row as /status, ``routes --format json`` and every renderer read it."""
        out = asdict(self)
        out["certificate_required"] = self.certificate_required
        lists: dict[str, Any] = _lists(out)
        return lists


def _lists(value: Any) -> Any:
    """JSON types, and no key material: a key or token pasted into a SAN glob, an issuer
    or a rule is shown as its fingerprint (``redact.scrub``), as in error messages."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_lists(v) for v in value]
    if isinstance(value, str):
        return scrub(value)
    return value


def rule_text(rule: AccessRule) -> str:
    """``client_sans=spiffe://x/*; methods=GET,POST``: every key that must match."""
    parts = []
    for key, value in rule.model_dump(exclude_none=True).items():
        if isinstance(value, dict):
            text = ",".join(f"{k}={v}" for k, v in sorted(value.items()))
        elif isinstance(value, list):
            text = ",".join(map(str, value))
        else:
            text = str(value)
        parts.append(f"{key}={text}")
    return "; ".join(parts)


def _rbac(route: Route) -> Rbac | None:
    config = authz.per_route(route)
    if config is None:
        return None
    a = route.access
    return Rbac(
        enforced=tuple(sorted(config.rbac.rules.policies)) if config.rbac.HasField("rules") else (),
        shadow=tuple(sorted(config.rbac.shadow_rules.policies))
        if config.rbac.HasField("shadow_rules")
        else (),
        default=a.default if a is not None else None,
        allow=tuple(rule_text(r) for r in a.allow) if a is not None else (),
        deny=tuple(rule_text(r) for r in a.deny) if a is not None else (),
    )


def _jwt(route: Route, providers: dict[str, JwtProvider]) -> Jwt | None:
    name = jwt.route_provider(route)
    if name is None:
        return None
    spec = providers[name]
    required = jwt.requirement_name(route) == name
    return Jwt(name, required, spec.issuer, tuple(spec.audiences), spec.max_lifetime)


def _limit(limit: Any) -> Limit | None:
    return None if limit is None else Limit(limit.requests, limit.per, limit.by)


def _upstream_tls(up: Upstream | None) -> UpstreamTlsInfo | None:
    if up is None or up.tls is None:
        return None
    t = up.tls
    return UpstreamTlsInfo(
        t.certificate is not None,
        t.sni,
        tuple(t.subject_alt_names),
        t.min_version,
        t.max_version,
        t.allow_legacy_tls,
    )


def _who(cert: bool, token: bool) -> str:
    if cert and token:
        return CERTIFICATE_AND_TOKEN
    return CERTIFICATE_ONLY if cert else TOKEN if token else OPEN


def _match(host: Host, index: int) -> Match:
    """The path match the translator gives Envoy (routes.path_match)."""
    r = host.routes[index]
    m = routes.path_match(host, index)
    kind = m.WhichOneof("path_specifier")
    value = m.safe_regex.regex if kind == "safe_regex" else getattr(m, kind)
    sensitive = m.case_sensitive.value if m.HasField("case_sensitive") else True
    if kind == "safe_regex":
        kind, value, sensitive = "regex", r.regex or "", host.case_sensitive(index)
    elif kind == "path_separated_prefix":
        kind = "path_prefix"
    return Match(
        kind,
        value,
        sensitive,
        tuple(sorted(set(r.methods))),
        tuple(h.name for h in r.headers),
    )


def _route_row(
    lst: Listener, host: Host, index: int, policy: GroupPolicy, guard_spec: Guard | None
) -> RouteAccess:
    r = host.routes[index]
    providers = {n: p.value for n, p in policy.jwt_providers.items()}
    up_part = policy.upstreams.get(r.upstream or "")
    up = up_part.value if up_part is not None else None
    token = (r.jwt is not None and jwt.requirement_name(r) == r.jwt) or r.introspection is not None
    ext_authz = guard.per_route(r)  # None: the HCM's ext_authz applies; disabled: never asked
    asks_guard = ext_authz is None or not ext_authz.disabled
    # allow_client_sans alone checks presented certificates only (docs/policy.md)
    cert = host.client_certificate == "required" or r.require_client_certificate
    return RouteAccess(
        listener=lst.name,
        address=lst.address,
        tls=f"{lst.tls.min_version}-{lst.tls.max_version}" if lst.tls is not None else None,
        allow_legacy_tls=lst.tls.allow_legacy_tls if lst.tls is not None else False,
        host=host.name,
        domains=tuple(host.domains),
        client_certificate=host.client_certificate,
        path_parameters=host.path_parameters,
        route=r.name or f"route-{index}",
        order=index,
        match=_match(host, index),
        who=_who(cert, token),
        require_client_certificate=r.require_client_certificate,
        client_sans=tuple(r.allow_client_sans),
        jwt=_jwt(r, providers),
        introspection=r.introspection,
        require_scopes=tuple(r.require_scopes or ()),
        replay_protection=r.replay_protection,
        revocation_check=r.revocation_check or r.replay_protection,
        guard_fail_open=(
            guard_spec.fail_open
            if guard_spec is not None and (asks_guard or r.global_rate_limit is not None)
            else None
        ),
        rate_limit=_limit(r.rate_limit),
        global_rate_limit=_limit(r.global_rate_limit),
        rbac=_rbac(r),
        upstream=r.upstream,
        endpoints=tuple(up.all_endpoints()) if up is not None else (),
        upstream_tls=_upstream_tls(up),
        direct_response=r.direct_response.status if r.direct_response is not None else None,
        redirect=None,
    )


def _redirect_row(lst: Listener) -> RouteAccess:
    return RouteAccess(
        listener=lst.name,
        address=lst.address,
        tls=None,
        allow_legacy_tls=False,
        host="*",
        domains=("*",),
        client_certificate="off",
        path_parameters="allow",
        route="redirect-to-https",
        order=0,
        match=None,
        who=REDIRECT,
        require_client_certificate=False,
        client_sans=(),
        jwt=None,
        introspection=None,
        require_scopes=(),
        replay_protection=False,
        revocation_check=False,
        guard_fail_open=None,
        rate_limit=None,
        global_rate_limit=None,
        rbac=None,
        upstream=None,
        endpoints=(),
        upstream_tls=None,
        direct_response=None,
        redirect=f"https, port {lst.https_port}",
    )


def access_matrix(policy: GroupPolicy) -> tuple[RouteAccess, ...]:
    """Every route of every host of every listener, in the order Envoy matches them."""
    guard_spec = policy.guard.value if policy.guard is not None else None
    out: list[RouteAccess] = []
    for part in sorted(policy.listeners.values(), key=lambda p: p.value.name):
        lst = part.value
        if lst.redirect_to_https:
            out.append(_redirect_row(lst))
            continue
        for host in lst.hosts:
            out.extend(
                _route_row(lst, host, i, policy, guard_spec) for i in range(len(host.routes))
            )
    return tuple(out)
