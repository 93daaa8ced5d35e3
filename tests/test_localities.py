"""Locality weights (issue #16): an upstream's ``localities:`` share the requests by weight,
for a real grpcio client over ``xds:///`` and for a real Envoy 1.40 (docs/policy.md#localities).

Both tests put two endpoints in the locality of weight 20 and one in the locality of weight
80: spread over the endpoints (locality weights ignored) the lone endpoint would get a third
of the calls, with equal locality weights half; by locality weight it gets 80%.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from grpc_helpers import Backend, grpc_bootstrap, run_calls
from harness import (
    HOST,
    Envoy,
    ProcessGroup,
    Upstream,
    XdsServer,
    free_port,
    http_get,
    wait_until,
    write_atomic,
)

CALLS = 1000
# The share of the weight-80 locality over CALLS calls. gRPC picks a locality at random per
# call (weighted_target, gRFC A27): the share's standard deviation is sqrt(0.8 * 0.2 / 1000)
# = 1.26 points, and 72-88% is more than 6 of them either side (a false failure about once
# in a billion runs). Envoy picks localities by a weighted round-robin schedule: its share
# is within a point of 80%; the same bounds serve. Without the weights the share would be
# 33% (Envoy: round robin over the three endpoints) or 50% (gRPC: equal locality weights).
LOW, HIGH = 0.72, 0.88
FIRST_CALL_SECONDS = 30.0  # a loaded, shared machine: measured well under a second


def localities(light: list[str], heavy: list[str]) -> list[dict[str, object]]:
    return [
        {"region": "eu", "zone": "a", "weight": 20, "endpoints": light},
        {"region": "eu", "zone": "b", "weight": 80, "endpoints": heavy},
    ]


@pytest.fixture
def backends() -> Iterator[list[Backend]]:
    started: list[Backend] = []
    yield started
    for b in started:
        b.close()


def test_grpc_client_shares_calls_by_locality_weight(
    procs: ProcessGroup, tmp_path: Path, backends: list[Backend]
) -> None:
    backends += [Backend("alpha-1"), Backend("alpha-2"), Backend("beta")]
    a1, a2, b = backends
    target = "billing.grpc:50051"
    folder = tmp_path / "policy"
    doc = {
        "nodes": ["grpc-*"],
        "grpc_services": [{"name": target, "upstream": "billing"}],
        "upstreams": {"billing": {"localities": localities([a1.address, a2.address], [b.address])}},
    }
    write_atomic(folder / "grpc.yaml", yaml.safe_dump(doc, sort_keys=False))
    server = XdsServer(procs, folder).start()
    out = run_calls(grpc_bootstrap("grpc-1", server.xds_address), target, CALLS)
    assert out["errors"] == {}, out
    answers = out["answers"]
    assert set(answers) == {"alpha-1", "alpha-2", "beta"}, answers
    share = answers["beta"] / CALLS
    print(f"gRPC: locality of weight 80 took {share:.1%} of {CALLS} calls: {answers}")
    assert LOW <= share <= HIGH, answers


@pytest.mark.envoy
def test_envoy_shares_requests_by_locality_weight(procs: ProcessGroup, tmp_path: Path) -> None:
    ups = [Upstream("alpha-1"), Upstream("alpha-2"), Upstream("beta")]
    try:
        a1, a2, b = (f"{HOST}:{u.port}" for u in ups)
        port = free_port()
        folder = tmp_path / "policy"
        doc = {
            "listeners": [
                {
                    "name": "http",
                    "address": f"{HOST}:{port}",
                    "hosts": [
                        {
                            "name": "web",
                            "domains": ["*"],
                            "routes": [{"prefix": "/", "upstream": "web"}],
                        }
                    ],
                }
            ],
            "upstreams": {"web": {"localities": localities([a1, a2], [b])}},
        }
        write_atomic(folder / "edge.yaml", yaml.safe_dump(doc, sort_keys=False))
        server = XdsServer(procs, folder).start()
        Envoy(procs, tmp_path, "edge-1", server.xds_address).start()
        wait_until(
            lambda: http_get(port, "/").status == 200, FIRST_CALL_SECONDS, what="envoy routes /"
        )
        wait_until(lambda: server.settled("edge-1"), 10, what="envoy ACKed everything")
        answers: Counter[str] = Counter()
        for _ in range(CALLS):
            r = http_get(port, "/")
            assert r.status == 200, r
            answers[r.text.strip()] += 1
        share = answers["beta"] / CALLS
        print(f"Envoy: locality of weight 80 took {share:.1%} of {CALLS} requests: {answers}")
        assert set(answers) == {"alpha-1", "alpha-2", "beta"}, answers
        assert LOW <= share <= HIGH, answers
    finally:
        for u in ups:
            u.close()
