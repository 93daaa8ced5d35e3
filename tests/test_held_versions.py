"""Per-stream state kept small (issue 15 item 3): a delta stream in sync holds no table of
names of its own (``HeldVersions`` shares the snapshot's mapping), and ``HeldVersions``
behaves as the dict it replaces through every change a stream makes to it."""

from __future__ import annotations

import random

from envoy.service.discovery.v3 import discovery_pb2
from helpers_snapshots import CDS, cluster, snap

from xdsplane.server.delta import DeltaStream
from xdsplane.server.state import HeldVersions


def test_delta_streams_in_sync_share_the_snapshots_mapping() -> None:
    first = snap(*(cluster(f"c{i}") for i in range(50)))
    streams = [DeltaStream() for _ in range(3)]
    for s in streams:
        s.on_snapshot(first)
        (out,) = s.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=CDS.value)).responses
        assert out.body is first.delta_body(CDS) and out.resources == 50  # one shared body
        held = s.types[CDS].held
        assert isinstance(held, HeldVersions) and held.base is first.of(CDS)
        assert s.types[CDS].last_sent is first.of(CDS)
    # One cluster changes: the diff goes out, and the stream holds the new mapping.
    second = snap(cluster("c7", tag=2), *(cluster(f"c{i}") for i in range(50) if i != 7))
    for s in streams:
        (out,) = s.on_snapshot(second).responses
        assert [r.name for r in out.entries] == ["c7"]
        held = s.types[CDS].held
        assert isinstance(held, HeldVersions) and held.base is second.of(CDS)
        assert dict(held) == {n: r.version for n, r in second.of(CDS).items()}


def test_held_versions_behaves_as_a_dict() -> None:
    rng = random.Random(15)
    base = snap(*(cluster(f"c{i}") for i in range(40))).of(CDS)
    held = HeldVersions.of(base)
    plain = {n: r.version for n, r in base.items()}
    names = [f"c{i}" for i in range(400)]
    for step in range(2000):
        name = rng.choice(names)
        op = rng.random()
        if op < 0.4:
            held[name] = plain[name] = f"v{step}"
        elif op < 0.8:
            assert held.pop(name, None) == plain.pop(name, None)
        else:
            assert (name in held) == (name in plain) and held.get(name) == plain.get(name)
        assert len(held) == len(plain) and dict(held) == plain, step
    if held.base is not None:
        for i in range(HeldVersions.MAX_OVERLAY + 1):
            held[f"new{i}"] = plain[f"new{i}"] = "v"
    assert held.base is None and dict(held) == plain  # past MAX_OVERLAY: a plain dict
