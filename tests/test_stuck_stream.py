"""The README's promise "a slow or stuck stream never holds up the others", against the
real parts: ``xdsplane serve``, a real Envoy 1.40 and grpcio's real client.

Stuck clients open ADS streams (SotW and delta) on channels whose receive window is tiny
(``grpc.http2.lookahead_bytes``, no BDP probing) and then never read: once a response
bigger than the window is on its way, HTTP/2 flow control stops the server's write to that
stream for good. Meanwhile the route configuration is edited several times; each edit must
reach the real Envoy (its HTTP answer changes) and two reading clients (SotW and delta,
every response ACKed), and the server's memory stays bounded: a stuck stream holds at most
the response it is writing, never one per edit.

Each response is made big (the route configuration carries ~600 KB of padding routes) so
that it cannot fit in the stuck streams' windows and socket buffers, and so that a server
that queued every edit per stuck stream would grow by ~100 MB over the run.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from ads_client import Stream
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import discovery_pb2
from harness import (
    Envoy,
    ProcessGroup,
    XdsServer,
    direct,
    free_port,
    http_get,
    listener,
    route_config,
    write_snapshot,
)

pytestmark = [pytest.mark.envoy]  # conftest: skipped without Envoy 1.40, failed in CI

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

STUCK = 8  # stuck streams, half SotW, half delta, each on its own channel
EDITS = 12
PADDING_ROUTES = 150
PADDING_BYTES = 4000  # per route: under Envoy's 4 KiB direct_response body limit
# Each edit must reach Envoy and the reading clients within this: they take milliseconds
# (bench_propagation.py measures it); the ceiling is for a busy 2-core machine.
EDIT_CEILING = 20.0
# The serve process's RSS may grow by at most this from the initial sync to the end. A
# stuck stream holds at most one response (~0.6 MB serialized, a few MB as messages): 8 of
# them stay far below. Queueing every edit per stuck stream would hold 8 x 12 x 0.6 MB
# serialized (~58 MB), several times that as messages: well above.
RSS_GROWTH_BOUND_MB = 48.0


def resources(port: int, edit: int) -> list[dict[str, Any]]:
    padding = [
        direct(f"/pad-{i}/", f"{edit}-{i}-".ljust(PADDING_BYTES, "x"))
        for i in range(PADDING_ROUTES)
    ]
    return [
        listener("http", port),
        route_config("http", [direct("/v", f"v{edit}"), *padding]),
    ]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def version_of(route_configs: list[Any]) -> str | None:
    """The body of /v in the RouteConfiguration 'http' among ``route_configs`` (Any)."""
    for packed in route_configs:
        rc = route_pb2.RouteConfiguration()
        packed.Unpack(rc)
        if rc.name != "http":
            continue
        for vh in rc.virtual_hosts:
            for r in vh.routes:
                if r.match.path == "/v" or r.match.prefix == "/v":
                    return str(r.direct_response.body.inline_string)
    return None


def requests(variant: str, node: str) -> list[Any]:
    """The first request of each type: CDS and LDS wildcard, RDS 'http'."""
    n = {"id": node}
    if variant == "sotw":
        return [
            discovery_pb2.DiscoveryRequest(node=n, type_url=CDS),
            discovery_pb2.DiscoveryRequest(node=n, type_url=LDS),
            discovery_pb2.DiscoveryRequest(node=n, type_url=RDS, resource_names=["http"]),
        ]
    return [
        discovery_pb2.DeltaDiscoveryRequest(node=n, type_url=CDS),
        discovery_pb2.DeltaDiscoveryRequest(node=n, type_url=LDS),
        discovery_pb2.DeltaDiscoveryRequest(
            node=n, type_url=RDS, resource_names_subscribe=["http"]
        ),
    ]


class Follower:
    """A client that reads every response and ACKs it; records each /v body it is sent."""

    def __init__(self, address: str, variant: str) -> None:
        self.variant = variant
        self.node = f"follower-{variant}"
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_receive_message_length", 64 * 2**20)]
        )
        self.stream = Stream.open(self.channel, variant, timeout=600)
        self.seen: list[str] = []
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> Follower:
        for req in requests(self.variant, self.node):
            await self.stream.write(req)
        self.task = asyncio.create_task(self._follow())
        return self

    async def _follow(self) -> None:
        while True:
            resp = await self.stream.read(timeout=600)
            if resp.type_url == RDS:
                found = version_of(
                    [r.resource if self.variant == "delta" else r for r in resp.resources]
                )
                if found is not None:
                    self.seen.append(found)
            if self.variant == "sotw":
                names = ["http"] if resp.type_url == RDS else []
                ack: Any = discovery_pb2.DiscoveryRequest(
                    version_info=resp.version_info,
                    response_nonce=resp.nonce,
                    type_url=resp.type_url,
                    resource_names=names,
                )
            else:
                ack = discovery_pb2.DeltaDiscoveryRequest(
                    response_nonce=resp.nonce, type_url=resp.type_url
                )
            await self.stream.write(ack)

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.stream.cancel()
        await self.channel.close()


class StuckClient:
    """A stream on its own channel with a tiny receive window, never read."""

    def __init__(self, address: str, variant: str, i: int) -> None:
        self.variant = variant
        self.node = f"stuck-{variant}-{i}"
        self.channel = grpc.aio.insecure_channel(
            address,
            options=[
                ("grpc.http2.lookahead_bytes", 1024),  # the stream's receive window
                ("grpc.http2.bdp_probe", 0),  # ... which BDP probing would widen
                ("grpc.max_receive_message_length", 64 * 2**20),
            ],
        )
        self.call: Any = None

    async def open(self) -> None:
        from ads_client import ADS_SERVICE, METHODS

        name, request, response = METHODS[self.variant]
        method = self.channel.stream_stream(
            ADS_SERVICE + name,
            request_serializer=request.SerializeToString,
            response_deserializer=response.FromString,
        )
        self.call = method(timeout=600)
        for req in requests(self.variant, self.node):
            await self.call.write(req)

    async def close(self) -> None:
        if self.call is not None:
            self.call.cancel()
        await self.channel.close()


async def until(pred: Callable[[], Awaitable[bool] | bool], timeout: float, what: str) -> None:
    """wait_until for an async test: the event loop (the clients) keeps running."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = pred()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return
        except (OSError, KeyError, ValueError) as e:
            last = e
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} ({last!r})")
        await asyncio.sleep(0.02)


