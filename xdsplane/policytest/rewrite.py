"""The node's snapshot -> one static Envoy bootstrap that runs on loopback, hermetically.

``envoycheck.bootstrap`` inlines what Envoy would fetch over ADS (routes, endpoints,
secrets, ECDS); then, on the JSON:

- every listener binds 127.0.0.1 on a port the kernel picks (read back from Envoy's admin);
- every cluster's endpoints become one local address: the guard's cluster the run's guard,
  every other cluster a recorder of the run (``recorders.py``); a cluster that asks for
  HTTP/2 is switched to HTTP/1.1 (recorders speak HTTP/1.1);
- every JWT provider's keys become the run's key (``remote_jwks`` too);
- every file access log writes to Envoy's stdout (a file of the run).

Nothing else changes: filters, routes, TLS contexts and their order are the node's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any

from xdsplane.envoycheck.bootstrap import bootstrap_json
from xdsplane.names import GUARD_CLUSTER, GUARD_HTTP_CLUSTER
from xdsplane.snapshot import Snapshot

_TLS_UP = "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
_TLS_DOWN = "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext"
_JWT = "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"
_FILE_LOG = "envoy.extensions.access_loggers.file.v3.FileAccessLog"
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@dataclass
class UpstreamTls:
    """What a cluster's TLS asks of the server it reaches: the names to carry, and whether
    Envoy presents a client certificate (and which secrets)."""

    sni: str = ""
    dns: list[str] = field(default_factory=list)
    uris: list[str] = field(default_factory=list)
    client_secrets: list[str] = field(default_factory=list)


@dataclass
class ListenerInfo:
    name: str
    tls: bool
    server_names: list[str]
    domains: list[str]


@dataclass
class Provider:
    issuer: str | None
    audiences: list[str]
    max_lifetime: int | None


@dataclass
class Plan:
    config: dict[str, Any]
    listeners: dict[str, ListenerInfo]
    clusters: dict[str, UpstreamTls | None]  # every cluster but the guard's: one recorder each
    guard: UpstreamTls | None  # the guard cluster's TLS (None: plaintext)
    has_guard: bool
    providers: dict[str, Provider]
    http2_downgraded: list[str] = field(default_factory=list)
    guard_http: bool = False  # guard.transport: http (the guard's HTTP front has a cluster)

    def point(self, cluster: str, port: int) -> None:
        """Send ``cluster``'s traffic to 127.0.0.1:``port``."""
        for c in self.config["static_resources"].get("clusters", []):
            if c["name"] == cluster:
                c["type"] = "STATIC"
                for k in ("eds_cluster_config", "dns_lookup_family", "dns_resolvers"):
                    c.pop(k, None)
                c["load_assignment"] = {
                    "cluster_name": cluster,
                    "endpoints": [
                        {
                            "lb_endpoints": [
                                {
                                    "endpoint": {
                                        "address": {
                                            "socket_address": {
                                                "address": "127.0.0.1",
                                                "port_value": port,
                                            }
                                        }
                                    }
                                }
                            ]
                        }
                    ],
                }

    def json(self) -> str:
        """The bootstrap for ``envoy -c``. Holds the run's keys: never print it."""
        return json.dumps(self.config)


def _walk(value: Any) -> Iterator[dict[str, Any]]:
    if isinstance(value, dict):
        yield value
        for v in value.values():
            yield from _walk(v)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v)


def _is(d: dict[str, Any], type_name: str) -> bool:
    return str(d.get("@type", "")).endswith("/" + type_name)


