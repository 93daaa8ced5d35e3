"""mTLS on the xDS channel: ``xdsplane serve --tls-cert --tls-key --client-ca`` with a real
Envoy bootstrapped by ``xdsplane bootstrap --tls-cert --tls-key --ca --sni``.

The PKI is ``xdsplane.pki`` in tmp_path: ``certs init`` (service-ca, xds-server, edge-1)
plus a few certificates made for the refusals. The refusals: no client certificate and a
certificate of another CA fail the TLS handshake (Envoy never connects); a valid
certificate that names another node gets PERMISSION_DENIED, logged and counted in /status.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from ads_client import Stream
from envoy.service.discovery.v3 import discovery_pb2
from harness import (
    HOST,
    Envoy,
    ProcessGroup,
    XdsServer,
    direct,
    eds_cluster,
    endpoints,
    free_port,
    holds_for,
    http_get,
    listener,
    route_config,
    wait_until,
    write_snapshot,
    xdsplane_argv,
)

from xdsplane import pki, xds_identity
from xdsplane.bootstrap import XdsTls, bootstrap

SDS_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

envoy_only = pytest.mark.envoy  # conftest: skipped without Envoy 1.40, failed in CI


# -- the PKI and the server ---------------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    pki.init(d)  # service-ca, xds-server (localhost, 127.0.0.1), edge-1 (URI SAN), ...
    node_uri = xds_identity.node_uri
    pki.issue(d, "edge-a", "service-ca", uris=[node_uri("edge-a")], usage=("client",))
    pki.issue(d, "edge-b", "service-ca", dns=["edge-b"], usage=("client",))
    pki.issue(d, "rogue-ca", None, days=30)
    pki.issue(d, "rogue-edge-1", "rogue-ca", uris=[node_uri("edge-1")], usage=("client",))
    return d


def tls_args(certs: Path) -> list[str]:
    return [
        "--tls-cert",
        str(certs / "xds-server.crt"),
        "--tls-key",
        str(certs / "xds-server.key"),
        "--client-ca",
        str(certs / "service-ca.crt"),
    ]


def edge_config(folder: Path, port: int) -> None:
    """Every ``edge-*`` node: a listener on ``port`` (RDS, direct answer) and an EDS cluster."""
    write_snapshot(
        folder / "edge.yaml",
        [
            listener("http", port, "http"),
            route_config("http", [direct("/", "over mtls")]),
            eds_cluster("backend"),
            endpoints("backend", [free_port()]),
        ],
        nodes=["edge-1", "edge-2"],
    )


def secrets_config(folder: Path) -> None:
    """Node groups edge-a and edge-b, each with a secret of its own."""
    for node in ("a", "b"):
        write_snapshot(
            folder / f"{node}.yaml",
            [
                {
                    "@type": SDS_URL,
                    "name": f"{node}-secret",
                    "generic_secret": {"secret": {"inline_string": f"secret of {node}"}},
                }
            ],
            nodes=[f"edge-{node}"],
        )


def mtls_server(procs: ProcessGroup, tmp_path: Path, certs: Path) -> tuple[XdsServer, int]:
    config = tmp_path / "config"
    port = free_port()
    edge_config(config, port)
    secrets_config(config)
    return XdsServer(procs, config, extra_args=tls_args(certs)).start(), port


def mtls_envoy(
    procs: ProcessGroup,
    workdir: Path,
    node: str,
    server: XdsServer,
    cert: Path | None,
    key: Path | None,
    ca: Path,
    sni: str | None = "localhost",
) -> Envoy:
    """harness.Envoy (its admin helpers), with a bootstrap made by ``xdsplane bootstrap``
    with the TLS flags. ``cert`` None: TLS without a client certificate (not something the
    CLI makes: the bootstrap's transport socket is edited)."""
    envoy = Envoy(procs, workdir, node, server.xds_address)
    args = ["bootstrap", "--node", node, "--xds-address", server.xds_address]
    args += ["--admin-address", f"{HOST}:{envoy.admin_port}"]
    args += ["--tls-cert", str(cert or certs_of(ca) / "edge-1.crt")]
    args += ["--tls-key", str(key or certs_of(ca) / "edge-1.key"), "--ca", str(ca)]
    if sni:
        args += ["--sni", sni]
    done = subprocess.run(
        xdsplane_argv(*args), capture_output=True, timeout=30, check=False, text=True
    )
    assert done.returncode == 0, done.stderr
    text = done.stdout
    if cert is None:
        import yaml

        data = yaml.safe_load(text)
        tls = data["static_resources"]["clusters"][0]["transport_socket"]["typed_config"]
        del tls["common_tls_context"]["tls_certificates"]
        text = yaml.safe_dump(data, sort_keys=False)
    envoy.bootstrap_path.write_text(text, encoding="utf-8")
    return envoy


def certs_of(ca: Path) -> Path:
    return ca.parent


def server_log(server: XdsServer) -> str:
    return server.proc.log_path.read_text(encoding="utf-8", errors="replace")


def log_events(server: XdsServer, event: str) -> list[dict[str, Any]]:
    out = []
    for line in server_log(server).splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                out.append(entry)
    return out


def connected_state(envoy: Envoy) -> int:
    envoy.proc.ensure_alive()
    return envoy.stat("control_plane.connected_state")


def never_served(server: XdsServer, envoy: Envoy) -> bool:
    """No stream ever opened and Envoy got no config. (Envoy 1.40 sets
    control_plane.connected_state to 1 when it *starts* a gRPC stream, before the TLS
    handshake, and back to 0 when it fails: the gauge blinks on each retry, so it is
    checked to be 0 at rest, not at every poll.)"""
    envoy.proc.ensure_alive()
    updates = envoy.stats(r"^(listener_manager\.lds|cluster_manager\.cds)\.update_success$")
    return (
        not log_events(server, "stream opened")
        and server.streams() == []
        and not any(updates.values())
        and envoy.dynamic_listener_names() == set()
    )


# -- pure: the identity mapping -----------------------------------------------------------------


def test_identity_mapping(certs: Path) -> None:
    edge1 = xds_identity.from_pem((certs / "edge-1.crt").read_bytes())
    assert edge1.uris == ("spiffe://xdsplane/node/edge-1",)
    assert edge1.speaks_for("edge-1")
    assert not edge1.speaks_for("edge-2") and not edge1.speaks_for("")
    assert xds_identity.refusal(edge1, "edge-1") is None
    reason, message = xds_identity.refusal(edge1, "edge-2") or ("", "")
    assert reason == xds_identity.NODE_ID_MISMATCH
    assert "spiffe://xdsplane/node/edge-2" in message
    edge_b = xds_identity.from_pem((certs / "edge-b.crt").read_bytes())
    assert edge_b.speaks_for("edge-b")  # a DNS SAN equal to the node id
    assert edge_b.sans() == ["DNS:edge-b"]
    wildcard = xds_identity.PeerIdentity("CN=w", dns=("*",))
    assert not wildcard.speaks_for("*")
    assert xds_identity.refusal(None, "edge-1") == (
        xds_identity.NO_CLIENT_CERTIFICATE,
        "a client certificate is required",
    )
    assert xds_identity.peer_identity({}) is None
    pem = (certs / "edge-1.crt").read_bytes()
    assert xds_identity.peer_identity({"x509_pem_cert": [pem]}) == edge1


def test_sample_pki_has_the_xds_certificates(certs: Path) -> None:
    server = xds_identity.from_pem((certs / "xds-server.crt").read_bytes())
    assert server.dns == ("localhost",) and server.ips == ("127.0.0.1",)
    names = [s.name for s in pki.SAMPLE]
    assert names[:6] == ["client-ca", "service-ca", "edge", "gateway", "billing", "alice"]
    assert {"xds-server", "edge-1"} <= set(names)


def test_bootstrap_tls(certs: Path) -> None:
    tls = XdsTls.from_flags(
        str(certs / "edge-1.crt"), str(certs / "edge-1.key"), str(certs / "service-ca.crt"), "x"
    )
    assert tls is not None
    cluster = bootstrap("edge-1", tls=tls)["static_resources"]["clusters"][0]
    ctx = cluster["transport_socket"]["typed_config"]
    assert ctx["sni"] == "x"
    common = ctx["common_tls_context"]
    assert common["tls_certificates"][0]["certificate_chain"] == {
        "filename": str(certs / "edge-1.crt")
    }
    assert common["validation_context"] == {
        "trusted_ca": {"filename": str(certs / "service-ca.crt")},
        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "x"}}],
    }
    assert "transport_socket" not in bootstrap("edge-1")["static_resources"]["clusters"][0]
    with pytest.raises(ValueError, match="go together"):
        XdsTls.from_flags(str(certs / "edge-1.crt"), None, None)
    with pytest.raises(ValueError, match="no such file"):
        XdsTls.from_flags("/nonexistent.crt", "/nonexistent.key", str(certs / "service-ca.crt"))


