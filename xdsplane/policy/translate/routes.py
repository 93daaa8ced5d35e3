"""Hosts and routes -> RouteConfiguration (served over RDS, never inline in a listener)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from google.protobuf import wrappers_pb2

from xdsplane.policy.model import (
    PATH_PREFIX_PATTERN,
    DirectResponse,
    Guard,
    HeaderMatch,
    Host,
    Listener,
    Route,
)
from xdsplane.policy.translate import authz, guard, jwt, ratelimit
from xdsplane.policy.translate.common import duration, pack, u32

MISDIRECTED = "misdirected"
PATH_PARAMETERS_ROUTE = "(path-parameters)"
"""The name (after ``HOST/``) of the route that refuses paths with ';': the parentheses keep
it apart from every policy route name."""
PATH_PARAMETERS_REGEX = ".*(;|%3[Bb]).*"


def route_config_name(listener: Listener, host: Host | None = None) -> str:
    """TLS listeners have one route configuration per host (its filter chain's own)."""
    if listener.tls is not None and host is not None:
        return f"{listener.name}/{host.name}"
    return listener.name


def _regex(pattern: str) -> Any:
    return regex_pb2.RegexMatcher(regex=pattern)


def header_matcher(h: HeaderMatch) -> Any:
    m = rc.HeaderMatcher(name=h.name, invert_match=h.invert)
    if h.present is not None:
        m.present_match = h.present
    elif h.exact is not None:
        m.string_match.CopyFrom(string_pb2.StringMatcher(exact=h.exact))
    elif h.prefix is not None:
        m.string_match.CopyFrom(string_pb2.StringMatcher(prefix=h.prefix))
    elif h.regex is not None:
        m.string_match.CopyFrom(string_pb2.StringMatcher(safe_regex=_regex(h.regex)))
    return m


def path_match(host: Host, index: int) -> Any:
    """The RouteMatch of route ``index`` of ``host`` on the path, which the HCM has
    normalized first (RFC 3986 dot segments, %XX of unreserved characters decoded, slashes
    merged, %2F and %5C redirected as '/').

    A route that may match widely (``Host.widens``) matches any case, and its ``prefix``
    ending in '/' becomes Envoy's segment-aware ``path_separated_prefix`` so that it covers
    the bare path too (``/admin/`` covers ``/admin``), unless a ``rewrite.prefix`` depends
    on the exact prefix matched."""
    r = host.routes[index]
    sensitive = host.case_sensitive(index)
    match = rc.RouteMatch()
    if r.path_prefix is not None:
        match.path_separated_prefix = r.path_prefix
    elif r.prefix is not None:
        bare = r.prefix.rstrip("/")
        if (
            host.widens(index)
            and bare != r.prefix
            and PATH_PREFIX_PATTERN.fullmatch(bare)
            and not (r.rewrite and r.rewrite.prefix is not None)
        ):
            match.path_separated_prefix = bare
        else:
            match.prefix = r.prefix
    elif r.path is not None:
        match.path = r.path
    elif r.regex is not None:
        # Envoy ignores case_sensitive for safe_regex: RE2's own flag does it.
        match.safe_regex.CopyFrom(_regex(r.regex if sensitive else f"(?i){r.regex}"))
    if not sensitive and r.regex is None:
        match.case_sensitive.CopyFrom(wrappers_pb2.BoolValue(value=False))
    return match


def _path_parameters_refused(host: Host, jwt_filter: bool, ext_authz: bool, listener: str) -> Any:
    """First route of a host with ``path_parameters: reject``: 400 for a path (the query
    excluded) with ';' or %3B, which servers such as Tomcat and Spring read as a segment
    parameter (``/admin;x=1/users`` is their ``/admin/users``) while Envoy matches it as
    written. Built like a policy route with nothing to check, so no filter acts on it (no
    token spent at the guard, no rate limit)."""
    spec = Route.model_validate(
        {
            "regex": PATH_PARAMETERS_REGEX,
            "direct_response": DirectResponse.model_validate(
                {"status": 400, "body": "path parameters (';' in the path) are not accepted\n"}
            ),
        }
    )
    out = route(host, spec, -1, jwt_filter, ext_authz, listener)
    out.name = f"{host.name}/{PATH_PARAMETERS_ROUTE}"
    out.stat_prefix = out.name.replace(".", "_")
    out.match.safe_regex.CopyFrom(_regex(PATH_PARAMETERS_REGEX))
    return out


def route(
    host: Host,
    r: Route,
    index: int,
    jwt_filter: bool = False,
    ext_authz: bool = False,
    listener: str = "",
    guard_spec: Guard | None = None,
) -> Any:
    """``jwt_filter``: the route's HCM has jwt_authn, so the route says what it requires;
    ``ext_authz``: the HCM has ext_authz, so the route says whether it asks the guard
    (``guard_spec``: the policy's guard, whose transport says how);
    ``listener``: the listener's name, part of a global rate limit's route id;
    ``index``: the route's position in ``host.routes`` (-1: not one of them, no path match
    is set)."""
    match = path_match(host, index) if index >= 0 else rc.RouteMatch()
    match.headers.extend(header_matcher(h) for h in r.headers)
    if r.methods:
        methods = "|".join(sorted(set(r.methods)))
        match.headers.append(
            rc.HeaderMatcher(
                name=":method",
                string_match=string_pb2.StringMatcher(safe_regex=_regex(f"^({methods})$")),
            )
        )
    out = rc.Route(name=f"{host.name}/{r.name or f'route-{index}'}", match=match)
    # Per-route stats (vhost.<host>.route.<host>/<route>.upstream_rq_<xx>...): the 4xx/5xx
    # alerts of docs/observability.md. One token: a dot would split Prometheus' label.
    out.stat_prefix = out.name.replace(".", "_")
    rbac = authz.per_route(r)
    if rbac is not None:
        out.typed_per_filter_config[authz.RBAC_FILTER].CopyFrom(pack(rbac))
    if ext_authz:
        per_route = guard.per_route(r, guard_spec)
        if per_route is not None:
            out.typed_per_filter_config[guard.FILTER].CopyFrom(pack(per_route))
    if jwt_filter:
        out.typed_per_filter_config[jwt.FILTER].CopyFrom(pack(jwt.per_route(r)))
    if r.rate_limit is not None:
        stat_prefix = out.name.replace("/", ".")
        local = ratelimit.local_per_route(r.rate_limit, stat_prefix)
        out.typed_per_filter_config[ratelimit.LOCAL_FILTER].CopyFrom(pack(local))
    if r.global_rate_limit is not None:
        shared = ratelimit.global_per_route(listener, host.name, r.name or f"route-{index}", r)
        out.typed_per_filter_config[ratelimit.GLOBAL_FILTER].CopyFrom(pack(shared))
    if r.direct_response is not None:
        out.direct_response.CopyFrom(
            rc.DirectResponseAction(
                status=r.direct_response.status,
                body=base_pb2.DataSource(inline_string=r.direct_response.body),
            )
        )
        return out
    action = rc.RouteAction(cluster=r.upstream or "")
    if r.timeout is not None:
        action.timeout.CopyFrom(duration(r.timeout))
    if r.rewrite is not None:
        if r.rewrite.prefix is not None:
            action.prefix_rewrite = r.rewrite.prefix
        if r.rewrite.regex is not None:
            action.regex_rewrite.CopyFrom(
                regex_pb2.RegexMatchAndSubstitute(
                    pattern=_regex(r.rewrite.regex.pattern),
                    substitution=r.rewrite.regex.substitution,
                )
            )
        if r.rewrite.host is not None:
            action.host_rewrite_literal = r.rewrite.host
    if r.retries is not None:
        policy = rc.RetryPolicy(
            retry_on=",".join(r.retries.on), num_retries=u32(r.retries.attempts)
        )
        if r.retries.per_try_timeout is not None:
            policy.per_try_timeout.CopyFrom(duration(r.retries.per_try_timeout))
        action.retry_policy.CopyFrom(policy)
    out.route.CopyFrom(action)
    return out


def virtual_host(
    host: Host,
    jwt_filter: bool = False,
    ext_authz: bool = False,
    listener: str = "",
    guard_spec: Guard | None = None,
) -> Any:
    routes = [
        route(host, r, i, jwt_filter, ext_authz, listener, guard_spec)
        for i, r in enumerate(host.routes)
    ]
    if host.path_parameters == "reject":
        routes.insert(0, _path_parameters_refused(host, jwt_filter, ext_authz, listener))
    return rc.VirtualHost(name=host.name, domains=host.domains, routes=routes)


def _misdirected(host: Host) -> Any:
    """Requests whose :authority is not a domain of the connection's host (SNI): 421,
    before any check of ``host``'s HCM acts on them. Filters run before the route's
    action, so each one the HCM holds is switched off on this route: no jwt_authn (a
    missing or bad token would turn 421 into 401), no ext_authz (the guard is never asked,
    no jti is spent), no RBAC, and the missing-certificate counter of optional hosts does not
    count it. The rate limit filters need nothing: the route names no
    limit (the local filter's HCM config has no bucket, the global one has no descriptor)."""
    out = rc.Route(
        name=f"{MISDIRECTED}/421",
        match=rc.RouteMatch(prefix="/"),
        direct_response=rc.DirectResponseAction(
            status=421,
            body=base_pb2.DataSource(
                inline_string="misdirected request: this host is not served on this "
                "connection's server name\n"
            ),
        ),
    )
    if jwt.providers_of([host]):
        out.typed_per_filter_config[jwt.FILTER].CopyFrom(pack(jwt.disabled()))
    if guard.needs_ext_authz([host]):
        out.typed_per_filter_config[guard.FILTER].CopyFrom(pack(guard.disabled()))
    if authz.needs_rbac([host]):
        out.typed_per_filter_config[authz.RBAC_FILTER].CopyFrom(pack(authz.disabled()))
    if host.client_certificate == "optional":  # the missing-certificate counter: not a 421
        out.typed_per_filter_config[authz.CERTIFICATE_MISSING_FILTER].CopyFrom(
            pack(authz.disabled())
        )
    return rc.VirtualHost(name=MISDIRECTED, domains=["*"], routes=[out])


def _redirect(listener: Listener) -> Any:
    redirect = rc.RedirectAction(https_redirect=True)
    if listener.https_port != 443:
        redirect.port_redirect = listener.https_port
    return route_pb2.RouteConfiguration(
        name=listener.name,
        virtual_hosts=[
            rc.VirtualHost(
                name="redirect-to-https",
                domains=["*"],
                routes=[
                    rc.Route(
                        name="redirect-to-https/all",
                        match=rc.RouteMatch(prefix="/"),
                        redirect=redirect,
                    )
                ],
            )
        ],
    )


VirtualHostOf = Callable[[Host, bool, bool, str, Guard | None], Any]


def route_configurations(
    listener: Listener, vhost: VirtualHostOf | None = None, guard_spec: Guard | None = None
) -> list[Any]:
    """The listener's RouteConfigurations; ``vhost`` builds each host's VirtualHost (a
    caller may keep them by content: ``virtual_host`` depends on nothing else)."""
    make: VirtualHostOf = vhost if vhost is not None else virtual_host
    if listener.redirect_to_https:
        return [_redirect(listener)]
    if listener.tls is None:
        jwt_filter = bool(jwt.providers_of(listener.hosts))
        ext_authz = guard.needs_ext_authz(listener.hosts)
        vhosts = [make(h, jwt_filter, ext_authz, listener.name, guard_spec) for h in listener.hosts]
        return [route_pb2.RouteConfiguration(name=listener.name, virtual_hosts=vhosts)]
    out = []
    for h in listener.hosts:
        jwt_filter = bool(jwt.providers_of([h]))
        vhosts = [make(h, jwt_filter, guard.needs_ext_authz([h]), listener.name, guard_spec)]
        if "*" not in h.domains:
            vhosts.append(_misdirected(h))
        out.append(
            route_pb2.RouteConfiguration(name=route_config_name(listener, h), virtual_hosts=vhosts)
        )
    return out
