"""Hostile ADS clients against the real server (``xdsplane serve``, real gRPC), by hypothesis.

Each example runs an arbitrary sequence of actions over a few concurrent SotW and delta
streams: requests for unknown type URLs, huge name lists (some past --max-names), bogus
nonces and versions, real and bogus ACKs, NACK storms, garbage bytes on the wire, no node
id or an overlong one, half-closes, reloads, and streams dropped at any point. After each
example every stream is dropped, and then:

- the server is alive, and no stream is left in /status (none stuck);
- its asyncio tasks are back to what they were with nothing connected (none leaked);
- a fresh well-formed stream gets the current snapshot at once.

The default run is short (XDSPLANE_HOSTILE_EXAMPLES, 15 by default). The slow version runs
many examples and checks the server's resident memory stays bounded (RELIABILITY.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from ads_client import Stream
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from harness import ProcessGroup, XdsServer, free_port, wait_until, write_snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_ads_limits import CDS
from test_observability import Scrape, metric, resources

from xdsplane.server.limits import MAX_NODE_FIELD
from xdsplane.types import ResourceType

EXAMPLES = int(os.environ.get("XDSPLANE_HOSTILE_EXAMPLES", "15"))
SLOW_EXAMPLES = int(os.environ.get("XDSPLANE_HOSTILE_SLOW_EXAMPLES", "1500"))
SLOTS = 4  # streams open at once in one example
MAX_NAMES = 2000
LIMITS = (
    *("--max-streams", "16"),
    *("--max-names", str(MAX_NAMES)),
    *("--max-message-bytes", str(256 * 1024)),
    *("--max-request-rate", "500", "--request-burst", "100"),
)
KNOWN = [t.value for t in ResourceType]
UNKNOWN = [
    "",
    "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
    "type.googleapis.com/" + "x" * 5000,
    "not a type url at all \x00\udcff"[:20].encode("utf-8", "replace").decode(),
]

# -- what a hostile client does -------------------------------------------------------------------

names = st.lists(st.sampled_from(["alpha", "http", "*", "", "beta", "x" * 300]), max_size=5)
type_urls = st.one_of(st.sampled_from(KNOWN), st.sampled_from(UNKNOWN), st.text(max_size=40))
nonces = st.one_of(st.just("latest"), st.text(max_size=12), st.just("9" * 40))
actions = st.one_of(
    st.tuples(
        st.just("open"),
        st.sampled_from(["sotw", "delta"]),
        st.sampled_from(["ok", "ok", "ok", "none", "long"]),
    ),
    st.tuples(st.just("request"), type_urls, names, nonces, st.text(max_size=12)),
    st.tuples(st.just("huge"), st.sampled_from(KNOWN), st.integers(MAX_NAMES - 5, MAX_NAMES + 5)),
    st.tuples(st.just("ack"), st.sampled_from(KNOWN)),
    st.tuples(st.just("nack_storm"), st.sampled_from(KNOWN), st.integers(1, 150), st.booleans()),
    st.tuples(st.just("garbage"), st.binary(min_size=1, max_size=64)),
    st.tuples(st.just("drop")),
    st.tuples(st.just("half_close")),
    st.tuples(st.just("reload")),
)
scripts = st.lists(st.tuples(st.integers(0, SLOTS - 1), actions), min_size=1, max_size=25)


RESPONSES = (discovery_pb2.DiscoveryResponse, discovery_pb2.DeltaDiscoveryResponse)


@dataclass
class Slot:
    stream: Stream | None = None
    variant: str = "sotw"
    node: str = "ok"  # what the first request says: "ok", "none" (no node id), "long"
    raw: bool = False  # the stream writes bytes: messages are serialized first
    first: bool = True
    nonces: dict[str, str] = field(default_factory=dict)  # type URL -> latest nonce received
    versions: dict[str, str] = field(default_factory=dict)

    def drain(self) -> None:
        """Note the responses that arrived (their nonces), without waiting."""
        if self.stream is None:
            return
        while not self.stream.inbox.empty():
            item = self.stream.inbox.get_nowait()
            if isinstance(item, RESPONSES):
                self.nonces[item.type_url] = item.nonce
                if self.variant == "sotw":
                    self.versions[item.type_url] = item.version_info


# A fresh stream's first answer after an example takes milliseconds (probe_seconds keeps
# the figures); this is the ceiling on a busy machine, the bound of "promptly".
PROBE_CEILING = 10.0


class Hostile:
    """The server under attack, a snapshot that reloads, and the checks after each example."""

    def __init__(self, procs: ProcessGroup, tmp_path: Path) -> None:
        self.cfg = tmp_path / "snapshots"
        self.listen_port, self.upstream_port = free_port(), free_port()
        self.reloads = 0
        self.write()
        self.server = XdsServer(procs, self.cfg, extra_args=LIMITS)
        self.server.proc.max_seconds = 1800  # the watchdog: the slow version runs long
        self.server.start()
        self.probes = 0
        self.probe_seconds: list[float] = []
        self.probe()
        self.idle_tasks = self.tasks_when_idle()

    def write(self) -> None:
        hello = f"v{self.reloads}"
        write_snapshot(
            self.cfg / "edge.yaml", resources(self.listen_port, self.upstream_port, hello)
        )

    def tasks(self) -> float:
        return metric(self.server.admin_port, "xdsplane_asyncio_tasks")

    def tasks_when_idle(self) -> float:
        wait_until(lambda: self.server.streams() == [], 10, what="no stream left")
        return self.tasks()

    def rss(self) -> int:
        """The server's resident memory (bytes), from /proc."""
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def summary(self) -> str:
        """What the server made of it all: refusals, NACKs, throttled requests."""
        m = Scrape(self.server.admin_port)
        nacks = sum(m.get("xdsplane_nacks_total", type=t.short) for t in ResourceType)
        throttled = m.get("xdsplane_requests_throttled_total")
        refused = self.server.status()["refused"]
        return f"refused {refused}, {nacks:.0f} NACKs counted, {throttled:.0f} requests throttled"

    def probe(self) -> None:
        """A fresh well-formed stream gets the current snapshot's clusters promptly."""
        self.probes += 1
        variant = "sotw" if self.probes % 2 else "delta"

        async def main() -> float:
            async with grpc.aio.insecure_channel(self.server.xds_address) as channel:
                s = Stream.open(channel, variant, timeout=PROBE_CEILING + 5)
                req: Any
                if variant == "sotw":
                    req = discovery_pb2.DiscoveryRequest(type_url=CDS)
                else:
                    req = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS)
                req.node.id = f"probe-{self.probes}"
                started = time.monotonic()
                await s.write(req)
                got = await s.read(PROBE_CEILING)
                took = time.monotonic() - started
                if variant == "sotw":
                    assert len(got.resources) == 1 and got.type_url == CDS, got
                else:
                    assert [r.name for r in got.resources] == ["alpha"], got
                s.cancel()
                return took

        self.probe_seconds.append(asyncio.run(main()))

    def check(self) -> None:
        self.server.proc.ensure_alive()
        wait_until(lambda: self.server.streams() == [], 10, what="every stream closed")
        wait_until(
            lambda: self.tasks() <= self.idle_tasks, 10, what=f"tasks back to {self.idle_tasks}"
        )
        self.probe()
        assert self.probe_seconds[-1] < PROBE_CEILING, self.probe_seconds[-1]
        self.server.proc.ensure_alive()

    # -- one example --------------------------------------------------------------------------

    def play(self, script: list[tuple[int, tuple[Any, ...]]]) -> None:
        asyncio.run(self._play(script))
        self.check()

    async def _play(self, script: list[tuple[int, tuple[Any, ...]]]) -> None:
        async with grpc.aio.insecure_channel(self.server.xds_address) as channel:
            slots = [Slot() for _ in range(SLOTS)]
            try:
                for index, action in script:
                    slots[index].drain()
                    slots[index] = self._opened(channel, slots[index], action)
                    # A write to a stream the server ended (or that was dropped) fails:
                    # that is the client's problem, not the server's.
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await self._act(slots[index], action)
                    await asyncio.sleep(0)
            finally:
                for slot in slots:
                    if slot.stream is not None:
                        slot.stream.cancel()

    @staticmethod
    def _opened(channel: grpc.aio.Channel, slot: Slot, action: tuple[Any, ...]) -> Slot:
        """The slot for ``action``: a new stream for "open" and "garbage" (the one it had
        is dropped mid-way), and for any other action on a slot with no stream."""
        kind = action[0]
        if kind == "reload" or (slot.stream is not None and kind not in ("open", "garbage")):
            return slot
        if slot.stream is not None:
            slot.stream.cancel()
        variant, node = (action[1], action[2]) if kind == "open" else ("sotw", "ok")
        raw = kind == "garbage"
        return Slot(Stream.open(channel, variant, timeout=30, raw=raw), variant, node, raw)

    async def _act(self, slot: Slot, action: tuple[Any, ...]) -> None:
        kind = action[0]
        if kind == "reload":
            self.reloads += 1
            await asyncio.to_thread(self.write)
            return
        s = slot.stream
        if kind == "open" or s is None:
            return
        if kind == "drop":
            s.cancel()
            slot.stream = None
        elif kind == "half_close":
            await s.call.done_writing()
        elif kind == "garbage":
            await s.write(action[1])
        elif kind == "request":
            _, url, wanted, nonce, version = action
            nonce = slot.nonces.get(url, "") if nonce == "latest" else nonce
            await self._send(slot, url, wanted, nonce, version)
        elif kind == "huge":
            _, url, count = action
            await self._send(slot, url, [f"name-{i}" for i in range(count)], "", "")
        elif kind == "ack":
            url = action[1]
            await self._send(slot, url, [], slot.nonces.get(url, ""), slot.versions.get(url, ""))
        elif kind == "nack_storm":
            _, url, count, real = action
            for i in range(count):
                nonce = slot.nonces.get(url, "") if real else f"bogus-{i}"
                await self._send(slot, url, [], nonce, "", error=f"storm {i}")

    @staticmethod
    async def _send(
        slot: Slot,
        url: str,
        wanted: list[str],
        nonce: str,
        version: str,
        error: str | None = None,
    ) -> None:
        assert slot.stream is not None
        req: Any
        if slot.variant == "sotw":
            req = discovery_pb2.DiscoveryRequest(
                type_url=url, resource_names=wanted, response_nonce=nonce, version_info=version
            )
        else:
            req = discovery_pb2.DeltaDiscoveryRequest(
                type_url=url,
                resource_names_subscribe=wanted,
                resource_names_unsubscribe=wanted[:1],
                response_nonce=nonce,
                initial_resource_versions={n: version for n in wanted[:3]},
            )
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        if slot.first:
            slot.first = False
            if slot.node == "ok":
                req.node.id = f"hostile-{id(slot) % 7}"
            elif slot.node == "long":
                req.node.id = "n" * (MAX_NODE_FIELD + 1)
        await slot.stream.write(req.SerializeToString() if slot.raw else req)