def test_cli_flags_go_together(tmp_path: Path, certs: Path) -> None:
    serve = subprocess.run(
        xdsplane_argv("serve", "--config", str(tmp_path), "--tls-cert", str(certs / "x.crt")),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert serve.returncode == 2
    assert "--tls-key, --client-ca" in serve.stderr
    secrets_config(tmp_path / "config")
    bad = tls_args(certs)
    bad[bad.index("--client-ca") + 1] = str(certs / "edge-1.crt")  # not a CA
    serve = subprocess.run(
        xdsplane_argv("serve", "--config", str(tmp_path / "config"), *bad),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert serve.returncode == 1
    assert "--client-ca" in serve.stderr and "is not a CA" in serve.stderr
    assert "not starting: bad xDS TLS files" in serve.stderr
    boot = subprocess.run(
        xdsplane_argv("bootstrap", "--node", "n", "--sni", "localhost"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert boot.returncode == 2 and "--sni needs" in boot.stderr
    helptext = subprocess.run(
        xdsplane_argv("serve", "--help"), capture_output=True, text=True, timeout=30, check=True
    ).stdout
    assert "spiffe://xdsplane/node/<node-id>" in " ".join(helptext.split())


# -- a real Envoy -------------------------------------------------------------------------------


@envoy_only
def test_envoy_with_its_certificate_gets_its_config(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    server, port = mtls_server(procs, tmp_path, certs)
    envoy = mtls_envoy(
        procs,
        tmp_path,
        "edge-1",
        server,
        certs / "edge-1.crt",
        certs / "edge-1.key",
        certs / "service-ca.crt",
    ).start()
    wait_until(lambda: "http" in envoy.dynamic_listener_names(), 15, what="listener over mTLS")
    wait_until(lambda: server.settled("edge-1"), 15, what="every type ACKed")
    wait_until(lambda: http_get(port, "/").text == "over mtls", 15, what="listener answers")
    assert envoy.connected()
    assert server.status()["refused"] == {}


@envoy_only
def test_envoy_without_a_client_certificate_never_connects(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    server, _ = mtls_server(procs, tmp_path, certs)
    envoy = mtls_envoy(procs, tmp_path, "edge-1", server, None, None, certs / "service-ca.crt")
    envoy.proc.start()
    wait_until(
        lambda: "Handshake failed" in server_log(server), 15, what="server logs the TLS failure"
    )
    assert "PEER_DID_NOT_RETURN_A_CERTIFICATE" in server_log(server)
    wait_until(lambda: connected_state(envoy) == 0, 10, what="envoy admin up, not connected")
    holds_for(lambda: never_served(server, envoy), 2.0, what="envoy never gets a stream")
    assert server.status()["refused"] == {}  # refused by the TLS handshake, before gRPC


@envoy_only
def test_certificate_of_another_ca_is_refused(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    server, _ = mtls_server(procs, tmp_path, certs)
    envoy = mtls_envoy(
        procs,
        tmp_path,
        "edge-1",
        server,
        certs / "rogue-edge-1.crt",
        certs / "rogue-edge-1.key",
        certs / "service-ca.crt",
    )
    envoy.proc.start()
    wait_until(
        lambda: "Handshake failed" in server_log(server), 15, what="server logs the TLS failure"
    )
    wait_until(lambda: connected_state(envoy) == 0, 10, what="envoy admin up, not connected")
    holds_for(lambda: never_served(server, envoy), 2.0, what="envoy never gets a stream")
    assert server.status()["refused"] == {}  # refused by the TLS handshake, before gRPC


@envoy_only
def test_certificate_naming_another_node_is_permission_denied(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    server, _ = mtls_server(procs, tmp_path, certs)
    # edge-1's valid certificate, used by an Envoy that says it is edge-2.
    envoy = mtls_envoy(
        procs,
        tmp_path,
        "edge-2",
        server,
        certs / "edge-1.crt",
        certs / "edge-1.key",
        certs / "service-ca.crt",
    )
    envoy.proc.start()
    refused = wait_until(
        lambda: server.status()["refused"].get("node_id_mismatch"), 15, what="counted refusal"
    )
    assert refused >= 1
    entry = wait_until(lambda: log_events(server, "stream refused"), 5, what="log line")[0]
    assert entry["node"] == "edge-2"
    assert entry["reason"] == "node_id_mismatch"
    assert entry["sans"] == ["URI:spiffe://xdsplane/node/edge-1"]
    assert entry["level"] == "warning"
    holds_for(lambda: server.streams("edge-2") == [], 1.0, what="no stream stays open")
    wait_until(lambda: envoy.admin("/ready").status, 10, what="envoy admin up")
    assert envoy.dynamic_listener_names() == set()
    assert log_events(server, "push") == []


# -- a direct gRPC client: secrets stay within their node group ---------------------------------


@dataclass
class Client:
    channel: grpc.aio.Channel

    @classmethod
    def open(cls, server: XdsServer, certs: Path, name: str) -> Client:
        creds = grpc.ssl_channel_credentials(
            (certs / "service-ca.crt").read_bytes(),
            (certs / f"{name}.key").read_bytes(),
            (certs / f"{name}.crt").read_bytes(),
        )
        channel = grpc.aio.secure_channel(
            server.xds_address, creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        return cls(channel)

    def stream(self) -> Stream:
        return Stream.open(self.channel, "sotw")


def sds_request(node: str, names: list[str]) -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=SDS_URL, resource_names=names)
    req.node.id = node
    return req


def secret_names(responses: list[discovery_pb2.DiscoveryResponse]) -> list[str]:
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    names = []
    for r in responses:
        for any_ in r.resources:
            s = secret_pb2.Secret()
            any_.Unpack(s)
            names.append(s.name)
    return names


@pytest.fixture
def secrets_server(procs: ProcessGroup, tmp_path: Path, certs: Path) -> Iterator[XdsServer]:
    config = tmp_path / "config"
    secrets_config(config)
    yield XdsServer(procs, config, extra_args=tls_args(certs)).start()


def test_node_never_gets_another_groups_secret(secrets_server: XdsServer, certs: Path) -> None:
    async def scenario() -> None:
        # edge-b's own secret exists under that name: edge-b gets it.
        b = Client.open(secrets_server, certs, "edge-b")
        call = b.stream()
        await call.write(sds_request("edge-b", ["b-secret"]))
        first = await call.read(10)
        assert secret_names([first]) == ["b-secret"]
        call.cancel()
        await b.channel.close()

        # edge-a asks for it by name: nothing comes back; its own secret does.
        a = Client.open(secrets_server, certs, "edge-a")
        call = a.stream()
        await call.write(sds_request("edge-a", ["b-secret"]))
        assert secret_names(await call.within(1.5)) == []
        await call.write(sds_request("edge-a", ["a-secret", "b-secret"]))
        got = await call.read(10)
        assert secret_names([got]) == ["a-secret"]
        assert secret_names(await call.within(1.0)) == []
        call.cancel()
        await a.channel.close()

        # edge-a's certificate cannot claim to be edge-b either.
        a = Client.open(secrets_server, certs, "edge-a")
        call = a.stream()
        await call.write(sds_request("edge-b", ["b-secret"]))
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await call.read(10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "spiffe://xdsplane/node/edge-b" in str(denied.value.details())
        call.cancel()
        await a.channel.close()

    asyncio.run(scenario())
    assert secrets_server.status()["refused"] == {"node_id_mismatch": 1}
