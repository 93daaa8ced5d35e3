"""Per-stream state kept small (issue 15 item 3): a stream in sync holds no table of names
of its own (``HeldVersions`` shares the snapshot's mapping, seen through the interned names
of a named subscription), and ``HeldVersions`` behaves as the dict it replaces through
every change a stream makes to it."""

from __future__ import annotations

import gc
import random
from typing import Any

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from helpers_snapshots import CDS, EDS, cluster, endpoints, snap

from xdsplane.server import state
from xdsplane.server.delta import DeltaStream
from xdsplane.server.sotw import SotwStream
from xdsplane.server.state import HeldVersions, intern_names


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


@pytest.mark.parametrize("filtered", [False, True])
def test_held_versions_behaves_as_a_dict(filtered: bool) -> None:
    rng = random.Random(15)
    base = snap(*(cluster(f"c{i}") for i in range(40))).of(CDS)
    names = [f"c{i}" for i in range(400)]
    if filtered:  # a named subscription: the base seen through some names, some absent
        seen = frozenset(rng.sample(names[:60], 30))
        held = HeldVersions.of(base, seen)
        plain = {n: r.version for n, r in base.items() if n in seen}
    else:
        held = HeldVersions.of(base)
        plain = {n: r.version for n, r in base.items()}
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


def test_equal_name_sets_are_one_object_and_forgotten_when_unused() -> None:
    a = intern_names(f"c{i}" for i in range(2000))
    b = intern_names([f"c{i}" for i in reversed(range(2000))])
    assert a is b
    other = intern_names(f"c{i}" for i in range(1999))
    assert other is not a and other != a
    assert intern_names(()) is intern_names(set())
    key = hash(a)
    assert key in state._interned
    del a, b
    gc.collect()
    assert key not in state._interned  # held weakly: no stream uses it, forgotten


def _eds_request(names: list[str], delta: bool, nonce: str = "") -> Any:
    if delta:
        return discovery_pb2.DeltaDiscoveryRequest(
            type_url=EDS.value, resource_names_subscribe=names, response_nonce=nonce
        )
    return discovery_pb2.DiscoveryRequest(
        type_url=EDS.value, resource_names=names, response_nonce=nonce
    )


@pytest.mark.parametrize("delta", [False, True])
def test_named_streams_in_sync_share_the_snapshots_mapping_and_one_name_set(delta: bool) -> None:
    """Envoys of one group subscribe to the same ClusterLoadAssignments by name: in sync,
    each holds the snapshot's mapping seen through one shared set of names, keeps nothing
    of what it was sent once it ACKed, and stays so after a push."""
    names = [f"c{i:02d}" for i in range(50)]
    first = snap(*(cluster(n) for n in names), *(endpoints(n) for n in names))
    streams: list[DeltaStream | SotwStream] = [
        DeltaStream() if delta else SotwStream() for _ in range(3)
    ]
    for s in streams:
        s.on_snapshot(first)
        (out,) = s.on_request(_eds_request(names, delta)).responses
        assert out.resources == 50
        assert s.types[EDS].last_sent  # what a NACK would reject, until the answer
        version = "" if delta else out.version
        ack = _eds_request(names, delta, out.nonce)
        if not delta:
            ack.version_info = version
        s.on_request(ack)
        assert s.types[EDS].last_sent == ()  # accepted: nothing kept
    subs = [s.types[EDS] for s in streams]
    assert subs[0].names is subs[1].names is subs[2].names  # interned
    for sub in subs:
        assert isinstance(sub.held, HeldVersions) and sub.held.base is first.of(EDS)
        assert sub.held.names is subs[0].names
    second = snap(
        *(cluster(n) for n in names),
        *(endpoints(n, 9000 if n == "c07" else 8080) for n in names if n != "c49"),
    )
    for s in streams:
        got = s.on_snapshot(second).responses
        assert [r.name for o in got for r in o.entries] == ["c07"]
        held = s.types[EDS].held
        assert isinstance(held, HeldVersions) and held.base is second.of(EDS)
        want = {n: r.version for n, r in second.of(EDS).items()}
        if not delta:  # SotW: a named resource the server lost stays with the client
            want["c49"] = first.of(EDS)["c49"].version
        assert dict(held) == want
