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
from xdsplane.bootstrap import XdsClientTls, bootstrap

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
    cluster: str | None = None,
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
    if cluster is not None:
        args += ["--cluster", cluster]
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


def test_cluster_proof_and_identity_only_selection() -> None:
    """Pure: which cluster may select, and a watch keeps the selector it was made with."""
    from xdsplane.cache import SnapshotCache
    from xdsplane.snapshot import NodeGroup, Snapshot, SnapshotSet

    proven = xds_identity.PeerIdentity(
        "CN=c", uris=(xds_identity.node_uri("edge-c"), xds_identity.cluster_uri("edge-a"))
    )
    assert xds_identity.cluster_uri("edge-a") == "spiffe://xdsplane/cluster/edge-a"
    assert xds_identity.selection_cluster(proven, "edge-a") == "edge-a"
    assert xds_identity.selection_cluster(proven, "edge-b") is None
    assert xds_identity.selection_cluster(proven, "") is None
    dns_only = xds_identity.PeerIdentity("CN=b", dns=("edge-b", "edge-a"))
    assert xds_identity.selection_cluster(dns_only, "edge-a") is None  # DNS proves no cluster
    node_uri_only = xds_identity.PeerIdentity("CN=a", uris=(xds_identity.node_uri("edge-a"),))
    assert xds_identity.selection_cluster(node_uri_only, "edge-a") is None

    empty = Snapshot.build([])
    a, b = NodeGroup("a", ("edge-a",), empty), NodeGroup("b", ("edge-b",), empty)
    assert a.matches("edge-b", "edge-a") and not a.matches("edge-b", None)
    cache = SnapshotCache()
    cache.update(SnapshotSet((a, b)))
    assert cache.group_for("edge-b", "edge-a") is a
    assert cache.group_for("edge-b", None) is b
    woken: list[str] = []
    watch = cache.watch("edge-b", None, lambda: woken.append("b"))
    # A reload that would make cluster "edge-x" select group a: the id-only watch stays on b.
    a2 = NodeGroup("a", ("edge-a", "edge-x"), Snapshot.build([]))
    cache.update(SnapshotSet((a2, b)))
    assert woken == [] and cache.lookup(watch.node_id, watch.cluster) is b.snapshot


def test_sample_pki_has_the_xds_certificates(certs: Path) -> None:
    server = xds_identity.from_pem((certs / "xds-server.crt").read_bytes())
    assert server.dns == ("localhost",) and server.ips == ("127.0.0.1",)
    names = [s.name for s in pki.SAMPLE]
    assert names[:6] == ["client-ca", "service-ca", "edge", "gateway", "billing", "alice"]
    assert {"xds-server", "edge-1"} <= set(names)


def test_bootstrap_tls(certs: Path) -> None:
    tls = XdsClientTls.from_flags(
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
        XdsClientTls.from_flags(str(certs / "edge-1.crt"), None, None)
    with pytest.raises(ValueError, match="no such file"):
        XdsClientTls.from_flags(
            "/nonexistent.crt", "/nonexistent.key", str(certs / "service-ca.crt")
        )


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
        assert "spiffe://xdsplane/node/edge-b" in await expect_denied(call)
        call.cancel()
        await a.channel.close()

    asyncio.run(scenario())
    assert secrets_server.status()["refused"] == {"node_id_mismatch": 1}


# -- identity decides the group: node.cluster only when the certificate proves it -------------

ECDS_URL = "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
JWT_URL = "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication"


def group_resources(node: str, secret_value: str = "") -> list[dict[str, Any]]:
    """Group ``edge-<node>``'s own Secret (its "private key") and ECDS filter config."""
    return [
        {
            "@type": SDS_URL,
            "name": f"{node}-secret",
            "generic_secret": {
                "secret": {"inline_string": secret_value or f"private key of {node}"}
            },
        },
        {
            "@type": ECDS_URL,
            "name": f"{node}-filter",
            "typed_config": {
                "@type": JWT_URL,
                "providers": {"idp": {"issuer": f"https://{node}.example.com"}},
            },
        },
    ]


def write_groups(folder: Path, a_nodes: list[str] | None = None, b_value: str = "") -> None:
    """Groups edge-a (first in file order) and edge-b, each with its own Secret and ECDS."""
    write_snapshot(folder / "a.yaml", group_resources("a"), nodes=a_nodes or ["edge-a"])
    write_snapshot(folder / "b.yaml", group_resources("b", b_value), nodes=["edge-b"])


def issue_cluster_certs(certs: Path) -> None:
    """edge-c speaks for node edge-c and proves cluster edge-a; edge-d proves edge-z."""
    node_uri, cluster_uri = xds_identity.node_uri, xds_identity.cluster_uri
    for name, cluster in (("edge-c", "edge-a"), ("edge-d", "edge-z")):
        uris = [node_uri(name), cluster_uri(cluster)]
        pki.issue(certs, name, "service-ca", uris=uris, usage=("client",))


@pytest.fixture
def groups_server(procs: ProcessGroup, tmp_path: Path, certs: Path) -> Iterator[XdsServer]:
    issue_cluster_certs(certs)
    config = tmp_path / "config"
    write_groups(config)
    yield XdsServer(procs, config, extra_args=tls_args(certs)).start()


def request_of(variant: str, type_url: str, node: str, cluster: str, names: list[str]) -> Any:
    if variant == "sotw":
        req: Any = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names)
    else:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names)
    req.node.id = node
    req.node.cluster = cluster
    return req