def _upstream_tls(cluster: dict[str, Any]) -> UpstreamTls | None:
    sock = cluster.get("transport_socket", {}).get("typed_config", {})
    if not _is(sock, _TLS_UP):
        return None
    out = UpstreamTls(sni=str(sock.get("sni", "")))
    for d in _walk(sock):
        for m in d.get("match_typed_subject_alt_names", []):
            exact = m.get("matcher", {}).get("exact")
            if exact:
                (out.uris if m.get("san_type") == "URI" else out.dns).append(exact)
        for m in d.get("match_subject_alt_names", []):
            if m.get("exact"):
                out.dns.append(m["exact"])
    common = sock.get("common_tls_context", {})
    out.client_secrets = [s["name"] for s in common.get("tls_certificate_sds_secret_configs", [])]
    if common.get("tls_certificates"):
        out.client_secrets.append("")
    return out


def _http1(cluster: dict[str, Any]) -> bool:
    """Switch a cluster that asks for HTTP/2 upstream to HTTP/1.1; True if it did."""
    changed = cluster.pop("http2_protocol_options", None) is not None
    for opts in cluster.get("typed_extension_protocol_options", {}).values():
        if _is(opts, _HTTP_OPTIONS) and "http2_protocol_options" in opts.get(
            "explicit_http_config", {}
        ):
            opts["explicit_http_config"] = {"http_protocol_options": {}}
            changed = True
    return changed


def _listener(listener: dict[str, Any]) -> ListenerInfo:
    chains = [*listener.get("filter_chains", [])]
    if "default_filter_chain" in listener:
        chains.append(listener["default_filter_chain"])
    tls = False
    server_names: list[str] = []
    domains: list[str] = []
    for chain in chains:
        server_names.extend(chain.get("filter_chain_match", {}).get("server_names", []))
        if _is(chain.get("transport_socket", {}).get("typed_config", {}), _TLS_DOWN):
            tls = True
        for d in _walk(chain.get("filters", [])):
            for vh in d.get("virtual_hosts", []) if "virtual_hosts" in d else []:
                domains.extend(vh.get("domains", []))
    return ListenerInfo(listener["name"], tls, server_names, domains)


def matches(pattern: str, name: str) -> bool:
    """Envoy's server name / domain match: exact, ``*.suffix`` or ``prefix*`` (any case)."""
    pattern, name = pattern.lower(), name.lower()
    if pattern == "*":
        return False  # the catch-all does not name a host
    return pattern == name or fnmatchcase(name, pattern)


def plan(snapshot: Snapshot, node: str, jwks: str) -> Plan:
    config: dict[str, Any] = json.loads(bootstrap_json(snapshot))
    config["node"] = {"id": node, "cluster": node}
    static = config.setdefault("static_resources", {})
    listeners: dict[str, ListenerInfo] = {}
    for listener in static.get("listeners", []):
        listener["address"] = {"socket_address": {"address": "127.0.0.1", "port_value": 0}}
        listener.pop("additional_addresses", None)
        listeners[listener["name"]] = _listener(listener)
    clusters: dict[str, UpstreamTls | None] = {}
    guard: UpstreamTls | None = None
    has_guard = guard_http = False
    downgraded = []
    for cluster in static.get("clusters", []):
        name = cluster["name"]
        if name == GUARD_CLUSTER:
            has_guard, guard = True, _upstream_tls(cluster)
            continue
        if name == GUARD_HTTP_CLUSTER:  # the same TLS as the gRPC cluster (one guard.tls)
            guard_http = True
            continue
        clusters[name] = _upstream_tls(cluster)
        if _http1(cluster):
            downgraded.append(name)
    providers: dict[str, Provider] = {}
    for d in _walk(config):
        if _is(d, _JWT):
            for pname, p in d.get("providers", {}).items():
                p.pop("remote_jwks", None)
                p["local_jwks"] = {"inline_string": jwks}
                lifetime = p.get("max_lifetime")
                providers[pname] = Provider(
                    p.get("issuer"),
                    list(p.get("audiences", [])),
                    int(float(lifetime.rstrip("s"))) if lifetime else None,
                )
        elif _is(d, _FILE_LOG):
            d["path"] = "/dev/stdout"
    return Plan(config, listeners, clusters, guard, has_guard, providers, downgraded, guard_http)
