"""Per-route client-certificate requirements, checked at L7 with RBAC.

The host's TLS context keeps ``require_client_certificate: false`` (certificates stay
optional for the other routes); a route that needs one carries an RBACPerRoute allowing only
connections whose client certificate was validated (``mtls_authenticated``), optionally with a
SAN matching one of the route's globs. ``Principal.authenticated`` is not used: with no
``principal_name`` it matches every TLS connection, with or without a certificate.
"""

from __future__ import annotations

import re
from typing import Any

from envoy.config.core.v3 import extension_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.rbac.principals.mtls_authenticated.v3 import mtls_authenticated_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2

from xdsplane.policy.model import Host, Route
from xdsplane.policy.translate.common import pack

RBAC_FILTER = "envoy.filters.http.rbac"
POLICY = "client-certificate"


def needs_rbac(host: Host) -> bool:
    return any(r.require_client_certificate or r.allow_client_sans for r in host.routes)


def glob_regex(glob: str) -> str:
    return "^" + ".*".join(re.escape(part) for part in glob.split("*")) + "$"


def _mtls(config: Any) -> Any:
    return rbac_pb2.Principal(
        custom=extension_pb2.TypedExtensionConfig(
            name="envoy.rbac.principals.mtls_authenticated", typed_config=pack(config)
        )
    )


def _principal(route: Route) -> Any:
    if not route.allow_client_sans:
        return _mtls(mtls_authenticated_pb2.Config(any_validated_client_certificate=True))
    ids = []
    for glob in route.allow_client_sans:
        kind = (
            common_pb2.SubjectAltNameMatcher.URI
            if "://" in glob
            else common_pb2.SubjectAltNameMatcher.DNS
        )
        matcher = common_pb2.SubjectAltNameMatcher(
            san_type=kind,
            matcher=string_pb2.StringMatcher(
                safe_regex=regex_pb2.RegexMatcher(regex=glob_regex(glob))
            ),
        )
        ids.append(_mtls(mtls_authenticated_pb2.Config(san_matcher=matcher)))
    if len(ids) == 1:
        return ids[0]
    return rbac_pb2.Principal(or_ids=rbac_pb2.Principal.Set(ids=ids))


def per_route(route: Route) -> Any | None:
    """The RBACPerRoute for a route, or None when it asks nothing of the client."""
    if not (route.require_client_certificate or route.allow_client_sans):
        return None
    rules = rbac_pb2.RBAC(
        action=rbac_pb2.RBAC.ALLOW,
        policies={
            POLICY: rbac_pb2.Policy(
                permissions=[rbac_pb2.Permission(any=True)], principals=[_principal(route)]
            )
        },
    )
    return rbac_filter_pb2.RBACPerRoute(rbac=rbac_filter_pb2.RBAC(rules=rules))


def filter_config() -> Any:
    """The HCM-level RBAC filter: no rules (allows all) until a route says otherwise."""
    return rbac_filter_pb2.RBAC()
