"""What an ADS stream reports to its observer (xdsplane.server.observe), over a real gRPC
stream to an in-process AdsService: the ACKs and NACKs the state machine judged (a stale
nonce is neither), pushes, refusals, and the propagation measured from the install time of
the snapshot a response was built from.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from ads_client import Stream
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from helpers_snapshots import CDS, cluster, snap

from xdsplane.cache import SnapshotCache
from xdsplane.metrics import Metrics
from xdsplane.server.ads import AdsService
from xdsplane.server.observe import Observer, Observers, Refused, observers
from xdsplane.server.registry import Registry, StreamInfo
from xdsplane.server.state import Ack, Nack, Outgoing
from xdsplane.snapshot import NodeGroup, Snapshot, SnapshotSet

WAIT = 10.0  # generous: a loaded machine answers in milliseconds


class Recorder(Observer):
    """Every event, in order, as a tuple."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []

    def on_open(self, stream: StreamInfo) -> None:
        self.events.append(("open", stream.node_id, stream.group))

    def on_request(self, stream: StreamInfo, req: Any) -> None:
        self.events.append(("request", req.response_nonce))

    def on_push(self, stream: StreamInfo, push: Outgoing) -> None:
        self.events.append(("push", push.type, push.nonce))

    def on_ack(self, stream: StreamInfo, ack: Ack) -> None:
        self.events.append(("ack", ack))

    def on_nack(self, stream: StreamInfo, nack: Nack) -> None:
        self.events.append(("nack", nack))

    def on_refuse(self, stream: StreamInfo, refused: Refused) -> None:
        self.events.append(("refuse", refused.reason))

    def on_close(self, stream: StreamInfo) -> None:
        self.events.append(("close", stream.node_id))

    async def wait_for(self, kind: str, count: int = 1) -> list[tuple[Any, ...]]:
        """Poll until ``count`` events of ``kind`` were seen; returns them."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + WAIT
        while True:
            found = [e for e in self.events if e[0] == kind]
            if len(found) >= count:
                return found
            assert loop.time() < deadline, f"no {count} {kind!r} events: {self.events}"
            await asyncio.sleep(0.01)


def install(cache: SnapshotCache, snapshot: Snapshot) -> None:
    cache.update(SnapshotSet((NodeGroup("edge", None, snapshot),)))


Served = tuple[grpc.aio.Channel, SnapshotCache, Recorder, Metrics, Registry]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    cache, registry, metrics, recorder = SnapshotCache(), Registry(), Metrics(), Recorder()
    install(cache, snap(cluster("a")))
    ads = AdsService(
        cache, registry, metrics=metrics, observer=Observers(recorder, observers(metrics, registry))
    )
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((ads.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield channel, cache, recorder, metrics, registry
    finally:
        await server.stop(None)


def request(
    variant: str, nonce: str = "", error: str | None = None, node: str = "", version: str = ""
) -> Any:
    """A CDS request; ``version``: the version a SotW client says it holds (an ACK's)."""
    if variant == "sotw":
        req: Any = discovery_pb2.DiscoveryRequest(
            type_url=CDS.value, response_nonce=nonce, version_info=version
        )
    else:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS.value, response_nonce=nonce)
    if node:
        req.node.id = node
    if error is not None:
        req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
    return req


def version_of(resp: Any) -> str:
    return str(getattr(resp, "version_info", "") or getattr(resp, "system_version_info", ""))


@pytest.mark.parametrize("variant", ["sotw", "delta"])
async def test_observer_hears_the_acks_and_nacks_the_machine_judged(
    served: Served, variant: str
) -> None:
    channel, cache, rec, metrics, registry = served
    sample: Callable[..., float | None] = metrics.registry.get_sample_value
    s = Stream.open(channel, variant)
    try:
        await s.write(request(variant, node="edge-1"))
        first = await s.read(WAIT)
        await s.write(request(variant, nonce=first.nonce, version=version_of(first)))
        (ack,) = await rec.wait_for("ack")
        # a response to a subscription: its ACK ends no propagation
        assert ack[1] == Ack(CDS, version_of(first), first.nonce, None)

        changed = snap(cluster("a", 2))
        install(cache, changed)
        second = await s.read(WAIT)
        assert changed.installed_at is not None
        await s.write(request(variant, nonce=second.nonce, version=version_of(second)))
        acks = await rec.wait_for("ack", 2)
        assert acks[1][1] == Ack(CDS, version_of(second), second.nonce, changed.installed_at)
        assert sample("xdsplane_propagation_seconds_count", {"type": "CDS"}) == 1

        # a late NACK of the first response is stale: neither a NACK nor an ACK; the NACK
        # of the latest is one (requests are handled in order)
        await s.write(request(variant, nonce=first.nonce, error="late"))
        install(cache, snap(cluster("a", 3)))
        third = await s.read(WAIT)
        await s.write(request(variant, nonce=third.nonce, error="bad cluster"))
        (nack,) = await rec.wait_for("nack")
        assert nack[1] == Nack(CDS, version_of(third), third.nonce, "bad cluster")
        assert len([e for e in rec.events if e[0] == "ack"]) == 2
        assert sample("xdsplane_acks_total", {"type": "CDS"}) == 2
        assert sample("xdsplane_nacks_total", {"type": "CDS"}) == 1
        assert sample("xdsplane_propagation_seconds_count", {"type": "CDS"}) == 1
        assert sample("xdsplane_responses_total", {"type": "CDS"}) == 3
        (info,) = registry.streams.values()
        assert info.as_dict()["types"] == {
            "CDS": {
                "acked_version": version_of(second),
                "sent_version": version_of(third),
                "responses": 3,
                "acks": 2,
                "nacks": 1,
                "last_nack": "bad cluster",
                "nacked_version": version_of(third),
            }
        }
    finally:
        s.cancel()
    await rec.wait_for("close")
    kinds = [e[0] for e in rec.events]
    assert kinds[0] == "open" and kinds[-1] == "close" and "refuse" not in kinds
    assert [e[0] for e in rec.events if e[0] in ("push", "ack", "nack")] == [
        "push",
        "ack",
        "push",
        "ack",
        "push",
        "nack",
    ]
    assert registry.streams == {}
    connected = {"node": "edge-1", "variant": variant}
    assert sample("xdsplane_connected_streams", connected) == 0


async def test_a_refused_stream_is_refused_and_closed_but_never_opened(served: Served) -> None:
    channel, _, rec, metrics, registry = served
    s = Stream.open(channel, "sotw")
    await s.write(request("sotw"))  # no node id
    err = await s.ended(WAIT)
    assert err is not None and err.code() is grpc.StatusCode.INVALID_ARGUMENT
    await rec.wait_for("close")
    assert [e[0] for e in rec.events] == ["refuse", "close"]
    assert rec.events[0] == ("refuse", "no_node_id")
    assert registry.refused == {"no_node_id": 1}
    sample = metrics.registry.get_sample_value
    assert sample("xdsplane_streams_refused_total", {"reason": "no_node_id"}) == 1
    assert registry.streams == {} and registry.admitted == 0
