"""The xDS server's own certificate, key and client CA (``serve --tls-cert --tls-key
--client-ca``) rotate without a restart: with a real Envoy connected over mTLS, its stream
stays (no reconnect), while new handshakes get the new files; files that do not check out
are refused with an error naming them, and the previous credentials keep serving.

New handshakes are looked at two ways: a bare TLS handshake (Python's ``ssl``, presenting a
client certificate) shows the serial the server presents, and a scripted ADS client
(``ads_client.Stream`` over grpc.aio) shows a stream is served over it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import threading
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
    listener,
    route_config,
    wait_until,
    write_snapshot,
    xdsplane_argv,
)
from tls_helpers import assert_no_key_material, client_context, file_serial, handshake

from xdsplane import pki, xds_identity

CDS_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
PORTS: dict[Path, int] = {}  # each test's listener port (and its unused endpoint)

pytestmark = pytest.mark.envoy  # conftest: skipped without Envoy 1.40, failed in CI


# -- the PKI, the server, the Envoy --------------------------------------------------------------


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    """The sample PKI (service-ca, xds-server, edge-1) plus edge-2 (service-ca) and a second
    CA, ``new-ca``, with a client certificate for edge-2 of its own."""
    d = tmp_path / "certs"
    pki.init(d)
    uri = xds_identity.node_uri("edge-2")
    pki.issue(d, "edge-2", "service-ca", uris=[uri], usage=("client",))
    pki.issue(d, "new-ca", None, days=30)
    pki.issue(d, "edge-2-new", "new-ca", uris=[uri], usage=("client",))
    return d


def config_folder(tmp_path: Path, extra: str = "") -> Path:
    """The policy: a listener and an EDS cluster for edge-1 and edge-2; ``extra`` adds a
    second cluster (an edit, to see that a stream still carries pushes)."""
    folder = tmp_path / "config"
    resources = [
        listener("http", PORTS.setdefault(tmp_path, free_port()), "http"),
        route_config("http", [direct("/", "over mtls")]),
        eds_cluster("backend"),
        endpoints("backend", [PORTS[tmp_path]]),
    ]
    if extra:
        resources += [eds_cluster(extra), endpoints(extra, [PORTS[tmp_path]])]
    write_snapshot(folder / "edge.yaml", resources, nodes=["edge-1", "edge-2"])
    return folder


def start_server(procs: ProcessGroup, tmp_path: Path, cert: Path, key: Path, ca: Path) -> XdsServer:
    args = ["--tls-cert", str(cert), "--tls-key", str(key), "--client-ca", str(ca)]
    return XdsServer(procs, config_folder(tmp_path), extra_args=args).start()


def start_envoy(
    procs: ProcessGroup,
    tmp_path: Path,
    server: XdsServer,
    certs: Path,
    node: str = "edge-1",
    cert: str = "edge-1",
) -> Envoy:
    """NODE over mTLS with CERT (bootstrap by ``xdsplane bootstrap --tls-cert --tls-key
    --ca``), connected and with every type ACKed."""
    envoy = Envoy(procs, tmp_path, node, server.xds_address)
    args = ["bootstrap", "--node", node, "--xds-address", server.xds_address]
    args += ["--admin-address", f"{HOST}:{envoy.admin_port}"]
    args += ["--tls-cert", str(certs / f"{cert}.crt"), "--tls-key", str(certs / f"{cert}.key")]
    args += ["--ca", str(certs / "service-ca.crt"), "--sni", "localhost"]
    done = subprocess.run(
        xdsplane_argv(*args), capture_output=True, timeout=30, check=False, text=True
    )
    assert done.returncode == 0, done.stderr
    envoy.bootstrap_path.write_text(done.stdout, encoding="utf-8")
    envoy.start()
    wait_until(lambda: server.settled(node), 20, what=f"{node} ACKed every type over mTLS")
    assert envoy.connected()
    return envoy


# -- what is observed --------------------------------------------------------------------------


def served_serial(server: XdsServer, certs: Path) -> int:
    """The serial of the certificate a new TLS handshake gets from the xDS port."""
    ctx = client_context(certs, "edge-1", ca="service-ca")
    ctx.set_alpn_protocols(["h2"])
    return handshake(server.xds_port, ctx, "localhost").serial


def ads_stream(server: XdsServer, certs: Path, client: str) -> str:
    """A new gRPC connection as node edge-2 with ``client``'s certificate asks for CDS:
    "served" when a response comes, else the gRPC status code of the failure."""

    async def scenario() -> str:
        creds = grpc.ssl_channel_credentials(
            (certs / "service-ca.crt").read_bytes(),
            (certs / f"{client}.key").read_bytes(),
            (certs / f"{client}.crt").read_bytes(),
        )
        channel = grpc.aio.secure_channel(
            server.xds_address, creds, options=[("grpc.ssl_target_name_override", "localhost")]
        )
        call = Stream.open(channel, "sotw", timeout=10)
        try:
            req = discovery_pb2.DiscoveryRequest(type_url=CDS_URL)
            req.node.id = "edge-2"
            await call.write(req)
            response = await call.read(10)
            assert response.type_url == CDS_URL
            return "served"
        except grpc.aio.AioRpcError as e:
            return e.code().name
        finally:
            call.cancel()
            await channel.close()

    return asyncio.run(scenario())


def xds_tls(server: XdsServer) -> dict[str, Any]:
    found: dict[str, Any] = server.status()["xds_tls"]
    return found


def log_events(server: XdsServer, event: str) -> list[dict[str, Any]]:
    out = []
    for line in server.proc.log_path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("{"):
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == event:
                out.append(entry)
    return out


class Steady:
    """Envoy's stream to the control plane, watched while files change: its
    ``control_plane.connected_state`` sampled every 20 ms (any value but 1 is kept), and
    at the end the same xDS connection count and the same stream in /status."""

    def __init__(self, server: XdsServer, envoy: Envoy) -> None:
        self.server, self.envoy = server, envoy
        self.streams = [s["stream"] for s in server.streams("edge-1")]
        self.connections = envoy.stat("cluster.xds_cluster.upstream_cx_total")
        assert len(self.streams) == 1 and self.connections == 1
        self.off: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            state = self.envoy.stat("control_plane.connected_state")
            if state != 1:
                self.off.append(state)
            self._stop.wait(0.02)

    def __enter__(self) -> Steady:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        assert self.off == [], f"Envoy's xDS stream went down: connected_state {self.off}"
        assert self.envoy.stat("cluster.xds_cluster.upstream_cx_total") == self.connections
        assert [s["stream"] for s in self.server.streams("edge-1")] == self.streams
        assert self.envoy.connected()


def no_keys_shown(server: XdsServer, certs: Path, old_keys: list[bytes]) -> None:
    log = server.proc.log_path.read_text(encoding="utf-8", errors="replace")
    assert_no_key_material("server log", log, certs, old_keys)
    assert_no_key_material("/status", json.dumps(server.status()), certs, old_keys)
    metrics = server._get("/metrics").text
    assert_no_key_material("/metrics", metrics, certs, old_keys)
    assert_no_key_material("status page", server._get("/").text, certs, old_keys)


def k8s_mount(folder: Path, version: str, files: dict[str, bytes]) -> None:
    """A Kubernetes-style secret volume: FOLDER/..VERSION/ holds the files, ``..data``
    links to it and each file name links to ``..data/NAME``; called again, it swaps
    ``..data`` to the new version in one rename and deletes the old one, as the kubelet
    does."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"..{version}"
    target.mkdir()
    for name, data in files.items():
        (target / name).write_bytes(data)
        os.chmod(target / name, 0o600)
    data = folder / "..data"
    previous = folder / os.readlink(data) if data.is_symlink() else None
    tmp = folder / "..data_tmp"
    tmp.symlink_to(target.name)
    os.replace(tmp, data)
    if previous is not None:
        shutil.rmtree(previous)
    for name in files:
        link = folder / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)