def names_in(responses: list[Any]) -> list[str]:
    """Every resource name in SotW or delta responses (Secret or TypedExtensionConfig)."""
    from envoy.config.core.v3 import extension_pb2
    from envoy.extensions.transport_sockets.tls.v3 import secret_pb2

    out = []
    for r in responses:
        packed = (
            [x.resource for x in r.resources]
            if hasattr(r, "system_version_info")
            else list(r.resources)
        )
        for any_ in packed:
            msg: Any = (
                secret_pb2.Secret()
                if any_.type_url == SDS_URL
                else extension_pb2.TypedExtensionConfig()
            )
            assert any_.Unpack(msg)
            out.append(msg.name)
    return out


async def expect_denied(call: Any) -> str:
    """The first thing back on ``call`` is a PERMISSION_DENIED refusal (no resource at all);
    its details."""
    with pytest.raises(grpc.aio.AioRpcError) as denied:
        await call.read(10)
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    return str(denied.value.details())


def open_stream(server: XdsServer, certs: Path, cert: str, variant: str) -> tuple[Client, Stream]:
    client = Client.open(server, certs, cert)
    return client, Stream.open(client.channel, variant)


KINDS = {"SDS": (SDS_URL, "secret"), "ECDS": (ECDS_URL, "filter")}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_a_certificate_for_edge_b_claiming_cluster_edge_a_gets_nothing_of_edge_a(
    variant: str, kind: str, groups_server: XdsServer, certs: Path
) -> None:
    """The review's attack: edge-b's valid certificate, node edge-b, cluster edge-a (which
    group edge-a's glob matches, and which comes first): refused, nothing of edge-a sent."""
    type_url, suffix = KINDS[kind]
    wanted = [f"a-{suffix}", f"b-{suffix}"]

    async def scenario() -> None:
        client, call = open_stream(groups_server, certs, "edge-b", variant)
        await call.write(request_of(variant, type_url, "edge-b", "edge-a", wanted))
        details = await expect_denied(call)  # the first thing back is the refusal: no resource
        assert "spiffe://xdsplane/cluster/edge-a" in details
        assert "a-" not in details  # no group name, no resource name
        call.cancel()
        # Other spellings of the same claim: a glob, the catch-all, another case.
        for cluster in ("edge-?", "*", "edge-[a]"):
            call = Stream.open(client.channel, variant)
            await call.write(request_of(variant, type_url, "edge-b", cluster, wanted))
            received = await call.within(1.0)
            assert "a-" + suffix not in names_in([r for r in received if r is not None])
            call.cancel()
        # The same certificate with its own cluster (or none) gets edge-b's, never edge-a's.
        for cluster in ("edge-b", "", "elsewhere"):
            call = Stream.open(client.channel, variant)
            await call.write(request_of(variant, type_url, "edge-b", cluster, wanted))
            got = await call.read(10)
            assert names_in([got]) == [f"b-{suffix}"], cluster
            assert names_in(await call.within(0.5)) == []
            call.cancel()
        await client.channel.close()

    asyncio.run(scenario())
    refused = groups_server.status()["refused"]
    assert refused == {"cluster_not_proven": 1}, refused
    entry = wait_until(lambda: log_events(groups_server, "stream refused"), 5, what="log")[0]
    assert entry["reason"] == "cluster_not_proven" and entry["level"] == "warning"
    assert (entry["node"], entry["cluster"]) == ("edge-b", "edge-a")
    assert (entry["group_by_node_id"], entry["group_by_cluster"]) == ("edge-b", "edge-a")
    assert entry["sans"] == ["DNS:edge-b"]
    opened = log_events(groups_server, "stream opened")
    assert len(opened) == 6 and {e["group"] for e in opened} == {"edge-b"}, opened


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_a_cluster_proven_by_a_uri_san_selects_by_cluster(
    variant: str, kind: str, groups_server: XdsServer, certs: Path
) -> None:
    type_url, suffix = KINDS[kind]
    wanted = [f"a-{suffix}", f"b-{suffix}"]

    async def scenario() -> None:
        # edge-c's certificate proves cluster edge-a: it is served group edge-a.
        client, call = open_stream(groups_server, certs, "edge-c", variant)
        await call.write(request_of(variant, type_url, "edge-c", "edge-a", wanted))
        assert names_in([await call.read(10)]) == [f"a-{suffix}"]
        call.cancel()
        await client.channel.close()
        # edge-d's proves edge-z, not edge-a: the unproven cluster would select a group
        # (edge-d's id selects none), so it is refused.
        client, call = open_stream(groups_server, certs, "edge-d", variant)
        await call.write(request_of(variant, type_url, "edge-d", "edge-a", wanted))
        await expect_denied(call)
        call.cancel()
        await client.channel.close()

    asyncio.run(scenario())
    assert groups_server.status()["refused"] == {"cluster_not_proven": 1}


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_a_reload_that_makes_the_unproven_cluster_match_does_not_leak(
    variant: str, groups_server: XdsServer, certs: Path
) -> None:
    """edge-b's certificate with cluster edge-x is admitted (edge-x selects nothing, so it
    changes nothing) and served by its node id. Then the policy makes group edge-a (first
    in order) select edge-x: the open stream stays on edge-b's group, a new one is refused."""
    wanted = ["a-secret", "b-secret"]
    config = groups_server.config

    def reloaded(count: int) -> bool:
        return int(groups_server.status()["reload"]["successes"]) > count

    async def scenario() -> None:
        client, call = open_stream(groups_server, certs, "edge-b", variant)
        await call.write(request_of(variant, SDS_URL, "edge-b", "edge-x", wanted))
        first = await call.read(10)
        assert names_in([first]) == ["b-secret"]
        ack: Any = request_of(variant, SDS_URL, "", "", [])
        ack.ClearField("node")
        if variant == "sotw":
            ack.resource_names.extend(wanted)
            ack.version_info = first.version_info
        ack.response_nonce = first.nonce
        await call.write(ack)

        count = int(groups_server.status()["reload"]["successes"])
        write_snapshot(config / "a.yaml", group_resources("a"), nodes=["edge-a", "edge-x"])
        await asyncio.to_thread(wait_until, lambda: reloaded(count), 10, what="reload")
        count += 1
        write_snapshot(config / "b.yaml", group_resources("b", "rotated"), nodes=["edge-b"])
        await asyncio.to_thread(wait_until, lambda: reloaded(count), 10, what="reload")
        # The stream follows edge-b's group (the rotated secret) and gets nothing of edge-a.
        got = await call.read(10)
        assert names_in([got]) == ["b-secret"]
        assert b"rotated" in got.SerializeToString()
        assert names_in(await call.within(1.0)) == []
        call.cancel()
        # A new stream with the same claim now would change the group: refused.
        call = Stream.open(client.channel, variant)
        await call.write(request_of(variant, SDS_URL, "edge-b", "edge-x", wanted))
        await expect_denied(call)
        call.cancel()
        await client.channel.close()

    asyncio.run(scenario())
    assert groups_server.status()["refused"] == {"cluster_not_proven": 1}