@pytest.fixture
async def stuck_clients(procs: ProcessGroup) -> AsyncIterator[list[StuckClient]]:
    clients: list[StuckClient] = []
    yield clients
    for c in clients:
        await c.close()


async def test_stuck_streams_hold_up_no_one_and_memory_stays_bounded(
    procs: ProcessGroup, tmp_path: Path, stuck_clients: list[StuckClient]
) -> None:
    folder = tmp_path / "snapshots"
    port = free_port()
    write_snapshot(folder / "edge.yaml", resources(port, 0))
    server = XdsServer(procs, folder)
    await asyncio.to_thread(server.start)
    envoy = Envoy(procs, tmp_path, "edge-1", server.xds_address)
    await asyncio.to_thread(envoy.start)

    def envoy_says(text: str) -> bool:
        r = http_get(port, "/v")
        return r.status == 200 and r.text == text

    await until(lambda: asyncio.to_thread(envoy_says, "v0"), EDIT_CEILING, "Envoy serves v0")
    followers = [await Follower(server.xds_address, v).start() for v in ("sotw", "delta")]
    try:
        await until(
            lambda: all(f.seen[-1:] == ["v0"] for f in followers), EDIT_CEILING, "followers v0"
        )
        for i in range(STUCK):
            c = StuckClient(server.xds_address, "sotw" if i % 2 == 0 else "delta", i)
            stuck_clients.append(c)
            await c.open()
        nodes = {c.node for c in stuck_clients}

        def opened() -> bool:
            return {s["node"] for s in server.streams()} >= nodes

        await until(lambda: asyncio.to_thread(opened), EDIT_CEILING, "the stuck streams open")
        rss_start = rss_mb(server.proc.pid)
        rss_peak = rss_start
        for edit in range(1, EDITS + 1):
            await asyncio.to_thread(write_snapshot, folder / "edge.yaml", resources(port, edit))
            want = f"v{edit}"
            await until(
                lambda want=want: asyncio.to_thread(envoy_says, want),
                EDIT_CEILING,
                f"Envoy serves {want} (edit {edit}) with {STUCK} streams stuck",
            )
            await until(
                lambda want=want: all(f.seen[-1:] == [want] for f in followers),
                EDIT_CEILING,
                f"both reading clients get {want}",
            )
            rss_peak = max(rss_peak, rss_mb(server.proc.pid))
        # every edit reached each reading client, none skipped, none twice
        for f in followers:
            assert f.seen == [f"v{e}" for e in range(EDITS + 1)], (f.variant, f.seen)
        # The stuck streams are still open and really held: none was sent the last edit.
        by_node = {s["node"]: s for s in server.streams()}
        assert nodes <= set(by_node), sorted(by_node)
        final = by_node["follower-sotw"]["types"]["RDS"]["sent_version"]
        held = [n for n in nodes if by_node[n]["types"].get("RDS", {}).get("sent_version") != final]
        assert len(held) == STUCK, {n: by_node[n]["types"].get("RDS") for n in nodes}
        growth = rss_peak - rss_start
        print(
            f"FIGURES stuck-streams: stuck={STUCK} edits={EDITS} rss_start={rss_start:.0f}MB "
            f"rss_peak={rss_peak:.0f}MB growth={growth:.1f}MB"
        )
        assert growth < RSS_GROWTH_BOUND_MB, (rss_start, rss_peak)
    finally:
        for f in followers:
            await f.close()
