"""Proxyless gRPC and TLS, attacked with real grpcio: mTLS to the backend through bootstrap
certificate providers (the right SAN works, a wrong SAN fails), and the xDS channel over
mTLS, where a certificate for another node id gets no configuration. And a policy edit the
client rejects: a NACK in /status while the last good configuration keeps serving.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_helpers import Backend, grpc_bootstrap, loop_lines, run_calls, start_loop
from harness import ProcessGroup, XdsServer, holds_for, wait_until, write_atomic

from xdsplane import pki

NODE = "grpc-1"
TARGET = "billing.grpc:50051"
FIRST_RPC_SECONDS = 30.0


@pytest.fixture
def certs(tmp_path: Path) -> Path:
    d = tmp_path / "certs"
    pki.init(d)
    for node in ("grpc-1", "grpc-2"):
        pki.issue(d, node, "service-ca", uris=[f"spiffe://xdsplane/node/{node}"], usage=["client"])
    return d


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for b in started:
        b.close()


def mtls_backend(started: list[Backend], certs: Path) -> Backend:
    """The billing certificate (DNS billing.internal), client certificates of service-ca
    required."""
    creds = grpc.ssl_server_credentials(
        [((certs / "billing.key").read_bytes(), (certs / "billing.crt").read_bytes())],
        root_certificates=(certs / "service-ca.crt").read_bytes(),
        require_client_auth=True,
    )
    b = Backend("billing-tls", credentials=creds)
    started.append(b)
    return b


def tls_policy(certs: Path, address: str, sans: list[str]) -> str:
    return yaml.safe_dump(
        {
            "nodes": ["grpc-*"],
            "secrets": {
                "service-ca": {"ca": str(certs / "service-ca.crt")},
                "gateway": {
                    "certificate": str(certs / "gateway.crt"),
                    "private_key": str(certs / "gateway.key"),
                },
            },
            "grpc_services": [{"name": TARGET, "upstream": "billing"}],
            "upstreams": {
                "billing": {
                    "endpoints": [address],
                    "tls": {
                        "ca": "service-ca",
                        "certificate": "gateway",
                        "subject_alt_names": sans,
                    },
                }
            },
        },
        sort_keys=False,
    )


def test_mtls_to_the_backend_right_san_works_wrong_san_fails(
    procs: ProcessGroup, tmp_path: Path, certs: Path, backends: list[Backend]
) -> None:
    b = mtls_backend(backends, certs)
    folder = tmp_path / "policy"
    write_atomic(folder / "grpc.yaml", tls_policy(certs, b.address, ["billing.internal"]))
    server = XdsServer(procs, folder).start()
    boot = grpc_bootstrap(NODE, server.xds_address, "--policy", str(folder))
    providers = json.loads(boot)["certificate_providers"]
    assert sorted(providers) == ["gateway", "service-ca"]
    assert providers["service-ca"]["config"]["ca_certificate_file"] == str(certs / "service-ca.crt")
    assert "private_key_file" in providers["gateway"]["config"]
    ok = run_calls(boot, TARGET, 2, timeout=FIRST_RPC_SECONDS)
    assert ok["answers"] == {"billing-tls": 2}, ok
    # The backend saw the client certificate the policy named (mutual TLS).
    assert b"spiffe://example.com/gateway" in b.peers[-1]

    # The backend's certificate does not carry the SAN the policy pins: the call fails.
    write_atomic(folder / "grpc.yaml", tls_policy(certs, b.address, ["payments.internal"]))
    wait_until(lambda: server.status()["reload"]["successes"] >= 2, 15, what="the edit is served")
    calls_before = b.calls
    bad = run_calls(boot, TARGET, 2, timeout=10)
    assert bad["errors"] == {"UNAVAILABLE": 2}, bad
    assert any("SAN" in d for d in bad["details"]), bad["details"]
    assert b.calls == calls_before  # no call reached the backend


def test_without_the_providers_in_the_bootstrap_no_call_goes_out_in_plaintext(
    procs: ProcessGroup, tmp_path: Path, certs: Path, backends: list[Backend]
) -> None:
    """A bootstrap without the certificate providers the Cluster names: gRPC refuses the
    cluster; it never falls back to plaintext."""
    b = mtls_backend(backends, certs)
    folder = tmp_path / "policy"
    write_atomic(folder / "grpc.yaml", tls_policy(certs, b.address, ["billing.internal"]))
    server = XdsServer(procs, folder).start()
    boot = grpc_bootstrap(NODE, server.xds_address)  # no --policy: no providers
    out = run_calls(boot, TARGET, 1, timeout=10)
    assert out["answers"] == {}, out
    assert b.calls == 0


def tls_server_args(certs: Path) -> list[str]:
    return [
        "--tls-cert",
        str(certs / "xds-server.crt"),
        "--tls-key",
        str(certs / "xds-server.key"),
        "--client-ca",
        str(certs / "service-ca.crt"),
    ]


def plain_policy(address: str) -> str:
    return yaml.safe_dump(
        {
            "nodes": ["grpc-*"],
            "grpc_services": [{"name": TARGET, "upstream": "billing"}],
            "upstreams": {"billing": {"endpoints": [address]}},
        }
    )


def test_xds_over_mtls_binds_the_node_id_to_the_certificate(
    procs: ProcessGroup, tmp_path: Path, certs: Path, backends: list[Backend]
) -> None:
    b = Backend("alpha")
    backends.append(b)
    folder = tmp_path / "policy"
    write_atomic(folder / "grpc.yaml", plain_policy(b.address))
    server = XdsServer(procs, folder, extra_args=tls_server_args(certs)).start()

    def bootstrap(node: str, cert: str) -> str:
        boot = grpc_bootstrap(
            node,
            server.xds_address,
            "--tls-cert",
            str(certs / f"{cert}.crt"),
            "--tls-key",
            str(certs / f"{cert}.key"),
            "--ca",
            str(certs / "service-ca.crt"),
        )
        creds = json.loads(boot)["xds_servers"][0]["channel_creds"][0]
        assert creds["type"] == "tls" and creds["config"]["certificate_file"].endswith(
            f"{cert}.crt"
        )
        return boot

    # grpc-1 with its own certificate: served over mTLS.
    ok = run_calls(bootstrap("grpc-1", "grpc-1"), TARGET, 1, timeout=FIRST_RPC_SECONDS)
    assert ok["answers"] == {"alpha": 1}, ok
    assert server.status()["refused"] == {}

    # grpc-1 claimed with grpc-2's certificate: refused, nothing served, counted.
    bad = run_calls(bootstrap("grpc-1", "grpc-2"), TARGET, 1, timeout=5)
    assert bad["answers"] == {}, bad
    refused = wait_until(
        lambda: server.status()["refused"].get("node_id_mismatch"), 15, what="counted refusal"
    )
    assert refused >= 1
    assert b.calls == 1


def test_a_plaintext_bootstrap_off_loopback_is_refused() -> None:
    import subprocess

    from harness import xdsplane_argv

    argv = xdsplane_argv("bootstrap", "--grpc", "--node", NODE, "--xds-address", "10.0.0.7:18000")
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert "plaintext" in done.stderr and done.stdout == ""
    done = subprocess.run([*argv, "--insecure"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["xds_servers"][0]["channel_creds"] == [{"type": "insecure"}]


def test_a_nack_shows_in_status_and_the_last_good_config_keeps_serving(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    """A header regex that passes `validate` (Python's re accepts it) but RE2 refuses (a
    counted repetition above 1000): the client NACKs the RouteConfiguration and keeps the
    one it had; /status and `xdsplane status` show the NACK with gRPC's reason; the next
    good edit is ACKed and applied, and the node's row shows no NACK any more."""
    a, b = Backend("alpha"), Backend("beta")
    backends += [a, b]
    folder = tmp_path / "policy"

    def text(routes: list[dict[str, object]]) -> str:
        return yaml.safe_dump(
            {
                "nodes": ["grpc-*"],
                "grpc_services": [{"name": TARGET, "routes": routes}],
                "upstreams": {
                    "alpha": {"endpoints": [a.address]},
                    "beta": {"endpoints": [b.address]},
                },
            }
        )

    good = [
        {"service": "billing.Billing", "method": "Refund", "upstream": "beta"},
        {"upstream": "alpha"},
    ]
    write_atomic(folder / "grpc.yaml", text(good))
    server = XdsServer(procs, folder).start()
    client = start_loop(procs, "client", grpc_bootstrap(NODE, server.xds_address), TARGET, 60)
    wait_until(lambda: server.settled(NODE), FIRST_RPC_SECONDS, what="the client ACKed all")
    bad = [
        {"headers": [{"name": "x-tenant", "regex": "x{1001}"}], "upstream": "beta"},
        {"upstream": "alpha"},
    ]
    write_atomic(folder / "grpc.yaml", text(bad))
    nack = wait_until(
        lambda: server.status()["nacks"].get(NODE, {}).get("RDS"), 15, what="the RDS NACK"
    )
    assert "x{1001}" in nack["message"] or "regex" in nack["message"].lower(), nack
    rds = server.stream(NODE)["types"]["RDS"]
    assert rds["nacks"] == 1 and rds["acked_version"] != rds["sent_version"]
    # The client keeps calling alpha, the route it accepted last.
    seen = len(loop_lines(client))
    wait_until(lambda: len(loop_lines(client)) >= seen + 20, 15, what="20 more calls")
    holds_for(
        lambda: all(x["answer"] == "alpha" for x in loop_lines(client)[seen:]),
        0.5,
        what="every call after the NACK reaches alpha",
    )
    assert server.status()["reload"]["errors"] == []  # the edit passed validation
    shown = xdsplane_status(server)
    row = next(line for line in shown.splitlines() if line.startswith(NODE))
    assert "NACK" in row.split()[4:], shown
    assert f"NACK {NODE} RDS" in shown, shown
    # A good edit: Charge (the loop's method) to beta. ACKed, applied, and the row is clear
    # again (the NACK line stays: /status keeps the node's last NACK per type, with its time).
    moved = [{"service": "billing.Billing", "method": "Charge", "upstream": "beta"}, good[1]]
    write_atomic(folder / "grpc.yaml", text(moved))
    wait_until(
        lambda: any(x["answer"] == "beta" for x in loop_lines(client)[seen:]),
        15,
        what="a call reaches beta after the good edit",
    )
    wait_until(
        lambda: (lambda t: t["acked_version"] == t["sent_version"])(
            server.stream(NODE)["types"]["RDS"]
        ),
        15,
        what="the good edit ACKed",
    )
    assert server.stream(NODE)["types"]["RDS"]["nacks"] == 1
    row = next(line for line in xdsplane_status(server).splitlines() if line.startswith(NODE))
    assert "NACK" not in row.split(), row
    client.stop()


