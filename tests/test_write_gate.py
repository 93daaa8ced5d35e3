"""The server-wide write gate (xdsplane/server/gate.py): bytes of responses being encoded and
written at once are bounded, in order, and a client that stops reading cannot hold it.

The unit tests drive ``WriteGate`` directly. The attacker tests run an in-process
``AdsService`` whose gate lets one response through at a time (a 1-byte budget), on a
snapshot whose CDS is ~1 MB: clients that open streams and never read their responses
(HTTP/2 flow control stalls the server's write to them for good), and a thousand idle
streams, must not keep a reading client from getting a new version. Without the gate's
stall rule, the first stuck write would hold the gate forever and the reader would never
be served.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import pytest
from ads_client import ADS_SERVICE, METHODS, Stream
from envoy.service.discovery.v3 import discovery_pb2
from helpers_snapshots import CDS, cluster_msg

from xdsplane.cache import SnapshotCache
from xdsplane.server.ads import AdsService
from xdsplane.server.gate import WriteGate
from xdsplane.server.limits import Limits
from xdsplane.server.registry import Registry
from xdsplane.server.state import Outgoing
from xdsplane.snapshot import NodeGroup, Snapshot, SnapshotSet, make_resource

# Each wait polls; the ceiling is for a busy 2-core machine (it takes well under a second).
CEILING = 30.0
STUCK = 6  # per variant, each on its own channel
IDLE = 1000  # streams that never send a request, over 10 connections


def out(size: int) -> Outgoing:
    return Outgoing(CDS, "v", "1", b"x" * size)


# -- the gate alone --------------------------------------------------------------------------


async def test_gate_admits_in_order_within_the_budget() -> None:
    gate = WriteGate(budget=100, stall=10)
    order: list[str] = []

    async def take(name: str, size: int) -> None:
        await gate.acquire(size)
        order.append(name)

    await gate.acquire(60)  # in progress
    waiters = [asyncio.create_task(take(n, s)) for n, s in (("a", 50), ("b", 10), ("c", 30))]
    await asyncio.sleep(0.01)
    # "b" would fit beside the 60 in progress, but "a" came first: nobody passes it.
    assert order == [] and gate.in_use == 60 and gate.waited == 3
    gate.release(60)
    await asyncio.gather(*waiters)
    assert order == ["a", "b", "c"] and gate.in_use == 90 and gate.peak == 90


async def test_gate_lets_an_oversized_response_through_alone() -> None:
    gate = WriteGate(budget=10, stall=10)
    await gate.acquire(1000)  # nothing in progress: it goes, alone
    waiting = asyncio.create_task(gate.acquire(1))
    await asyncio.sleep(0.01)
    assert not waiting.done()
    gate.release(1000)
    await waiting
    assert gate.in_use == 1


async def test_gate_survives_cancelled_waiters() -> None:
    gate = WriteGate(budget=10, stall=10)
    await gate.acquire(10)
    first = asyncio.create_task(gate.acquire(5))
    second = asyncio.create_task(gate.acquire(5))
    await asyncio.sleep(0.01)
    first.cancel()
    gate.release(10)
    await second
    assert gate.in_use == 5 and first.cancelled()


class _Context:
    """A stream context whose writes complete when told to (or never)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.release = asyncio.Event()

    async def write(self, data: bytes) -> None:
        await self.release.wait()
        self.written.append(data)


async def test_gate_lets_a_stalled_write_go_on_outside_it() -> None:
    gate = WriteGate(budget=1, stall=0.05)
    stuck, fine = _Context(), _Context()
    fine.release.set()
    stuck_write = asyncio.create_task(gate.write(stuck, out(100)))
    await asyncio.sleep(0)
    await asyncio.wait_for(gate.write(fine, out(100)), CEILING)  # not behind the stuck one
    assert fine.written == [b"x" * 100] and gate.stalled == 1 and gate.in_use == 0
    stuck.release.set()  # the stuck write still completes, outside the gate
    await asyncio.wait_for(stuck_write, CEILING)
    assert stuck.written == [b"x" * 100] and gate.in_use == 0


async def test_gate_encodes_only_once_a_stream_holds_it() -> None:
    gate = WriteGate(budget=100, stall=10)
    encoded: list[int] = []

    class Counting(_Context):
        async def write(self, data: bytes) -> None:
            encoded.append(len(data))
            await super().write(data)

    first, second = Counting(), Counting()
    a = asyncio.create_task(gate.write(first, out(80)))
    b = asyncio.create_task(gate.write(second, out(80)))
    await asyncio.sleep(0.01)
    assert encoded == [80] and gate.in_use == 80  # the second waits, holding no bytes
    first.release.set()
    second.release.set()
    await asyncio.gather(a, b)
    assert encoded == [80, 80] and gate.in_use == 0


# -- attackers over real gRPC -----------------------------------------------------------------


