"""Proxyless gRPC: real grpcio clients dial ``xds:///NAME`` with the bootstrap
``xdsplane bootstrap --grpc`` prints, served by ``xdsplane serve`` from a policy's
``grpc_services``, and reach real grpcio backends (docs/grpc.md). SotW: the only variant
gRPC's client speaks.

Each client runs in its own process (grpc C-core reads the bootstrap once per process);
waits poll the client's answers or the server's /status with generous ceilings.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from grpc_helpers import Backend, grpc_bootstrap, loop_lines, run_calls, start_loop
from harness import ProcessGroup, XdsServer, wait_until, write_atomic, xdsplane_argv

NODE = "grpc-1"
TARGET = "billing.grpc:50051"
# A first RPC: the client fetches LDS, RDS, CDS and EDS, then connects (measured: well
# under a second); the ceiling is for a loaded, shared machine.
FIRST_RPC_SECONDS = 30.0


MOVE_CEILING_SECONDS = 10.0  # generous: the goal (1 s) lives in bench_grpc.py


def policy(services: list[dict[str, object]], upstreams: dict[str, object], **more: object) -> str:
    doc: dict[str, object] = {
        "nodes": ["grpc-*"],
        "grpc_services": services,
        "upstreams": upstreams,
    }
    doc.update(more)
    return yaml.safe_dump(doc, sort_keys=False)


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for b in started:
        b.close()


def backend(started: list[Backend], name: str, **kwargs: object) -> Backend:
    b = Backend(name, **kwargs)  # type: ignore[arg-type]
    started.append(b)
    return b


def serve(procs: ProcessGroup, folder: Path, text: str) -> XdsServer:
    write_atomic(folder / "grpc.yaml", text)
    return XdsServer(procs, folder).start()


def test_an_rpc_through_xds_and_the_client_in_status(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    a = backend(backends, "alpha")
    server = serve(
        procs,
        tmp_path / "policy",
        policy([{"name": TARGET, "upstream": "billing"}], {"billing": {"endpoints": [a.address]}}),
    )
    boot = grpc_bootstrap(NODE, server.xds_address)
    out = run_calls(boot, TARGET, 3, timeout=FIRST_RPC_SECONDS)
    assert out["answers"] == {"alpha": 3}, out
    # While a client is connected, /status shows it like an Envoy: every type it asked for
    # sent and acknowledged, and what kind of client it is.
    client = start_loop(procs, "client", boot, TARGET, 60)
    wait_until(lambda: server.settled(NODE), FIRST_RPC_SECONDS, what="the client ACKed all")
    stream = server.stream(NODE)
    assert stream["variant"] == "sotw"
    assert stream["client"] == "grpc", stream
    assert stream["user_agent"].startswith("gRPC C-core"), stream  # "... Python 1.85.3"
    assert stream["group"] == "grpc-*"
    # gRPC tells it balances no overprovisioning (docs/grpc.md); the server needs none.
    assert "envoy.lb.does_not_support_overprovisioning" in stream["client_features"], stream
    assert {t: s["nacks"] for t, s in stream["types"].items()} == {
        "CDS": 0,
        "EDS": 0,
        "LDS": 0,
        "RDS": 0,
    }
    done = subprocess.run(
        xdsplane_argv("status", "--admin-address", f"127.0.0.1:{server.admin_port}"),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    row = next(line for line in done.stdout.splitlines() if line.startswith(NODE))
    assert row.split()[1:4] == ["grpc", "sotw", "grpc-*"], done.stdout
    client.stop()


def test_a_policy_edit_moves_the_traffic_within_a_second(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    a, b = backend(backends, "alpha"), backend(backends, "beta")
    folder = tmp_path / "policy"

    def text(address: str) -> str:
        return policy(
            [{"name": TARGET, "upstream": "billing"}], {"billing": {"endpoints": [address]}}
        )

    server = serve(procs, folder, text(a.address))
    client = start_loop(procs, "client", grpc_bootstrap(NODE, server.xds_address), TARGET, 60)
    wait_until(
        lambda: any(x["answer"] == "alpha" for x in loop_lines(client)),
        FIRST_RPC_SECONDS,
        what="the client reaches alpha",
    )
    wait_until(lambda: server.settled(NODE), 10, what="the client ACKed everything")
    assert server.stream(NODE)["types"]["EDS"]["acks"] >= 1
    edited = time.time()
    write_atomic(folder / "grpc.yaml", text(b.address))
    first = wait_until(
        lambda: next((x for x in loop_lines(client) if x["answer"] == "beta"), None),
        15,
        what="the client reaches beta",
    )
    took = first["t"] - edited
    # Issue #16's "within a second" is a goal measured by benchmarks/bench_grpc.py
    # (BENCHMARKS.md); here a generous ceiling that a loaded CI machine cannot trip, with
    # the figure printed.
    print(f"traffic moved {took:.3f}s after the edit")
    assert took < MOVE_CEILING_SECONDS, f"traffic moved {took:.3f}s after the edit"
    # ... and stays there: the next 20 calls all reach beta.
    after = wait_until(
        lambda: (lambda xs: xs if len(xs) >= 20 else None)(
            [x for x in loop_lines(client) if x["t"] > first["t"]]
        ),
        15,
        what="20 more calls",
    )
    assert all(x["answer"] == "beta" for x in after), after[:5]


def test_weighted_80_20(procs: ProcessGroup, tmp_path: Path, backends: list[Backend]) -> None:
    """gRPC picks a weighted cluster at random per call (gRFC A28). Over 1,000 calls the
    share of an 80% cluster has a standard deviation of sqrt(0.8 * 0.2 / 1000) = 1.26
    points: 72-88% is more than 6 of them either side (a false failure about once in a
    billion runs)."""
    a, b = backend(backends, "alpha"), backend(backends, "beta")
    server = serve(
        procs,
        tmp_path / "policy",
        policy(
            [{"name": TARGET, "weighted": {"alpha": 80, "beta": 20}}],
            {"alpha": {"endpoints": [a.address]}, "beta": {"endpoints": [b.address]}},
        ),
    )
    out = run_calls(grpc_bootstrap(NODE, server.xds_address), TARGET, 1000)
    assert out["errors"] == {}, out
    share = out["answers"]["alpha"] / 1000
    assert 0.72 <= share <= 0.88, out["answers"]


def test_retries_on_unavailable(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    flaky = backend(backends, "flaky", fail_first=2)
    retries = {"on": ["unavailable"], "num_retries": 2, "backoff": {"base_interval": "10ms"}}
    server = serve(
        procs,
        tmp_path / "policy",
        policy(
            [{"name": TARGET, "upstream": "billing", "retries": retries}],
            {"billing": {"endpoints": [flaky.address]}},
        ),
    )
    boot = grpc_bootstrap(NODE, server.xds_address)
    out = run_calls(boot, TARGET, 1)
    assert out["answers"] == {"flaky": 1}, out
    assert flaky.calls == 3  # two UNAVAILABLE answers retried, the third attempt served


def test_without_retries_unavailable_reaches_the_caller(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    flaky = backend(backends, "flaky", fail_first=1)
    server = serve(
        procs,
        tmp_path / "policy",
        policy(
            [{"name": TARGET, "upstream": "billing"}], {"billing": {"endpoints": [flaky.address]}}
        ),
    )
    out = run_calls(grpc_bootstrap(NODE, server.xds_address), TARGET, 1)
    assert out["errors"] == {"UNAVAILABLE": 1}, out
    assert flaky.calls == 1


def test_a_route_timeout(procs: ProcessGroup, tmp_path: Path, backends: list[Backend]) -> None:
    """The Charge route has a 300 ms timeout (max_stream_duration, gRFC A31), the rest
    none: a backend that holds each call 2 s fails Charge after about 300 ms and serves
    Refund."""
    slow = backend(backends, "slow", delay=2.0)
    routes = [
        {
            "service": "billing.Billing",
            "method": "Charge",
            "upstream": "billing",
            "timeout": "300ms",
        },
        {"service": "billing.Billing", "upstream": "billing"},
    ]
    server = serve(
        procs,
        tmp_path / "policy",
        policy([{"name": TARGET, "routes": routes}], {"billing": {"endpoints": [slow.address]}}),
    )
    boot = grpc_bootstrap(NODE, server.xds_address)
    out = run_calls(boot, TARGET, 2, timeout=10)
    assert out["errors"] == {"DEADLINE_EXCEEDED": 2}, out
    assert max(out["seconds"][1:]) < 1.5, out["seconds"]  # the first call also fetches xDS
    refund = run_calls(boot, TARGET, 1, method="/billing.Billing/Refund", timeout=10)
    assert refund["answers"] == {"slow": 1}, refund


def test_fault_injection_abort_and_delay(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    """Charge is aborted with UNAVAILABLE before it leaves the client; Refund is held
    400 ms (gRFC A33: the HTTP fault filter, per route)."""
    a = backend(backends, "alpha")
    routes = [
        {
            "service": "billing.Billing",
            "method": "Charge",
            "upstream": "billing",
            "fault": {"abort": {"status": "unavailable"}},
        },
        {"upstream": "billing", "fault": {"delay": {"fixed": "400ms"}}},
    ]
    server = serve(
        procs,
        tmp_path / "policy",
        policy([{"name": TARGET, "routes": routes}], {"billing": {"endpoints": [a.address]}}),
    )
    boot = grpc_bootstrap(NODE, server.xds_address)
    charged = run_calls(boot, TARGET, 3, timeout=FIRST_RPC_SECONDS)
    assert charged["errors"] == {"UNAVAILABLE": 3}, charged
    assert a.calls == 0  # aborted in the client: nothing reached the backend
    refund = run_calls(boot, TARGET, 3, method="/billing.Billing/Refund", timeout=10)
    assert refund["answers"] == {"alpha": 3}, refund
    assert min(refund["seconds"]) >= 0.4, refund["seconds"]


def test_a_client_reconnects_to_a_restarted_server_with_its_last_versions(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    """After a restart the client resends its subscriptions with the versions it holds and
    an empty nonce: the unchanged configuration is not sent again, calls go on, and a
    later edit still reaches it."""
    a, b = backend(backends, "alpha"), backend(backends, "beta")
    folder = tmp_path / "policy"

    def text(address: str) -> str:
        return policy(
            [{"name": TARGET, "upstream": "billing"}], {"billing": {"endpoints": [address]}}
        )

    server = serve(procs, folder, text(a.address))
    client = start_loop(procs, "client", grpc_bootstrap(NODE, server.xds_address), TARGET, 90)
    wait_until(lambda: server.settled(NODE), FIRST_RPC_SECONDS, what="the client ACKed all")
    held = {t: s["acked_version"] for t, s in server.stream(NODE)["types"].items()}
    server.stop()
    server.start()
    stream = wait_until(lambda: server.stream(NODE), 60, what="the client back on the server")
    wait_until(
        lambda: set(server.stream(NODE)["types"]) == set(held), 30, what="all four types again"
    )
    stream = server.stream(NODE)
    for t, version in held.items():
        assert stream["types"][t]["acked_version"] == version, (t, stream["types"][t])
        assert stream["types"][t]["responses"] == 0, (t, stream["types"][t])  # nothing resent
    seen = len(loop_lines(client))
    wait_until(lambda: len(loop_lines(client)) >= seen + 10, 15, what="10 more calls")
    assert all(x["answer"] == "alpha" for x in loop_lines(client)[seen:])
    write_atomic(folder / "grpc.yaml", text(b.address))
    wait_until(
        lambda: any(x["answer"] == "beta" for x in loop_lines(client)[seen:]),
        15,
        what="the edit after the restart reaches the client",
    )


def test_ring_hash_on_a_header_keeps_each_key_on_one_backend(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    """ring_hash with hash: {header: x-account} (gRFC A42): 32 account values, each sent
    three times, each always to the same backend; both backends get some. With a balanced
    ring the chance that all 32 land on one of two backends is 2 in 2**32."""
    a, b = backend(backends, "alpha"), backend(backends, "beta")
    server = serve(
        procs,
        tmp_path / "policy",
        policy(
            [{"name": TARGET, "upstream": "ledger", "hash": {"header": "x-account"}}],
            {"ledger": {"endpoints": [a.address, b.address], "lb": "ring_hash"}},
        ),
    )
    boot = grpc_bootstrap(NODE, server.xds_address)
    out = run_calls(boot, TARGET, 96, timeout=FIRST_RPC_SECONDS, hash_header="x-account")
    assert out["errors"] == {}, out
    assert len(out["by_key"]) == 32
    assert all(len(v) == 1 for v in out["by_key"].values()), out["by_key"]
    assert set(out["answers"]) == {"alpha", "beta"}, out["answers"]
