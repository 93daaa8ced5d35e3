"""The Listener an xDS-enabled gRPC server asks for (gRFC A36), with its TLS (A29) and RBAC
(A41).

A server started with ``grpc.server(..., xds=True)`` on IP:PORT subscribes to the Listener
``grpc/server?xds.resource.listening_address=IP:PORT`` and serves only once it has it. What
gRPC reads from it, and therefore all this writes:

- ``address``: the server stays "not serving" unless it equals the listening address;
- one filter chain (no ``filter_chain_match``: every connection), whose transport socket is
  a ``DownstreamTlsContext``. gRPC takes certificates only from certificate provider
  instances named in its bootstrap (``tls_certificate_provider_instance``,
  ``validation_context.ca_certificate_provider_instance``), never SDS, and of the rest reads
  ``require_client_certificate`` only;
- one HttpConnectionManager with an inline route configuration (no RDS round trip): one
  virtual host ``*`` whose one route sends every RPC to the server itself
  (``non_forwarding_action``, the only action a server accepts);
- the RBAC HTTP filter (when the policy has ``rbac``), then the router.

RBAC is one ALLOW engine, a policy per rule (``rule-N``): an RPC passes when some rule
names its method (``url_path``, the gRPC method path: a method exactly, a service as its
path then one protobuf method name) and the client certificate matches
one of the rule's SAN globs; otherwise PERMISSION_DENIED. gRPC's ``authenticated.principal_name``
matches the URI SANs of the certificate, or its DNS SANs when it has no URI SAN, or its
subject DN when it has neither, or "" without a certificate (A41). So globs become
RE2 regexes that cannot match across those: a URI glob starts with a literal scheme (a DN
never does), a DNS glob's '*' excludes ':', '/' and '=' (a URI and a DN always hold one),
and no glob matches "".
"""

from __future__ import annotations

import re
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.rbac.v3 import rbac_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2 as rbac_filter_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2
from envoy.type.matcher.v3 import path_pb2, regex_pb2, string_pb2
from google.protobuf import wrappers_pb2

from xdsplane.names import grpc_server_listener
from xdsplane.policy.model import GrpcRbacRule, GrpcServer
from xdsplane.policy.translate.common import pack, socket_address

HCM = "envoy.filters.network.http_connection_manager"
RBAC_FILTER = "envoy.filters.http.rbac"
ROUTER = "envoy.filters.http.router"
TLS_SOCKET = "envoy.transport_sockets.tls"
_DNS_STAR = "[^=:/]*"
METHOD_NAME = "[A-Za-z_][A-Za-z0-9_]*"
"""A protobuf method name: what a service rule lets follow the service's path."""


def san_regex(glob: str) -> str:
    """An RE2 regex for a SAN glob, as gRPC's principal_name matches it (see above)."""
    parts = [re.escape(p) for p in glob.split("*")]
    if "://" in glob:
        return "^" + ".*".join(parts) + "$"
    if not glob.strip("*"):
        return "^[^=:/]+$"  # '*' alone: any DNS SAN, never "" (no certificate)
    return "^" + _DNS_STAR.join(parts) + "$"


def _permission(method: str) -> Any:
    """A method exactly; a service as its name then one method name, never a mere prefix
    (``/pkg.Service/../other.Service/M`` starts with ``/pkg.Service/`` too)."""
    if method.endswith("/"):
        regex = "^" + re.escape(method) + METHOD_NAME + "$"
        matcher = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=regex))
    else:
        matcher = string_pb2.StringMatcher(exact=method)
    return rbac_pb2.Permission(url_path=path_pb2.PathMatcher(path=matcher))


def _principal(glob: str) -> Any:
    name = string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=san_regex(glob)))
    return rbac_pb2.Principal(authenticated=rbac_pb2.Principal.Authenticated(principal_name=name))


def rbac_filter(rules: list[GrpcRbacRule]) -> Any:
    policies = {
        f"rule-{i}": rbac_pb2.Policy(
            permissions=[_permission(m) for m in rule.methods],
            principals=[_principal(g) for g in rule.client_sans],
        )
        for i, rule in enumerate(rules)
    }
    config = rbac_filter_pb2.RBAC(
        rules=rbac_pb2.RBAC(action=rbac_pb2.RBAC.ALLOW, policies=policies)
    )
    return hcm_pb2.HttpFilter(name=RBAC_FILTER, typed_config=pack(config))


def downstream_tls(spec: GrpcServer) -> Any:
    common = tls_pb2.CommonTlsContext(
        tls_certificate_provider_instance=common_pb2.CertificateProviderPluginInstance(
            instance_name=spec.certificate
        )
    )
    if spec.client_certificate != "off":
        assert spec.client_ca is not None  # the model's rule
        common.validation_context.ca_certificate_provider_instance.instance_name = spec.client_ca
    return tls_pb2.DownstreamTlsContext(
        common_tls_context=common,
        require_client_certificate=wrappers_pb2.BoolValue(
            value=spec.client_certificate == "required"
        ),
    )


def _hcm(spec: GrpcServer) -> Any:
    route = rc.Route(
        match=rc.RouteMatch(prefix="/"), non_forwarding_action=rc.NonForwardingAction()
    )
    routes = route_pb2.RouteConfiguration(
        name=spec.name,
        virtual_hosts=[rc.VirtualHost(name=spec.name, domains=["*"], routes=[route])],
    )
    filters = [rbac_filter(spec.rbac)] if spec.rbac is not None else []
    filters.append(hcm_pb2.HttpFilter(name=ROUTER, typed_config=pack(router_pb2.Router())))
    return hcm_pb2.HttpConnectionManager(
        stat_prefix=spec.name, route_config=routes, http_filters=filters
    )


def listener(spec: GrpcServer) -> Any:
    chain = listener_components_pb2.FilterChain(
        name=spec.name,
        transport_socket=base_pb2.TransportSocket(
            name=TLS_SOCKET, typed_config=pack(downstream_tls(spec))
        ),
        filters=[listener_components_pb2.Filter(name=HCM, typed_config=pack(_hcm(spec)))],
    )
    return listener_pb2.Listener(
        name=grpc_server_listener(spec.address),
        address=socket_address(spec.address),
        filter_chains=[chain],
    )