def big_snapshot(tag: int) -> Snapshot:
    """~1 MB of CDS (500 clusters with 2 KB stat names): never fits a stuck client's window."""
    resources = []
    for i in range(500):
        msg = cluster_msg(f"c{i:03d}", tag)
        msg.alt_stat_name = f"{tag}-{i}-".ljust(2000, "x")
        resources.append(make_resource(CDS, msg, "test"))
    return Snapshot.build(resources)


Served = tuple[str, SnapshotCache, AdsService]


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    cache = SnapshotCache()
    cache.update(SnapshotSet((NodeGroup("all", None, big_snapshot(1)),)))
    # One response through the gate at a time: any write that held it would stall everyone.
    limits = Limits(write_budget=1, first_request_timeout=600)
    ads = AdsService(cache, Registry(), limits=limits)
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    server.add_generic_rpc_handlers((ads.handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}", cache, ads
    finally:
        await server.stop(None)


def first_request(variant: str, node: str) -> Any:
    if variant == "sotw":
        req: Any = discovery_pb2.DiscoveryRequest(type_url=CDS.value)
    else:
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS.value)
    req.node.id = node
    return req


async def stuck_stream(address: str, variant: str, node: str) -> tuple[grpc.aio.Channel, Any]:
    """A stream on a channel with a tiny receive window that subscribes and never reads."""
    channel = grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.http2.lookahead_bytes", 1024),  # the stream's receive window
            ("grpc.http2.bdp_probe", 0),  # ... which BDP probing would widen
            ("grpc.max_receive_message_length", 64 * 2**20),
        ],
    )
    name, request, response = METHODS[variant]
    call = channel.stream_stream(
        ADS_SERVICE + name,
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )(timeout=600)
    await call.write(first_request(variant, node))
    return channel, call


async def until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + CEILING
    while not pred():
        assert time.monotonic() < deadline, f"timed out after {CEILING}s waiting for {what}"
        await asyncio.sleep(0.02)


def version_of(resp: Any) -> str:
    return str(getattr(resp, "version_info", "") or getattr(resp, "system_version_info", ""))


async def read_version(s: Stream, previous: str) -> tuple[str, Any]:
    """Read until a response of another version than ``previous`` comes."""
    deadline = time.monotonic() + CEILING
    while True:
        resp = await s.read(max(0.1, deadline - time.monotonic()))
        if version_of(resp) != previous:
            return version_of(resp), resp


@pytest.mark.parametrize("variant", ["sotw", "delta"])
async def test_clients_that_never_read_do_not_hold_the_gate(served: Served, variant: str) -> None:
    address, cache, ads = served
    gate = ads.gate
    opened: list[tuple[grpc.aio.Channel, Any]] = []
    idle_channels = [
        grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(IDLE // 100)
    ]
    idle: list[Any] = []
    reader_channel = grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
    )
    try:
        # The attackers: streams whose ~1 MB responses stall in HTTP/2 flow control, of
        # both variants, and a thousand streams that never send anything.
        for i in range(STUCK):
            for v in ("sotw", "delta"):
                opened.append(await stuck_stream(address, v, f"stuck-{v}-{i}"))
        for i in range(IDLE):
            ch = idle_channels[i // 100]
            name, request, response = METHODS[variant]
            call = ch.stream_stream(
                ADS_SERVICE + name,
                request_serializer=request.SerializeToString,
                response_deserializer=response.FromString,
            )(timeout=600)
            idle.append(call)
        # Every stuck write took the gate and had to give it back: they are all stalled.
        await until(lambda: gate.stalled >= 2 * STUCK, "the stuck writes to stall")
        assert gate.in_use == 0

        reader = Stream.open(reader_channel, variant, timeout=600)
        await reader.write(first_request(variant, "reader"))
        version, resp = await read_version(reader, "")
        assert len(resp.resources) == 500
        for tag in (2, 3):
            started = time.monotonic()
            stalled = gate.stalled
            cache.update(SnapshotSet((NodeGroup("all", None, big_snapshot(tag)),)))
            if variant == "sotw":
                ack: Any = discovery_pb2.DiscoveryRequest(
                    type_url=CDS.value, version_info=version, response_nonce=resp.nonce
                )
            else:
                ack = discovery_pb2.DeltaDiscoveryRequest(
                    type_url=CDS.value, response_nonce=resp.nonce
                )
            await reader.write(ack)
            new, resp = await read_version(reader, version)
            assert new != version and len(resp.resources) == 500
            took = time.monotonic() - started
            print(f"{variant}: edit {tag} reached the reader in {took * 1000:.0f} ms")
            version = new
            # The stuck streams' own writes of the new version cannot even start while
            # their last one stalls (a stream writes one response at a time).
            assert gate.stalled == stalled
        reader.call.cancel()
    finally:
        for call in idle:
            call.cancel()
        for channel, call in opened:
            call.cancel()
            await channel.close()
        for ch in idle_channels:
            await ch.close()
        await reader_channel.close()
