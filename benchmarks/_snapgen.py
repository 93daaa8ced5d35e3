"""Generate large raw snapshot folders for the benchmarks (the project's YAML format).

The default shape (``Shape()``) is the one the benchmarks' goals are stated for:

- 2,000 EDS clusters, each with an ``UpstreamTlsContext`` whose client certificate and CA
  come from SDS over ADS, and their 2,000 ClusterLoadAssignments (3 endpoints each);
- the Secrets they reference: one client certificate and one CA per team (100 teams of 20
  clusters: 200 Secrets, with PEM-sized inline strings);
- 200 Listeners, each with an HttpConnectionManager taking its routes over RDS;
- 200 RouteConfigurations, 10 routes each, to those clusters (every cluster is used once).

Resources are spread over several files so that a one-route edit touches one small file:

    secrets/secrets-NN.yaml    20 Secrets each
    clusters/team-NNN.yaml     20 Clusters + their 20 ClusterLoadAssignments each
    listeners/listeners-NN.yaml 20 Listeners each
    routes/route-NNN.yaml      one RouteConfiguration each

No file has ``nodes:``: everything is served to every node.
"""

from __future__ import annotations

import base64
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

T = "type.googleapis.com/"
CLUSTER = T + "envoy.config.cluster.v3.Cluster"
CLA = T + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = T + "envoy.config.listener.v3.Listener"
ROUTE = T + "envoy.config.route.v3.RouteConfiguration"
SECRET = T + "envoy.extensions.transport_sockets.tls.v3.Secret"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
ROUTER = T + "envoy.extensions.filters.http.router.v3.Router"
UPSTREAM_TLS = T + "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext"
ADS = "{ads: {}, resource_api_version: V3}"