# -- the server certificate ----------------------------------------------------------------------


def test_server_certificate_rotates_under_a_connected_envoy(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    client_ca = certs / "xds-client-ca.crt"
    shutil.copy(certs / "service-ca.crt", client_ca)
    cert, key = certs / "xds-server.crt", certs / "xds-server.key"
    server = start_server(procs, tmp_path, cert, key, client_ca)
    envoy = start_envoy(procs, tmp_path, server, certs)
    old_serial, old_key = file_serial(cert), key.read_bytes()
    assert served_serial(server, certs) == old_serial
    status = xds_tls(server)
    assert int(status["certificate"]["serial"], 16) == old_serial
    assert status["files"] == {
        "--tls-cert": str(cert),
        "--tls-key": str(key),
        "--client-ca": str(client_ca),
    }
    loaded = log_events(server, "xds tls loaded")
    assert loaded and loaded[0]["fingerprint_sha256"] == status["certificate"]["fingerprint_sha256"]

    with Steady(server, envoy):
        pki.rotate(certs, "xds-server")  # new key and serial, same CA; key file first
        new_serial = file_serial(cert)
        assert new_serial != old_serial
        # A new handshake gets it (polled: the watch debounces), and /status says so.
        wait_until(
            lambda: served_serial(server, certs) == new_serial,
            10,
            interval=0.1,
            what="a new handshake gets the new server certificate",
        )
        status = xds_tls(server)
        assert status["certificate"]["serial"] == f"{new_serial:x}"
        assert ads_stream(server, certs, "edge-2") == "served"
        # A second real Envoy connects over the new certificate.
        second = start_envoy(procs, tmp_path, server, certs, "edge-2", "edge-2")
        assert second.connected()

    # One reload, and the half-way state (new key, old certificate) was never refused.
    assert status["reloads"] == 1 and status["errors"] == [] and status["failures"] == 0
    entry = log_events(server, "xds tls reloaded")[-1]
    assert entry["cert"] == str(cert) and entry["key"] == str(key)
    assert entry["serial"] == f"{new_serial:x}"
    assert entry["fingerprint_sha256"] == status["certificate"]["fingerprint_sha256"]
    assert entry["not_after"] == status["certificate"]["not_after"]
    metrics = server._get("/metrics").text
    assert f'serial="{new_serial:x}"' in metrics
    assert f'serial="{old_serial:x}"' not in metrics
    assert 'xdsplane_xds_tls_reloads_total{result="success"} 1.0' in metrics
    # Envoy is still served over the stream it had: a policy change reaches it.
    config_folder(tmp_path, extra="extra")
    wait_until(lambda: "extra" in envoy.dynamic_cluster_names(), 15, what="push after rotation")
    no_keys_shown(server, certs, [old_key])


# -- the client CA, in a Kubernetes-style secret volume --------------------------------------------


def test_client_ca_bundle_swapped_by_a_symlink_rotation(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    mount = tmp_path / "xds-tls"
    files = {
        "tls.crt": (certs / "xds-server.crt").read_bytes(),
        "tls.key": (certs / "xds-server.key").read_bytes(),
        "ca.crt": (certs / "service-ca.crt").read_bytes(),
    }
    k8s_mount(mount, "2026_01", files)
    server = start_server(procs, tmp_path, mount / "tls.crt", mount / "tls.key", mount / "ca.crt")
    envoy = start_envoy(procs, tmp_path, server, certs)
    # A client of new-ca is refused by the TLS handshake; one of service-ca is served.
    assert ads_stream(server, certs, "edge-2-new") == "UNAVAILABLE"
    assert ads_stream(server, certs, "edge-2") == "served"
    assert len(xds_tls(server)["client_cas"]) == 1

    with Steady(server, envoy):
        bundle = files["ca.crt"] + (certs / "new-ca.crt").read_bytes()
        k8s_mount(mount, "2026_02", {**files, "ca.crt": bundle})
        wait_until(
            lambda: ads_stream(server, certs, "edge-2-new") == "served",
            10,
            interval=0.1,
            what="a client of the new CA is served",
        )
        status = xds_tls(server)
        assert len(status["client_cas"]) == 2
        assert ads_stream(server, certs, "edge-2") == "served"
        # A real Envoy whose certificate is of the new CA connects too.
        start_envoy(procs, tmp_path, server, certs, "edge-2", "edge-2-new")

    subjects = [ca["subject"] for ca in status["client_cas"]]
    assert any("service-ca" in s for s in subjects) and any("new-ca" in s for s in subjects)
    assert status["certificate"]["serial"] == f"{file_serial(certs / 'xds-server.crt'):x}"
    entry = log_events(server, "xds tls reloaded")[-1]
    assert entry["client_ca"] == str(mount / "ca.crt") and len(entry["client_cas"]) == 2
    no_keys_shown(server, certs, [])


# -- files that do not check out ---------------------------------------------------------------


def test_broken_files_are_refused_and_the_last_good_ones_serve(
    procs: ProcessGroup, tmp_path: Path, certs: Path
) -> None:
    tls = tmp_path / "tls"
    tls.mkdir()
    cert, key, ca = tls / "server.crt", tls / "server.key", tls / "ca.crt"
    for src, dst in [("xds-server.crt", cert), ("xds-server.key", key), ("service-ca.crt", ca)]:
        shutil.copy(certs / src, dst)
    server = start_server(procs, tmp_path, cert, key, ca)
    envoy = start_envoy(procs, tmp_path, server, certs)
    serial = file_serial(cert)
    good_key = key.read_bytes()

    with Steady(server, envoy):
        # A key of another certificate: refused, naming the key file.
        pki.issue(tmp_path / "other", "other", None, days=30)
        other_key = (tmp_path / "other" / "other.key").read_bytes()
        pki.write_atomic(key, other_key, 0o600)
        errors = wait_until(lambda: xds_tls(server)["errors"], 10, what="key mismatch refused")
        assert len(errors) == 1
        assert f"--tls-key {key}" in errors[0] and "does not match the certificate" in errors[0]
        logged = wait_until(
            lambda: log_events(
                server, "xds tls reload failed, new handshakes still get the previous certificate"
            ),
            5,
            what="the refusal logged",
        )
        assert str(key) in logged[-1]["error"] and logged[-1]["level"] == "error"
        page = server._get("/").text
        assert "Files refused at" in page and f"--tls-key {key}" in page
        # The last good credentials still serve new handshakes.
        assert served_serial(server, certs) == serial
        assert ads_stream(server, certs, "edge-2") == "served"

        # The key put back: the error clears, nothing new to serve.
        pki.write_atomic(key, good_key, 0o600)
        wait_until(lambda: xds_tls(server)["errors"] == [], 10, what="error cleared")

        # A client CA file that is not PEM: refused, naming the file.
        pki.write_atomic(ca, b"this is not a certificate\n")
        errors = wait_until(lambda: xds_tls(server)["errors"], 10, what="garbage CA refused")
        assert errors == [f"--client-ca {ca}: ca file holds no certificate"] or errors == [
            f"--client-ca {ca}: ca file holds no valid PEM certificate"
        ]
        assert served_serial(server, certs) == serial
        assert ads_stream(server, certs, "edge-2") == "served"  # still service-ca's clients
        assert ads_stream(server, certs, "edge-2-new") == "UNAVAILABLE"

        # A certificate file of garbage PEM: refused too, naming it.
        pki.write_atomic(
            cert, b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n"
        )
        wait_until(
            lambda: any(f"--tls-cert {cert}" in e for e in xds_tls(server)["errors"]),
            10,
            what="garbage certificate refused",
        )
        assert served_serial(server, certs) == serial

        # Good files again: the errors clear, the same certificate serves.
        shutil.copy(certs / "xds-server.crt", cert)
        shutil.copy(certs / "service-ca.crt", ca)
        wait_until(lambda: xds_tls(server)["errors"] == [], 10, what="good files again")
        # SIGHUP reads them too (nothing changed on disk, so only the signal can do it).
        attempts = xds_tls(server)["attempts"]
        holds_for(lambda: xds_tls(server)["attempts"] == attempts, 0.6, what="watch is quiet")
        server.proc.send(signal.SIGHUP)
        wait_until(
            lambda: xds_tls(server)["attempts"] == attempts + 1,
            10,
            what="SIGHUP reloads the xDS TLS files",
        )
        assert xds_tls(server)["errors"] == []

    status = xds_tls(server)
    assert status["reloads"] == 0 and status["failures"] >= 3
    assert int(status["certificate"]["serial"], 16) == serial
    assert served_serial(server, certs) == serial
    metrics = server._get("/metrics").text
    assert 'xdsplane_xds_tls_reloads_total{result="failure"}' in metrics
    no_keys_shown(server, certs, [good_key, other_key])