@pytest.fixture
def hostile(procs: ProcessGroup, tmp_path: Path) -> Hostile:
    return Hostile(procs, tmp_path)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=scripts)
def test_hostile_clients_leave_the_server_serving(hostile: Hostile, script: Any) -> None:
    hostile.play(script)


@pytest.mark.slow
def test_hostile_clients_for_long_memory_stays_bounded(hostile: Hostile) -> None:
    """Many examples; resident memory after the first fifty is the baseline."""
    rss: list[int] = []

    @settings(
        max_examples=SLOW_EXAMPLES,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )
    @given(script=scripts)
    def run(script: Any) -> None:
        hostile.play(script)
        rss.append(hostile.rss())

    started = time.monotonic()
    run()
    took = time.monotonic() - started
    base = rss[min(50, len(rss) - 1)]
    growth = rss[-1] - base
    print(
        f"\n{len(rss)} examples in {took:.0f} s; RSS after 50: {base / 2**20:.1f} MiB, at the "
        f"end: {rss[-1] / 2**20:.1f} MiB, peak {max(rss) / 2**20:.1f} MiB; probe median "
        f"{sorted(hostile.probe_seconds)[len(hostile.probe_seconds) // 2] * 1000:.1f} ms, "
        f"max {max(hostile.probe_seconds) * 1000:.1f} ms; {hostile.reloads} reloads; "
        f"{hostile.summary()}"
    )
    assert growth < 16 * 2**20, (base, rss[-1])