@dataclass(frozen=True)
class Shape:
    clusters: int = 2000
    listeners: int = 200
    routes_per_config: int = 10  # route configurations == listeners
    cluster_files: int = 100  # one team per file: a CA and a client certificate each
    listener_files: int = 10
    secret_files: int = 10

    @property
    def per_team(self) -> int:
        return -(-self.clusters // self.cluster_files)


def _pem(kind: str, seed: str, lines: int) -> str:
    """A PEM-shaped block (deterministic noise): parses as a string, not as a certificate."""
    raw = b""
    counter = 0
    while len(raw) < lines * 48:
        raw += hashlib.sha256(f"{seed}/{counter}".encode()).digest()
        counter += 1
    body = base64.b64encode(raw[: lines * 48]).decode()
    rows = [body[i : i + 64] for i in range(0, len(body), 64)]
    return "\n".join([f"-----BEGIN {kind}-----", *rows, f"-----END {kind}-----", ""])


def _block(text: str, indent: int) -> str:
    pad = " " * indent
    return "\n".join(pad + line if line else line for line in text.splitlines())


def cluster_name(i: int) -> str:
    return f"svc-{i:04d}"


def team_of(i: int, shape: Shape) -> int:
    return i // shape.per_team


def secrets_text(first: int, count: int) -> str:
    out = ["resources:"]
    for team in range(first, first + count):
        out.append(
            f"""  - "@type": {SECRET}
    name: ca-team-{team:03d}
    validation_context:
      trusted_ca:
        inline_string: |
{_block(_pem("CERTIFICATE", f"ca{team}", 18), 10)}
  - "@type": {SECRET}
    name: client-team-{team:03d}
    tls_certificate:
      certificate_chain:
        inline_string: |
{_block(_pem("CERTIFICATE", f"cert{team}", 18), 10)}
      private_key:
        inline_string: |
{_block(_pem("PRIVATE KEY", f"key{team}", 4), 10)}"""
        )
    return "\n".join(out) + "\n"


def cluster_text(i: int, team: int, timeout_ms: int = 1000) -> str:
    name = cluster_name(i)
    return f"""  - "@type": {CLUSTER}
    name: {name}
    type: EDS
    connect_timeout: {timeout_ms / 1000:.3f}s
    lb_policy: LEAST_REQUEST
    eds_cluster_config:
      eds_config: {ADS}
    circuit_breakers:
      thresholds:
        - {{max_connections: 1024, max_pending_requests: 1024, max_requests: 4096}}
    transport_socket:
      name: envoy.transport_sockets.tls
      typed_config:
        "@type": {UPSTREAM_TLS}
        sni: {name}.internal.example
        common_tls_context:
          tls_params:
            tls_minimum_protocol_version: TLSv1_2
            tls_maximum_protocol_version: TLSv1_3
          tls_certificate_sds_secret_configs:
            - name: client-team-{team:03d}
              sds_config: {ADS}
          validation_context_sds_secret_config:
            name: ca-team-{team:03d}
            sds_config: {ADS}
"""


def cla_text(i: int) -> str:
    eps = "\n".join(
        f"          - endpoint: {{address: {{socket_address: "
        f"{{address: 10.{i // 250}.{i % 250}.{k + 1}, port_value: 8443}}}}}}"
        for k in range(3)
    )
    return f"""  - "@type": {CLA}
    cluster_name: {cluster_name(i)}
    endpoints:
      - locality: {{region: local, zone: zone-{i % 3}}}
        lb_endpoints:
{eps}
"""


def team_text(team: int, shape: Shape, timeouts: dict[int, int] | None = None) -> str:
    """Clusters and endpoints of one team; ``timeouts`` overrides connect_timeout (ms)."""
    timeouts = timeouts or {}
    first = team * shape.per_team
    ids = range(first, min(first + shape.per_team, shape.clusters))
    parts = ["resources:\n"]
    parts += [cluster_text(i, team, timeouts.get(i, 1000)) for i in ids]
    parts += [cla_text(i) for i in ids]
    return "".join(parts)


def listeners_text(first: int, count: int) -> str:
    out = ["resources:"]
    for n in range(first, first + count):
        out.append(
            f"""  - "@type": {LISTENER}
    name: listener-{n:03d}
    address: {{socket_address: {{address: 127.0.0.1, port_value: {20000 + n}}}}}
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": {HCM}
              stat_prefix: listener_{n:03d}
              codec_type: AUTO
              rds:
                route_config_name: route-{n:03d}
                config_source: {ADS}
              http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": {ROUTER}"""
        )
    return "\n".join(out) + "\n"


def route_text(n: int, shape: Shape, variant: int = 0) -> str:
    """One RouteConfiguration; ``variant`` changes the first route's prefix (an edit)."""
    k = shape.routes_per_config
    routes = []
    for j in range(k):
        target = (n * k + j) % shape.clusters
        prefix = f"/api/v{variant}/r{j}" if j == 0 else f"/api/r{j}"
        routes.append(
            f"""          - match: {{prefix: "{prefix}"}}
            route:
              cluster: {cluster_name(target)}
              timeout: 15s
              retry_policy: {{retry_on: "5xx,reset", num_retries: 2}}"""
        )
    routes_s = "\n".join(routes)
    return f"""resources:
  - "@type": {ROUTE}
    name: route-{n:03d}
    virtual_hosts:
      - name: vh-{n:03d}
        domains: ["svc-{n:03d}.example.com", "svc-{n:03d}.example.com:*"]
        routes:
{routes_s}
          - match: {{prefix: /}}
            direct_response: {{status: 404, body: {{inline_string: "no route\\n"}}}}
"""


def write_atomic(path: Path, text: str, tmp_dir: Path | None = None) -> None:
    """Write ``text`` to ``path`` as one rename (tmp file outside the watched folder)."""
    tmp_dir = tmp_dir or path.parent
    tmp = tmp_dir / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def generate(root: Path, shape: Shape | None = None) -> dict[str, int]:
    """Write the folder; returns counts per kind of resource (and files)."""
    shape = shape or Shape()
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("secrets", "clusters", "listeners", "routes"):
        (root / sub).mkdir(exist_ok=True)
    teams = shape.cluster_files
    per = -(-teams // shape.secret_files)
    for f in range(shape.secret_files):
        first = f * per
        count = max(0, min(per, teams - first))
        if count:
            (root / "secrets" / f"secrets-{f:02d}.yaml").write_text(secrets_text(first, count))
    for team in range(teams):
        (root / "clusters" / f"team-{team:03d}.yaml").write_text(team_text(team, shape))
    per_l = -(-shape.listeners // shape.listener_files)
    for f in range(shape.listener_files):
        first = f * per_l
        count = max(0, min(per_l, shape.listeners - first))
        if count:
            (root / "listeners" / f"listeners-{f:02d}.yaml").write_text(
                listeners_text(first, count)
            )
    for n in range(shape.listeners):
        (root / "routes" / f"route-{n:03d}.yaml").write_text(route_text(n, shape))
    files = sum(1 for _ in root.rglob("*.yaml"))
    return {
        "clusters": shape.clusters,
        "endpoints": shape.clusters,
        "secrets": 2 * teams,
        "listeners": shape.listeners,
        "routes": shape.listeners,
        "files": files,
    }


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*.yaml"))
