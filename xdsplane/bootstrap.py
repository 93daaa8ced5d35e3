"""Envoy bootstrap files that take LDS, CDS (and through them RDS, EDS, SDS) over ADS."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from xdsplane.tlsflags import all_or_none

XDS_CLUSTER = "xds_cluster"
# Envoy's own ADS reconnect backoff (500 ms base, doubling, jittered, up to 30 s) leaves it
# many seconds off a control plane that is back: measured 0.3-13.6 s after a restart. A
# retry policy on the ADS gRPC service replaces it; Envoy 1.40 honours it for ADS.
RECONNECT_BASE_SECONDS = 0.1
RECONNECT_MAX_SECONDS = 0.5


def split_address(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``HOST:PORT`` (or ``[v6]:PORT``, or ``:PORT``) -> (host, port); raises ValueError."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port out of range in {value!r}")
    host = host.strip("[]") or default_host
    return host, number


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class XdsClientTls:
    """mTLS from Envoy to the control plane: files Envoy reads itself (absolute paths)."""

    cert: str
    key: str
    ca: str
    sni: str | None = None

    @classmethod
    def from_flags(
        cls, cert: str | None, key: str | None, ca: str | None, sni: str | None = None
    ) -> XdsClientTls | None:
        """None without flags; ValueError unless cert, key and CA are all given and exist."""
        files = {"--tls-cert": cert, "--tls-key": key, "--ca": ca}
        if not all_or_none(files):
            if sni:
                raise ValueError("--sni needs --tls-cert, --tls-key and --ca")
            return None
        paths = {}
        for flag, value in files.items():
            assert value is not None
            path = Path(value).absolute()
            if not path.is_file():
                raise ValueError(f"{flag} {value}: no such file")
            paths[flag] = str(path)
        return cls(paths["--tls-cert"], paths["--tls-key"], paths["--ca"], sni or None)

    def transport_socket(self) -> dict[str, Any]:
        validation: dict[str, Any] = {"trusted_ca": {"filename": self.ca}}
        tls: dict[str, Any] = {
            "@type": "type.googleapis.com/"
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        }
        if self.sni:
            tls["sni"] = self.sni
            san_type = "IP_ADDRESS" if _is_ip(self.sni) else "DNS"
            validation["match_typed_subject_alt_names"] = [
                {"san_type": san_type, "matcher": {"exact": self.sni}}
            ]
        tls["common_tls_context"] = {
            "alpn_protocols": ["h2"],
            "tls_certificates": [
                {
                    "certificate_chain": {"filename": self.cert},
                    "private_key": {"filename": self.key},
                }
            ],
            "validation_context": validation,
        }
        return {"name": "envoy.transport_sockets.tls", "typed_config": tls}


def bootstrap(
    node_id: str,
    cluster: str = "",
    xds_addresses: tuple[str, ...] = ("127.0.0.1:18000",),
    admin_address: str = "127.0.0.1:9901",
    delta: bool = False,
    tls: XdsClientTls | None = None,
    reconnect_max: float = RECONNECT_MAX_SECONDS,
) -> dict[str, Any]:
    """A bootstrap as a plain mapping (``to_yaml`` renders it).

    ``reconnect_max`` (seconds) caps Envoy's jittered backoff between attempts to reach the
    control plane (ADS), so that it is back on a restarted server or another replica within
    about that long; ValueError unless positive.
    """
    if not reconnect_max > 0:
        raise ValueError(f"the reconnect backoff must be positive, got {reconnect_max}")
    base = min(RECONNECT_BASE_SECONDS, reconnect_max)
    endpoints = []
    all_ips = True
    for addr in xds_addresses:
        host, port = split_address(addr)
        all_ips = all_ips and _is_ip(host)
        endpoints.append(
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        )
    admin_host, admin_port = split_address(admin_address)
    ads = {"ads": {}, "resource_api_version": "V3"}
    xds_cluster: dict[str, Any] = {
        "name": XDS_CLUSTER,
        "type": "STATIC" if all_ips else "STRICT_DNS",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/"
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {
                    "http2_protocol_options": {
                        "connection_keepalive": {"interval": "30s", "timeout": "5s"}
                    }
                },
            }
        },
        "load_assignment": {
            "cluster_name": XDS_CLUSTER,
            "endpoints": [{"lb_endpoints": endpoints}],
        },
    }
    if tls is not None:
        xds_cluster["transport_socket"] = tls.transport_socket()
    return {
        "node": {"id": node_id, "cluster": cluster or node_id},
        "admin": {"address": {"socket_address": {"address": admin_host, "port_value": admin_port}}},
        "dynamic_resources": {
            "ads_config": {
                "api_type": "DELTA_GRPC" if delta else "GRPC",
                "transport_api_version": "V3",
                "set_node_on_first_message_only": True,
                "grpc_services": [
                    {
                        "envoy_grpc": {
                            "cluster_name": XDS_CLUSTER,
                            "retry_policy": {
                                "retry_back_off": {
                                    "base_interval": _duration(base),
                                    "max_interval": _duration(reconnect_max),
                                }
                            },
                        }
                    }
                ],
            },
            "lds_config": ads,
            "cds_config": ads,
        },
        "static_resources": {"clusters": [xds_cluster]},
    }


def _duration(seconds: float) -> str:
    return f"{seconds:.3f}s"


def to_yaml(data: dict[str, Any]) -> str:
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)


# -- gRPC (proxyless) ------------------------------------------------------------------------

GRPC_SERVER_TEMPLATE = "grpc/server?xds.resource.listening_address=%s"
# "xds_v3" only. "ignore_resource_deletion" (gRFC A53) is left out: it is safe only when the
# control plane alerts on clients asking for resources that do not exist, and a deleted
# gRPC service should stop being served rather than linger until the client restarts.
GRPC_SERVER_FEATURES = ("xds_v3",)


def grpc_bootstrap(
    node_id: str,
    cluster: str = "",
    xds_addresses: tuple[str, ...] = ("127.0.0.1:18000",),
    tls: XdsClientTls | None = None,
    providers: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A gRPC xDS bootstrap (``GRPC_XDS_BOOTSTRAP`` / ``GRPC_XDS_BOOTSTRAP_CONFIG``) as a
    mapping: every replica in ``xds_servers`` (gRPC uses the first it reaches, gRFC A71),
    channel creds ``tls`` with the files (gRFC A65) or ``insecure``, the certificate
    providers the policy's gRPC resources name, and the template xDS-enabled servers use."""
    if tls is not None and tls.sni:
        raise ValueError("--sni: gRPC verifies the server by the host of --xds-address")
    creds: dict[str, Any] = {"type": "insecure"}
    if tls is not None:
        creds = {
            "type": "tls",
            "config": {
                "ca_certificate_file": tls.ca,
                "certificate_file": tls.cert,
                "private_key_file": tls.key,
            },
        }
    servers = []
    for addr in xds_addresses:
        host, port = split_address(addr)
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        servers.append(
            {
                "server_uri": target,
                "channel_creds": [creds],
                "server_features": list(GRPC_SERVER_FEATURES),
            }
        )
    return {
        "xds_servers": servers,
        "node": {"id": node_id, "cluster": cluster or node_id},
        "certificate_providers": dict(providers or {}),
        "server_listener_resource_name_template": GRPC_SERVER_TEMPLATE,
    }