def edge_a_listener_config(config: Path, port: int) -> None:
    """Group edge-a: a listener answering "edge-a only", and its Secret and ECDS; edge-b:
    its Secret and ECDS."""
    write_snapshot(
        config / "a.yaml",
        [
            listener("http", port, "http"),
            route_config("http", [direct("/", "edge-a only")]),
            *group_resources("a"),
        ],
        nodes=["edge-a"],
    )
    write_snapshot(config / "b.yaml", group_resources("b"), nodes=["edge-b"])


@envoy_only
def test_envoy_with_edge_bs_certificate_and_cluster_edge_a_gets_nothing(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    """A real Envoy as the attacker: group edge-a has a listener and a Secret; an Envoy with
    edge-b's certificate bootstrapped with --cluster edge-a is refused, and gets neither."""
    config = tmp_path / "config"
    edge_a_listener_config(config, free_port())
    server = XdsServer(procs, config, extra_args=tls_args(certs)).start()
    envoy = mtls_envoy(
        procs,
        tmp_path,
        "edge-b",
        server,
        certs / "edge-b.crt",
        certs / "edge-b.key",
        certs / "service-ca.crt",
        cluster="edge-a",
    )
    envoy.proc.start()
    wait_until(lambda: server.status()["refused"].get("cluster_not_proven"), 15, what="refused")
    wait_until(lambda: envoy.admin("/ready").status, 10, what="envoy admin up")
    holds_for(
        lambda: envoy.dynamic_listener_names() == set() and server.streams("edge-b") == [],
        2.0,
        what="nothing of edge-a reaches the Envoy",
    )
    assert log_events(server, "push") == []
    dump = json.dumps(envoy.config_dump())
    assert "edge-a only" not in dump and "private key of a" not in dump


@envoy_only
def test_envoy_whose_certificate_proves_its_cluster_is_served_by_cluster(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    """edge-c's certificate carries spiffe://xdsplane/cluster/edge-a: an Envoy with node
    edge-c and --cluster edge-a is served group edge-a (its listener answers)."""
    issue_cluster_certs(certs)
    config = tmp_path / "config"
    port = free_port()
    edge_a_listener_config(config, port)
    server = XdsServer(procs, config, extra_args=tls_args(certs)).start()
    envoy = mtls_envoy(
        procs,
        tmp_path,
        "edge-c",
        server,
        certs / "edge-c.crt",
        certs / "edge-c.key",
        certs / "service-ca.crt",
        cluster="edge-a",
    ).start()
    wait_until(lambda: "http" in envoy.dynamic_listener_names(), 15, what="edge-a's listener")
    wait_until(lambda: http_get(port, "/").text == "edge-a only", 15, what="listener answers")
    assert server.stream("edge-c")["group"] == "edge-a"
    assert server.status()["refused"] == {}


def test_one_certificate_holds_at_most_max_streams_per_node_the_oldest_makes_room(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    """Over mTLS a node id is its certificate's: --max-streams-per-node bounds what one
    certificate holds of --max-streams (idle streams do not count, see
    test_ads_isolation.py). A new stream past it ends the node's oldest (as a stream left
    half-open by a network break would be), so the node is never locked out."""
    issue_cluster_certs(certs)
    config = tmp_path / "config"
    write_groups(config)
    args = [*tls_args(certs), "--max-streams-per-node", "3"]
    server = XdsServer(procs, config, extra_args=args).start()
    wanted = ["a-secret", "b-secret"]

    async def scenario() -> None:
        client = Client.open(server, certs, "edge-b")
        held = []
        for variant in ("delta", "sotw", "delta", "sotw", "sotw"):
            call = Stream.open(client.channel, variant)
            await call.write(request_of(variant, SDS_URL, "edge-b", "", wanted))
            assert names_in([await call.read(10)]) == ["b-secret"]
            held.append(call)
        # The two oldest were ended, the three newest are served.
        for old in held[:2]:
            error = await old.ended(10)
            assert error is not None and error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "replaced by a newer stream of node 'edge-b'" in str(error.details())
            assert "--max-streams-per-node" in str(error.details())
        await asyncio.to_thread(
            wait_until, lambda: len(server.streams("edge-b")) == 3, 10, what="3 streams left"
        )
        ids = sorted(s["stream"] for s in server.streams("edge-b"))
        assert ids == [3, 4, 5], ids
        # Another node's streams are not touched.
        other, call = open_stream(server, certs, "edge-c", "sotw")
        await call.write(request_of("sotw", SDS_URL, "edge-c", "edge-a", ["a-secret"]))
        assert names_in([await call.read(10)]) == ["a-secret"]
        for c in [call, *held]:
            c.cancel()
        await other.channel.close()
        await client.channel.close()

    asyncio.run(scenario())
    assert server.status()["refused"] == {"max_streams_per_node": 2}
    replaced = log_events(server, "stream replaced")
    assert [(e["node"], e["replaced"], e["level"]) for e in replaced] == [
        ("edge-b", 1, "warning"),
        ("edge-b", 2, "warning"),
    ]
