"""Helpers for tests of xDS-enabled gRPC servers: the gRPC bootstrap of a server node, the
server process (tests/grpc_xds_server.py, real grpcio), and plain TLS gRPC clients.

The bootstrap is the one ``xdsplane bootstrap --grpc --policy DIR`` prints for the node:
its certificate providers are the policy's secrets, by the same names.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from harness import Proc, ProcessGroup, wait_until
from test_policy_corpus import run_cli

from xdsplane.names import GRPC_SERVER_LISTENER_TEMPLATE

SERVER_SCRIPT = Path(__file__).parent / "grpc_xds_server.py"
RPC_SECONDS = 5.0
# How long a gRPC server may take to get its Listener from a freshly started control plane
# and serve (C-core's first ADS connection, then the certificate providers' first read):
# about a second here; the ceiling is for a slow, shared machine.
SERVING_SECONDS = 60.0


def bootstrap(xds_address: str, node: str, policy_dir: Path) -> str:
    """The gRPC bootstrap JSON of server node ``node``, as ``xdsplane bootstrap --grpc
    --policy`` prints it: its certificate providers are the group's secrets, by name."""
    r = run_cli(
        "bootstrap",
        "--grpc",
        "--policy",
        str(policy_dir),
        "--node",
        node,
        "--cluster",
        "billing",
        "--xds-address",
        xds_address,
        cwd=policy_dir,
    )
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["server_listener_resource_name_template"] == GRPC_SERVER_LISTENER_TEMPLATE
    return json.dumps(data)


def start_server(procs: ProcessGroup, name: str, address: str, bootstrap_json: str) -> Proc:
    env = {"GRPC_XDS_BOOTSTRAP_CONFIG": bootstrap_json, "PATH": "/usr/bin:/bin"}
    return procs.spawn(name, [sys.executable, str(SERVER_SCRIPT), address], env=env).start()


@dataclass(frozen=True)
class Outcome:
    """An RPC's result: the answer, or the status code and details."""

    answer: bytes | None
    code: grpc.StatusCode
    details: str

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


class Client:
    """A plain (not xDS) TLS gRPC client of one server: a client certificate or none."""

    def __init__(self, certs: Path, port: int, who: str | None, ca: str = "service-ca") -> None:
        key = (certs / f"{who}.key").read_bytes() if who else None
        chain = (certs / f"{who}.crt").read_bytes() if who else None
        creds = grpc.ssl_channel_credentials((certs / f"{ca}.crt").read_bytes(), key, chain)
        # The server certificate (billing) names billing.internal; the server binds 127.0.0.1.
        options = [("grpc.ssl_target_name_override", "billing.internal")]
        self.channel = grpc.secure_channel(f"127.0.0.1:{port}", creds, options=options)

    def call(self, method: str, body: bytes = b"x") -> Outcome:
        rpc = self.channel.unary_unary(method)
        try:
            answer = rpc(body, timeout=RPC_SECONDS)
        except grpc.RpcError as e:
            return Outcome(None, e.code(), e.details() or "")
        return Outcome(answer, grpc.StatusCode.OK, "")

    def close(self) -> None:
        self.channel.close()


def call_once(certs: Path, port: int, who: str | None, method: str) -> Outcome:
    """One RPC on a fresh channel (a fresh TLS handshake)."""
    client = Client(certs, port, who)
    try:
        return client.call(method)
    finally:
        client.close()


def wait_serving(proc: Proc, certs: Path, port: int, who: str, method: str) -> None:
    """Poll until ``who`` completes ``method``: the server got its Listener and serves."""

    def serving() -> bool:
        proc.ensure_alive()
        return call_once(certs, port, who, method).ok

    wait_until(serving, SERVING_SECONDS, what=f"{proc.name} serving {method} to {who}")
