"""Names that the Envoy config xdsplane writes and the guard it talks to must agree on.

A leaf module: the translator (``xdsplane.policy.translate``), the policy checks and the
guard (``xdsplane.guard``) import these, so a rename happens in one place.
"""

from __future__ import annotations

GUARD_CLUSTER = "xdsplane-guard"
# The ext_authz context extension a route with revocation_check (and no replay_protection)
# sets: the guard then checks revocation only.
GUARD_CHECK_EXTENSION = "xdsplane_check"
GUARD_CHECK_REVOCATION = "revocation"
"""The Cluster through which Envoy reaches the guard (ext_authz and rate limit service)."""

JWKS_CLUSTER_PREFIX = "xdsplane-jwks-"
"""A provider with ``jwks_uri`` fetches its key set through the Cluster of this prefix and
its name."""

JWT_FILTER = "envoy.filters.http.jwt_authn"
"""jwt_authn's filter name: also the dynamic metadata namespace of the verified claims."""

JWT_PAYLOAD_KEY = "jwt_payload"
"""Verified claims land in dynamic metadata ``envoy.filters.http.jwt_authn`` / this key."""

RATE_LIMIT_DOMAIN = "xdsplane"
"""The rate limit domain of every global limit (the guard's rules live under it)."""

ROUTE_KEY = "route"
"""The first entry of a global descriptor: the route's id (see ``route_id``)."""

RATE_LIMIT_KEYS: dict[str, str] = {
    "source_address": "remote_address",
    "jwt_sub": "jwt_sub",
    "client_certificate": "client_san",
}
"""``by`` -> the descriptor entry's key."""


def route_id(listener: str, host: str, route: str) -> str:
    """The value of the ``route`` entry of a global descriptor."""
    return f"{listener}/{host}/{route}"


GRPC_SERVER_LISTENER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"
"""The bootstrap's ``server_listener_resource_name_template`` for xDS-enabled gRPC servers
(gRFC A36): a server listening on IP:PORT asks for the Listener of this name, ``%s``
replaced by IP:PORT."""


def grpc_server_listener(address: str) -> str:
    """The Listener name a gRPC server listening on ``address`` (IP:PORT) asks for."""
    return GRPC_SERVER_LISTENER_TEMPLATE.replace("%s", address)
