"""xDS-enabled gRPC servers (gRFC A36) secured by the policy: real grpcio servers
(``grpc.server(..., xds=True)``, tests/grpc_xds_server.py) take their Listener, TLS (A29)
and RBAC (A41) from ``xdsplane serve`` over SotW ADS; real grpcio TLS clients attack them.

Two servers of one node group share a module-scoped control plane:

- ``strict`` (client_certificate: required): Charge for spiffe://example.com/ops/*, the
  whole billing.Billing service for spiffe://example.com/ops/alice only, billing.Status
  for DNS SANs *.clients.example.com; nothing for billing.Admin;
- ``open`` (client_certificate: optional): Charge for spiffe://example.com/*, billing.Status
  for any DNS SAN ('*').

The module's processes are bounded by MODULE_SECONDS; each wait by SERVING_SECONDS.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from ads_client import Stream
from envoy.config.listener.v3 import listener_pb2
from grpc_server_helpers import (
    SERVING_SECONDS,
    bootstrap,
    call_once,
    start_server,
    wait_serving,
)
from harness import ProcessGroup, XdsServer, free_port, wait_until, write_atomic, xdsplane_argv
from test_ads_limits import run, sotw
from test_policy_corpus import run_cli
from tls_helpers import assert_no_key_material, attach_to_report, make_pki, process_group

from xdsplane import pki
from xdsplane.bootstrap import GRPC_SERVER_TEMPLATE
from xdsplane.names import GRPC_SERVER_LISTENER_TEMPLATE, grpc_server_listener

# Two gRPC servers and a control plane for the whole module: well under a minute here.
MODULE_SECONDS = 300.0
CHARGE = "/billing.Billing/Charge"
REFUND = "/billing.Billing/Refund"
STATUS = "/billing.Status/Get"
DELETE = "/billing.Admin/Delete"
DENIED = grpc.StatusCode.PERMISSION_DENIED
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
SDS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"

SECRETS = """\
secrets:
  billing: {certificate: ../certs/billing.crt, private_key: ../certs/billing.key}
  client-ca: {ca: ../certs/client-ca.crt}
