"""Shared by bench_soak.py and bench_storm.py: the policy they serve, the simulated ADS
streams (bench_fanout's, plus resuming from held state) and readings of real Envoys.

The policy: one listener (a ``/healthz`` direct response and one route per upstream) and
``upstreams`` upstreams whose endpoints are IP addresses (so CDS + EDS). No ``nodes:``:
every node, simulated or real, gets the same resources and the same versions. A change
(``write_policy(..., seq)``) edits exactly one cluster (``u000``'s connect_timeout) and one
route configuration (the ``/healthz`` body names ``seq``), so it reaches the simulated
streams (CDS) and the Envoys (CDS, EDS of the edited cluster, RDS).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _procs
import bench_fanout
import grpc
from bench_fanout import (
    CDS,
    DELTA_METHOD,
    SOTW_METHOD,
    Clients,
    DeltaResponse,
    Round,
    SotwResponse,
)
from envoy.service.discovery.v3 import discovery_pb2

STREAMS_PER_CHANNEL = bench_fanout.STREAMS_PER_CHANNEL
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


def policy_text(port: int, upstreams: int, seq: int) -> str:
    lines = [
        "listeners:",
        "  - name: http",
        f"    address: 127.0.0.1:{port}",
        "    hosts:",
        "      - name: api",
        '        domains: ["*"]',
        "        routes:",
        "          - name: healthz",
        "            path: /healthz",
        f'            direct_response: {{status: 200, body: "change {seq}"}}',
    ]
    lines += [f"          - {{prefix: /u{k:03d}/, upstream: u{k:03d}}}" for k in range(upstreams)]
    lines.append("upstreams:")
    for k in range(upstreams):
        timeout = f", connect_timeout: {1000 + seq}ms" if k == 0 else ""
        lines.append(f'  u{k:03d}: {{endpoints: ["127.0.0.1:{10000 + k}"]{timeout}}}')
    return "\n".join(lines) + "\n"


def write_policy(folder: Path, port: int, upstreams: int, seq: int) -> None:
    _procs.harness.write_atomic(folder / "scale.yaml", policy_text(port, upstreams, seq))


# -- simulated streams ------------------------------------------------------------------------


@dataclass
class Held:
    """What a stream holds when it is dropped, to resume with (as Envoy does)."""

    sotw_version: str = ""
    delta: dict[str, str] = field(default_factory=dict)  # name -> version


async def sotw_stream(
    i: int, node: str, channel: grpc.aio.Channel, c: Clients, held: Held, resume: bool
) -> None:
    """bench_fanout's SotW client; with ``resume``, the first request carries the version
    held before (no nonce), like a reconnecting Envoy."""
    call = channel.stream_stream(
        SOTW_METHOD,
        request_serializer=bench_fanout._identity,
        response_deserializer=SotwResponse.FromString,
    )()
    first = discovery_pb2.DiscoveryRequest(type_url=CDS)
    first.node.id = node
    first.node.cluster = "sim"
    if resume and held.sotw_version:
        first.version_info = held.sotw_version
    await call.write(first.SerializeToString())
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce
        )
        await call.write(ack.SerializeToString())
        held.sotw_version = resp.version_info
        c.record(i, resp.version_info, (), time.perf_counter())


async def delta_stream(
    i: int, node: str, channel: grpc.aio.Channel, c: Clients, held: Held, resume: bool
) -> None:
    """bench_fanout's delta client, keeping the versions it holds; with ``resume``, the
    first request lists them in ``initial_resource_versions``."""
    call = channel.stream_stream(
        DELTA_METHOD,
        request_serializer=bench_fanout._identity,
        response_deserializer=DeltaResponse.FromString,
    )()
    first = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS)
    first.node.id = node
    first.node.cluster = "sim"
    if resume:
        first.initial_resource_versions.update(held.delta)
    else:
        held.delta.clear()
    await call.write(first.SerializeToString())
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        await call.write(ack.SerializeToString())
        for r in resp.resources:
            held.delta[r.name] = r.version
        for name in resp.removed_resources:
            held.delta.pop(name, None)
        c.record(i, resp.system_version_info, (), time.perf_counter())


StreamFn = Callable[[int, str, grpc.aio.Channel, Clients, Held, bool], Coroutine[Any, Any, None]]
STREAM_FNS: dict[str, StreamFn] = {"sotw": sotw_stream, "delta": delta_stream}


class Streams:
    """N simulated streams of one variant over N/100 channels; droppable and resumable."""

    def __init__(self, variant: str, n: int, address: str, offset: int = 0) -> None:
        self.variant = variant
        self.n = n
        self.address = address
        self.offset = offset  # node ids sim-<offset + i>
        self.held = [Held() for _ in range(n)]
        self.clients = Clients(variant, n)
        self.channels: list[grpc.aio.Channel] = []
        self.tasks: list[asyncio.Task[None]] = []

    def open(self, resume: bool = False, timed: bool = False) -> float:
        """Open every stream at once (a fresh Clients record); returns the start time.
        ``timed``: ``clients.round`` records when each stream ACKed its first response."""
        self.clients = Clients(self.variant, self.n)
        self.channels = [
            grpc.aio.insecure_channel(self.address, options=CHANNEL_OPTIONS)
            for _ in range(-(-self.n // STREAMS_PER_CHANNEL))
        ]
        fn = STREAM_FNS[self.variant]
        started = time.perf_counter()
        if timed:
            self.clients.round = Round(started, set(range(self.n)))
        self.tasks = [
            asyncio.create_task(
                fn(
                    i,
                    f"sim-{self.offset + i}",
                    self.channels[i // STREAMS_PER_CHANNEL],
                    self.clients,
                    self.held[i],
                    resume,
                )
            )
            for i in range(self.n)
        ]
        return started

    async def drop(self) -> None:
        """Every stream and connection closed at once (a network cut, a server restart)."""
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(ch.close() for ch in self.channels), return_exceptions=True)
        self.tasks, self.channels = [], []

    def ended(self) -> int:
        """Streams whose task ended (the server closed them, or an error)."""
        return sum(1 for t in self.tasks if t.done())


# -- real Envoys ------------------------------------------------------------------------------


def envoy_versions(envoy: _procs.Envoy) -> dict[str, str]:
    """Envoy's accepted versions: {'cds': ..., 'lds': ..., 'rds': ...} (version_text stats)."""
    r = envoy.admin("/stats?filter=" + "version_text$")
    out: dict[str, str] = {}
    for line in r.text.splitlines():
        name, _, value = line.partition(": ")
        value = value.strip().strip('"')
        if name == "cluster_manager.cds.version_text":
            out["cds"] = value
        elif name == "listener_manager.lds.version_text":
            out["lds"] = value
        elif ".rds." in name and name.endswith(".version_text"):
            out["rds"] = value
    return out


def envoy_counters(envoy: _procs.Envoy) -> dict[str, int]:
    """update_rejected and update_success summed over every xDS subscription."""
    stats = envoy.update_stats()
    return {
        k: sum(v for name, v in stats.items() if name.endswith("." + k))
        for k in ("update_success", "update_rejected")
    }


def server_counter(server: _procs.XdsServer, metric: str) -> float:
    """The sum of a counter over its labels in the server's /metrics."""
    text = _procs.harness.http_get(server.admin_port, "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(metric) and not line.startswith("#"):
            head, _, value = line.rpartition(" ")
            if head == metric or head.startswith(metric + "{"):
                total += float(value)
    return total
