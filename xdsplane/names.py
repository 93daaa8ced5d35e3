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
# A route with introspection: NAME sets GUARD_CHECK_EXTENSION to this, the provider's name
# under GUARD_INTROSPECTION_PROVIDER, its require_scopes (space-separated) under
# GUARD_REQUIRED_SCOPES, and "true" under GUARD_ALSO_REVOCATION with revocation_check.
GUARD_CHECK_INTROSPECTION = "introspection"
GUARD_INTROSPECTION_PROVIDER = "xdsplane_introspection"
GUARD_REQUIRED_SCOPES = "xdsplane_scopes"
GUARD_ALSO_REVOCATION = "xdsplane_revocation"
"""The Cluster through which Envoy reaches the guard (ext_authz and rate limit service)."""

GUARD_HTTP_CLUSTER = "xdsplane-guard-http"
"""With ``guard.transport: http``: the Cluster of the guard's HTTP/1.1 ext_authz front."""
GUARD_HTTP_PATH = "/xdsplane-check/"
"""... every check request's path starts with this and the route's mode (``replay``,
``revocation``): a per-route ``path_prefix`` Envoy puts before the client's path."""
GUARD_HTTP_REPLAY = "replay"
GUARD_HTTP_REVOCATION = "revocation"
GUARD_HTTP_PAYLOAD_HEADER = "x-xdsplane-jwt-payload"
"""... the verified JWT payload (JSON of jwt_authn's metadata), set by Envoy's ext_authz
``headers_to_add`` on the check request only (never upstream; a client's own copy is not
in ``allowed_headers`` and never reaches the guard)."""
GUARD_HTTP_CERT_HEADER = "x-xdsplane-client-cert"
"""... the client certificate (URL-encoded PEM, ``%DOWNSTREAM_PEER_CERT%``), likewise."""

OTLP_CLUSTER = "xdsplane-otlp"
"""The Cluster through which Envoy sends access-log records to ``access_log.otlp``."""

EXT_AUTHZ_NAMESPACE = "envoy.filters.http.ext_authz"
"""ext_authz's filter name: the dynamic metadata namespace of what the guard returns."""

JTI_HASH_KEY = "jti_sha256"
"""The guard returns the first 16 hex digits of the SHA-256 of the token's jti under this
key (ext_authz dynamic metadata), for the access log: never the jti or the token."""

GUARD_REASON_KEY = "guard_reason"
"""... and its decision's reason (``replay``, ``revoked_sub``, ``first_use``...)."""

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