"""


def policy(strict_port: int, open_port: int, strict_rbac: str | None = None) -> str:
    rbac = (
        strict_rbac
        or """\
      - methods: [/billing.Billing/Charge]
        client_sans: ["spiffe://example.com/ops/*"]
      - methods: [/billing.Billing/]
        client_sans: [spiffe://example.com/ops/alice]
      - methods: [/billing.Status/]
        client_sans: ["*.clients.example.com"]
"""
    )
    return (
        "nodes: [billing-*]\n"
        + SECRETS
        + textwrap.dedent(f"""\
        grpc_servers:
        - name: strict
          address: 127.0.0.1:{strict_port}
          certificate: billing
          client_certificate: required
          client_ca: client-ca
          rbac:
        """)
        + textwrap.indent(textwrap.dedent(rbac), "  ")
        + textwrap.dedent(f"""\
        - name: open
          address: 127.0.0.1:{open_port}
          certificate: billing
          client_certificate: optional
          client_ca: client-ca
          rbac:
          - methods: [/billing.Billing/Charge]
            client_sans: ["spiffe://example.com/*"]
          - methods: [/billing.Status/]
            client_sans: ["*"]
        """)
    )


def issue_clients(certs: Path) -> None:
    """Client certificates of the trusted client-ca, one per spelling an attacker tries."""
    client = ("client",)
    pki.issue(certs, "carol", "client-ca", uris=["spiffe://example.com/ops/carol"], usage=client)
    spellings = {
        "upper-scheme": "SPIFFE://example.com/ops/alice",
        "upper-host": "spiffe://EXAMPLE.com/ops/alice",
        "trailing-slash": "spiffe://example.com/ops/alice/",
        "longer": "spiffe://example.com/ops/alice.evil",
        "dotdot": "spiffe://example.com/dev/../ops/alice",
    }
    for name, uri in spellings.items():
        pki.issue(certs, name, "client-ca", uris=[uri], usage=client)
    pki.issue(certs, "status-dns", "client-ca", dns=["app.clients.example.com"], usage=client)
    # No SAN at all: gRPC then matches the subject DN, "CN=app.clients.example.com".
    pki.issue(certs, "app.clients.example.com", "client-ca", usage=client)


@dataclass
class Setup:
    root: Path
    certs: Path
    strict: int
    open: int
    xds: XdsServer


def start(procs: ProcessGroup, root: Path, strict_rbac: str | None = None) -> Setup:
    certs = make_pki(root / "certs")
    issue_clients(certs)
    (root / "policy").mkdir()
    strict, open_ = free_port(), free_port()
    write_atomic(root / "policy" / "billing.yaml", policy(strict, open_, strict_rbac))
    xds = XdsServer(procs, root / "policy").start()
    for name, port in (("strict", strict), ("open", open_)):
        boot = bootstrap(xds.xds_address, f"billing-{name}", root / "policy")
        start_server(procs, f"grpc-{name}", f"127.0.0.1:{port}", boot)
    return Setup(root, certs, strict, open_, xds)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("grpc-server")
    with process_group(root / "logs", max_seconds=MODULE_SECONDS) as group:
        s = start(group, root)
        for proc in group.procs[1:]:
            port = s.strict if proc.name == "grpc-strict" else s.open
            wait_serving(proc, s.certs, port, "alice", CHARGE)
        s.group = group  # type: ignore[attr-defined]
        yield s


@pytest.fixture(autouse=True)
def _report(request: pytest.FixtureRequest) -> None:
    if "setup" in request.fixturenames:
        attach_to_report(request, request.getfixturevalue("setup").group)


def test_server_asks_for_its_listener_over_sotw_and_acks(setup: Setup) -> None:
    """Each server subscribes to exactly its own Listener name and ACKs it; no RDS."""
    for name in ("strict", "open"):
        stream = setup.xds.stream(f"billing-{name}")
        assert stream["variant"] == "sotw"
        assert stream["client"] == "grpc", "shown in /status as a gRPC node"
        lds = stream["types"]["LDS"]
        assert lds["acked_version"] == lds["sent_version"] and lds["nacks"] == 0
        assert "RDS" not in stream["types"], "the route configuration is inline"
    assert grpc_server_listener(f"127.0.0.1:{setup.strict}").startswith("grpc/server?")


def test_required_client_certificate_serves_an_rpc(setup: Setup) -> None:
    out = call_once(setup.certs, setup.strict, "alice", CHARGE)
    assert out.ok and out.answer == b"/billing.Billing/Charge:x", out


def test_no_client_certificate_is_refused_at_the_handshake(setup: Setup) -> None:
    out = call_once(setup.certs, setup.strict, None, CHARGE)
    assert out.code == grpc.StatusCode.UNAVAILABLE, out


def test_certificate_from_another_ca_is_refused(setup: Setup) -> None:
    """mallory's certificate (rogue-ca) carries an allowed-looking SAN (ops/mallory)."""
    for port in (setup.strict, setup.open):
        out = call_once(setup.certs, port, "mallory", CHARGE)
        assert out.code == grpc.StatusCode.UNAVAILABLE, out


def test_rbac_denies_a_method_the_san_is_not_allowed_while_an_allowed_one_works(
    setup: Setup,
) -> None:
    assert call_once(setup.certs, setup.strict, "carol", CHARGE).ok
    assert call_once(setup.certs, setup.strict, "carol", REFUND).code == DENIED
    assert call_once(setup.certs, setup.strict, "alice", REFUND).ok
    bob = call_once(setup.certs, setup.strict, "bob", CHARGE)  # spiffe://example.com/dev/bob
    assert bob.code == DENIED, bob


def test_default_deny_for_a_service_no_rule_names(setup: Setup) -> None:
    assert call_once(setup.certs, setup.strict, "alice", DELETE).code == DENIED


@pytest.mark.parametrize(
    "who", ["upper-scheme", "upper-host", "trailing-slash", "longer", "dotdot"]
)
def test_san_spelled_otherwise_does_not_pass_as_alice(setup: Setup, who: str) -> None:
    """Only spiffe://example.com/ops/alice may call Refund: no other spelling of it."""
    out = call_once(setup.certs, setup.strict, who, REFUND)
    assert out.code == DENIED, out


@pytest.mark.parametrize(
    "path",
    [
        "/billing.Billing/refund",
        "/billing.billing/Refund",
        "/billing.Billing/Refund/",
        "//billing.Billing/Refund",
        "/billing.Billing//Refund",
        "/billing.Billing/Charge/../Refund",
        "/billing.Billing/%52efund",
        "/billing.Billing/Charge?/Refund",
    ],
)
def test_method_spelled_otherwise_does_not_reach_refund(setup: Setup, path: str) -> None:
    """carol may call Charge only: no spelling of a path runs another method for her. Her
    rule names Charge exactly, so the unknown paths never reach the server's method lookup
    (where grpcio 1.85's xDS server aborts, see docs/grpc-servers.md): it still serves."""
    out = call_once(setup.certs, setup.strict, "carol", path)
    assert out.code == DENIED, out
    assert call_once(setup.certs, setup.strict, "carol", CHARGE).ok


@pytest.mark.parametrize(
    "path",
    ["/billing.Billing/../billing.Admin/Delete", "/billing.Billing/%2e%2e/billing.Admin/Delete"],
)
def test_service_rule_does_not_cover_another_service_by_dot_segments(
    setup: Setup, path: str
) -> None:
    """A service rule is the service's path then a method name, not a string prefix."""
    out = call_once(setup.certs, setup.strict, "alice", path)
    assert out.code == DENIED, out


def test_dns_san_rule_matches_a_dns_san_never_the_subject(setup: Setup) -> None:
    assert call_once(setup.certs, setup.strict, "status-dns", STATUS).ok
    no_san = call_once(setup.certs, setup.strict, "app.clients.example.com", STATUS)
    assert no_san.code == DENIED, no_san


def test_optional_client_certificate_lets_the_handshake_through_but_not_rbac(
    setup: Setup,
) -> None:
    """Without a certificate the connection is up, and no rule passes, not even '*'."""
    for method in (CHARGE, STATUS):
        out = call_once(setup.certs, setup.open, None, method)
        assert out.code == DENIED, (method, out)
    assert call_once(setup.certs, setup.open, "bob", CHARGE).ok
    assert call_once(setup.certs, setup.open, "status-dns", STATUS).ok


def test_tightened_rbac_takes_effect_on_the_running_server(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """Removing carol's rule from the policy file refuses her next RPC with no restart."""
    s = start(procs, tmp_path)
    wait_serving(procs.procs[1], s.certs, s.strict, "carol", CHARGE)
    assert call_once(s.certs, s.strict, "alice", CHARGE).ok
    tight = """\
      - methods: [/billing.Billing/]
        client_sans: [spiffe://example.com/ops/alice]
"""
    write_atomic(tmp_path / "policy" / "billing.yaml", policy(s.strict, s.open, tight))
    # The reload, the push and the server's swap take well under a second here.
    wait_until(
        lambda: call_once(s.certs, s.strict, "carol", CHARGE).code == DENIED,
        SERVING_SECONDS,
        what="carol refused after the edit",
    )
    assert call_once(s.certs, s.strict, "alice", CHARGE).ok
    lds = s.xds.type_status("billing-strict", "LDS")
    assert lds["acked_version"] == lds["sent_version"] and lds["nacks"] == 0


def test_removed_server_entry_stops_serving(procs: ProcessGroup, tmp_path: Path) -> None:
    """Deleting the entry deletes the Listener (SotW: absent from the next response): the
    server goes back to "not serving" (A36) and its clients are refused, with no restart;
    the other server of the group, whose Listener is unchanged, keeps serving."""
    s = start(procs, tmp_path)
    wait_serving(procs.procs[1], s.certs, s.strict, "alice", CHARGE)
    wait_serving(procs.procs[2], s.certs, s.open, "alice", CHARGE)
    text = policy(s.strict, s.open)
    start_open = text.index("- name: open")
    kept = text[: text.index("grpc_servers:\n")] + "grpc_servers:\n" + text[start_open:]
    write_atomic(tmp_path / "policy" / "billing.yaml", kept)
    wait_until(
        lambda: call_once(s.certs, s.strict, "alice", CHARGE).code == grpc.StatusCode.UNAVAILABLE,
        SERVING_SECONDS,
        what="the strict server not serving once its Listener is gone",
    )
    assert procs.procs[1].alive(), "not serving, not dead"
    assert call_once(s.certs, s.open, "alice", CHARGE).ok


def _listener(packed: Any) -> Any:
    out = listener_pb2.Listener()
    packed.Unpack(out)
    return out


def test_the_servers_private_key_is_not_in_the_snapshot(setup: Setup) -> None:
    """A node of the group asking SDS for the gRPC server's secrets gets nothing: they are
    certificate providers on the gRPC host, never sent over xDS."""
    listener_name = grpc_server_listener(f"127.0.0.1:{setup.strict}")

    async def scenario(channel: grpc.aio.Channel) -> None:
        s = Stream.open(channel, "sotw")
        await s.write(sotw(SDS, "billing-snoop", names=["billing", "client-ca"]))
        await s.write(sotw(LDS, names=[listener_name]))
        seen = []
        while True:  # responses come in request order: SDS (if any) before LDS
            got = await s.read(10)
            seen.append(got)
            if got.type_url == LDS:
                break
        s.cancel()
        assert [r.type_url for r in seen if r.type_url == SDS and r.resources] == []
        names = [[x.name for x in map(_listener, r.resources)] for r in seen if r.type_url == LDS]
        assert names == [[listener_name]], "a subset subscription gets just what it named"

    run(setup.xds, scenario)
    rendered = run_cli("render", "--node", "billing-1", str(setup.root / "policy"), cwd=setup.root)
    assert rendered.returncode == 0, rendered.stderr
    assert json.loads(rendered.stdout)["resources"]["SDS"]["resources"] == []
    assert_no_key_material("render", rendered.stdout, setup.certs)


@pytest.mark.envoy
def test_validate_envoy_leaves_grpc_server_listeners_to_our_checks(setup: Setup) -> None:
    """Envoy is not the client of a gRPC server's Listener (it would bind the address and
    find no SDS certificate): ``validate --envoy`` passes a folder of gRPC servers."""
    r = run_cli("validate", "--envoy", str(setup.root / "policy"), cwd=setup.root, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "envoy accepts" in r.stderr


def test_bootstrap_names_the_servers_certificate_providers(setup: Setup) -> None:
    """``bootstrap --grpc --policy`` gives a server node its secrets as file_watcher
    providers of the same names, and the Listener template the translation names."""
    data = json.loads(bootstrap(setup.xds.xds_address, "billing-strict", setup.root / "policy"))
    providers = data["certificate_providers"]
    assert sorted(providers) == ["billing", "client-ca"]
    assert providers["billing"]["plugin_name"] == "file_watcher"
    config = {**providers["billing"]["config"], **providers["client-ca"]["config"]}
    files = {k: Path(v) for k, v in config.items() if k.endswith("_file")}
    assert all(p.is_absolute() for p in files.values()), files
    assert files["certificate_file"].resolve() == (setup.certs / "billing.crt").resolve()
    assert files["ca_certificate_file"].resolve() == (setup.certs / "client-ca.crt").resolve()
    assert GRPC_SERVER_TEMPLATE == GRPC_SERVER_LISTENER_TEMPLATE


def xdsplane_status(xds: XdsServer) -> str:
    done = subprocess.run(
        xdsplane_argv("status", "--admin-address", f"127.0.0.1:{xds.admin_port}"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout


def test_a_listener_the_server_nacks_shows_in_status_and_the_last_good_one_keeps_serving(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """An edit `validate` accepts but the running server rejects: the entry now names a
    secret its bootstrap has no certificate provider for (the bootstrap is read once, when
    the process starts). The server NACKs the Listener, /status and `xdsplane status` show
    the NACK with gRPC's reason, the server keeps serving with the Listener it had, and the
    next good edit is taken (ACKed) and applied."""
    s = start(procs, tmp_path)
    wait_serving(procs.procs[1], s.certs, s.strict, "carol", CHARGE)
    node, path = "billing-strict", tmp_path / "policy" / "billing.yaml"
    good = policy(s.strict, s.open)
    bad = good.replace(
        "  client-ca:",
        "  billing-next: {certificate: ../certs/billing.crt, "
        "private_key: ../certs/billing.key}\n  client-ca:",
        1,
    ).replace("certificate: billing\n", "certificate: billing-next\n", 1)
    assert bad.count("billing-next") == 2
    write_atomic(path, bad)
    nack = wait_until(
        lambda: s.xds.status()["nacks"].get(node, {}).get("LDS"),
        SERVING_SECONDS,
        what="the server's LDS NACK",
    )
    print(f"the server's NACK: {nack['message']}")
    assert "billing-next" in nack["message"], nack
    assert s.xds.status()["reload"]["errors"] == [], "the edit passed validation"
    lds = s.xds.type_status(node, "LDS")
    assert lds["nacks"] == 1 and lds["acked_version"] != lds["sent_version"], lds
    shown = xdsplane_status(s.xds)
    row = next(line for line in shown.splitlines() if line.startswith(node))
    assert "NACK" in row.split()[4:], shown
    assert f"NACK {node} LDS" in shown and "billing-next" in shown, shown
    # The last good Listener keeps serving: carol's rule (and TLS) as before.
    for _ in range(5):
        assert call_once(s.certs, s.strict, "carol", CHARGE).ok
        assert call_once(s.certs, s.strict, "alice", DELETE).code == DENIED
    # A good edit (carol's rule removed) is ACKed and applied; the row shows no NACK.
    tight = """\
      - methods: [/billing.Billing/]
        client_sans: [spiffe://example.com/ops/alice]
"""
    write_atomic(path, policy(s.strict, s.open, tight))
    wait_until(
        lambda: call_once(s.certs, s.strict, "carol", CHARGE).code == DENIED,
        SERVING_SECONDS,
        what="carol refused after the good edit",
    )
    assert call_once(s.certs, s.strict, "alice", CHARGE).ok
    wait_until(
        lambda: (lambda t: t["acked_version"] == t["sent_version"])(s.xds.type_status(node, "LDS")),
        SERVING_SECONDS,
        what="the good edit ACKed",
    )
    row = next(line for line in xdsplane_status(s.xds).splitlines() if line.startswith(node))
    assert "NACK" not in row.split(), row


def test_grpcio_still_aborts_on_an_unimplemented_method_rbac_lets_through(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    """The known limit of docs/grpc-servers.md, checked on the grpcio this project pins: an
    RPC that a service-wide rule (alice's ``/billing.Billing/``) lets through to a method
    the server does not implement stops the xDS-enabled server (a C-core "Check failed" in
    pipe.h), where a plain server answers UNIMPLEMENTED. When a grpcio release fixes it this
    test fails: then drop the limit from the docs and make this test assert UNIMPLEMENTED."""
    s = start(procs, tmp_path)
    server = procs.procs[1]
    wait_serving(server, s.certs, s.strict, "alice", CHARGE)
    wait_serving(procs.procs[2], s.certs, s.open, "alice", CHARGE)
    out = call_once(s.certs, s.strict, "alice", "/billing.Billing/NotImplemented")
    assert out.code == grpc.StatusCode.UNAVAILABLE, out
    wait_until(lambda: not server.alive(), SERVING_SECONDS, what="the server stopped")
    assert "Check failed" in server.tail(), server.tail()
    # The other server of the group is a process of its own: it keeps serving.
    assert call_once(s.certs, s.open, "alice", CHARGE).ok