def test_a_grpc_group_serves_no_secret_and_its_bootstrap_names_files_only(
    tmp_path: Path, certs: Path
) -> None:
    """gRPC reads its keys from files (certificate providers): a group of gRPC services
    serves no Secret resource at all (a client asking SDS by name gets nothing), and the
    bootstrap carries paths, never a key."""
    import subprocess

    from harness import xdsplane_argv

    folder = tmp_path / "policy"
    write_atomic(folder / "grpc.yaml", tls_policy(certs, "127.0.0.1:50051", ["billing.internal"]))
    render = subprocess.run(
        xdsplane_argv("render", str(folder), "--node", NODE),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    resources = json.loads(render.stdout)["resources"]
    assert resources["SDS"]["resources"] == []
    assert [r["name"] for r in resources["CDS"]["resources"]] == ["billing"]
    boot = grpc_bootstrap(NODE, "127.0.0.1:18000", "--policy", str(folder))
    assert "PRIVATE KEY" not in boot and "BEGIN" not in boot
    key = (certs / "gateway.key").read_text()
    assert key.splitlines()[1] not in boot
    assert json.loads(boot)["certificate_providers"]["gateway"]["config"][
        "private_key_file"
    ] == str(certs / "gateway.key")


@pytest.mark.envoy
def test_validate_envoy_leaves_grpc_resources_to_grpc(tmp_path: Path, certs: Path) -> None:
    """`validate --envoy` accepts a group of gRPC services with mTLS upstreams: Envoy cannot
    build an api_listener from xDS nor a cluster whose TLS names certificate provider
    instances, so those are gRPC's to judge (its NACKs show in /status)."""
    import subprocess

    from harness import xdsplane_argv

    folder = tmp_path / "policy"
    write_atomic(folder / "grpc.yaml", tls_policy(certs, "127.0.0.1:50051", ["billing.internal"]))
    done = subprocess.run(
        xdsplane_argv("validate", str(folder), "--envoy"),
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "envoy accepts every node group" in done.stderr


def xdsplane_status(server: XdsServer) -> str:
    import subprocess

    from harness import xdsplane_argv

    done = subprocess.run(
        xdsplane_argv("status", "--admin-address", f"127.0.0.1:{server.admin_port}"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout
