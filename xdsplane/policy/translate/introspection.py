"""Opaque tokens: ``introspection: NAME`` on a route -> the guard asks the provider's RFC 7662
endpoint (Envoy cannot), through the HCM's ext_authz filter.

Envoy's side is small: the route's ``ExtAuthzPerRoute`` carries context extensions (set by
Envoy, never by a client) naming the provider, the route's ``require_scopes`` and whether
revocation is checked too; the guard reads the provider's endpoint, client credentials and
cache bound from the same policy folder (``xdsplane guard --policy``). The forwarded claim
headers are removed from every request of the HCM first (the header_mutation filter that
also strips JWT claim headers), so a client cannot send ``x-introspected-sub`` itself; the
guard then sets them from the endpoint's answer.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2

from xdsplane.names import (
    GUARD_ALSO_REVOCATION,
    GUARD_CHECK_EXTENSION,
    GUARD_CHECK_INTROSPECTION,
    GUARD_INTROSPECTION_PROVIDER,
    GUARD_REQUIRED_SCOPES,
)
from xdsplane.policy.model import Host, IntrospectionProvider, Route, duration_seconds


def providers_of(hosts: Iterable[Host]) -> list[str]:
    """The introspection providers the routes of ``hosts`` name, sorted."""
    return sorted({r.introspection for h in hosts for r in h.routes if r.introspection})


def forwarded_headers(
    names: list[str], providers: Mapping[str, IntrospectionProvider]
) -> list[str]:
    headers = {
        h.lower() for n in names if n in providers for h in providers[n].forward_claims.values()
    }
    return sorted(headers)


def longest_timeout(names: list[str], providers: Mapping[str, IntrospectionProvider]) -> float:
    """The longest endpoint timeout of ``names`` (0 without any), in seconds."""
    return max(
        (duration_seconds(providers[n].timeout) for n in names if n in providers), default=0.0
    )


def per_route(route: Route) -> Any:
    """The ExtAuthzPerRoute of an introspection route: what the guard is to check."""
    assert route.introspection is not None
    ext = {
        GUARD_CHECK_EXTENSION: GUARD_CHECK_INTROSPECTION,
        GUARD_INTROSPECTION_PROVIDER: route.introspection,
    }
    if route.require_scopes:
        ext[GUARD_REQUIRED_SCOPES] = " ".join(route.require_scopes)
    if route.revocation_check:
        ext[GUARD_ALSO_REVOCATION] = "true"
    return ext_authz_pb2.ExtAuthzPerRoute(
        check_settings=ext_authz_pb2.CheckSettings(context_extensions=ext)
    )
