"""The limits of ``xdsplane serve`` on ADS clients, over real gRPC against the real server.

Each limit is set low on the command line and crossed by a scripted client: what the client
sees past it (RESOURCE_EXHAUSTED and the message, or a slowed-down stream), what the server
counts (/metrics, /status), and that other streams are not touched. A real Envoy with the
default limits stays far below them (its peak burst and throttled count, from /status).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from ads_client import Stream
from envoy.service.discovery.v3 import discovery_pb2
from harness import (
    ProcessGroup,
    Upstream,
    XdsServer,
    free_port,
    wait_until,
    write_snapshot,
    xdsplane_argv,
)
from test_observability import Scrape, metric, resources

from xdsplane.server import limits as limits_module
from xdsplane.server.limits import MAX_NODE_FIELD, Limits, TokenBucket

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


def sotw(type_url: str, node: str | None = None, names: list[str] | None = None, **kw: Any) -> Any:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, resource_names=names or [], **kw)
    if node is not None:
        req.node.id = node
    return req


def delta(type_url: str, node: str | None = None, **kw: Any) -> Any:
    req = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, **kw)
    if node is not None:
        req.node.id = node
    return req


def serve(procs: ProcessGroup, tmp_path: Path, *limits: str, port: int = 0) -> XdsServer:
    """A server with ``limits`` (flags) on a one-listener policy (listening on ``port``)."""
    cfg = tmp_path / "snapshots"
    write_snapshot(cfg / "edge.yaml", resources(port or free_port(), free_port(), "v1"))
    return XdsServer(procs, cfg, extra_args=limits).start()


def run(server: XdsServer, scenario: Callable[[grpc.aio.Channel], Awaitable[None]]) -> None:
    async def main() -> None:
        async with grpc.aio.insecure_channel(server.xds_address) as channel:
            await scenario(channel)

    asyncio.run(main())


async def cds_stream(channel: grpc.aio.Channel, node: str) -> tuple[Stream, Any]:
    """A SotW stream that subscribed to CDS and got it: (stream, the response)."""
    s = Stream.open(channel, "sotw")
    await s.write(sotw(CDS, node))
    got = await s.read(10)
    assert got.type_url == CDS and len(got.resources) == 1
    return s, got


async def still_served(s: Stream, node: str = "") -> None:
    """An open stream still answers: a new RDS subscription gets the route."""
    await s.write(sotw(RDS, names=["http"]))
    got = await s.read(10)
    assert got.type_url == RDS and len(got.resources) == 1, (node, got)


# -- message size -------------------------------------------------------------------------------


def test_a_request_over_max_message_bytes_ends_its_stream_only(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    server = serve(procs, tmp_path, "--max-message-bytes", "65536")

    async def scenario(channel: grpc.aio.Channel) -> None:
        other, _ = await cds_stream(channel, "edge-other")
        big = Stream.open(channel, "sotw")
        await big.write(sotw(EDS, "edge-big", names=[f"cluster-{i:06d}" for i in range(8000)]))
        error = await big.ended(10)
        assert error is not None and error.code() == EXHAUSTED, error
        assert "larger than max" in str(error.details()), error.details()
        await still_served(other)
        # Just under the limit is served.
        fits = Stream.open(channel, "sotw")
        await fits.write(sotw(EDS, "edge-fits", names=["alpha", *(f"c{i}" for i in range(5000))]))
        got = await fits.read(10)
        assert [r.type_url for r in got.resources] == [EDS]
        for s in (other, fits):
            s.cancel()

    run(server, scenario)
    wait_until(lambda: server.streams() == [], 10, what="streams closed")


# -- concurrent streams -------------------------------------------------------------------------


def test_streams_past_max_streams_are_refused_and_counted_open_ones_untouched(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    server = serve(procs, tmp_path, "--max-streams", "3")

    async def scenario(channel: grpc.aio.Channel) -> None:
        opened = [await cds_stream(channel, f"edge-{i}") for i in range(3)]
        for variant in ("sotw", "delta"):
            extra = Stream.open(channel, variant)
            await extra.write(sotw(CDS, "edge-x") if variant == "sotw" else delta(CDS, "edge-x"))
            error = await extra.ended(10)
            assert error is not None and error.code() == EXHAUSTED, error
            assert "at most 3 ADS streams" in str(error.details())
            assert "--max-streams" in str(error.details())
        for i, (s, _) in enumerate(opened):
            await still_served(s, f"edge-{i}")
        assert (
            metric(server.admin_port, "xdsplane_streams_refused_total", reason="max_streams") == 2
        )
        assert server.status()["refused"] == {"max_streams": 2}
        assert len(server.streams()) == 3
        # One closes: the next is served.
        opened[0][0].cancel()
        await asyncio.to_thread(
            wait_until, lambda: len(server.streams()) == 2, 10, what="one stream closed"
        )
        again, _ = await cds_stream(channel, "edge-again")
        for s in [again, *(s for s, _ in opened[1:])]:
            s.cancel()

    run(server, scenario)


# -- request rate -------------------------------------------------------------------------------


def test_token_bucket_waits_exactly_past_the_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    # The bucket's clock stands still: on a busy machine the real one moves between takes.
    monkeypatch.setattr(limits_module, "time", SimpleNamespace(monotonic=lambda: 1000.0))
    bucket = TokenBucket(rate=10.0, burst=3)
    assert [bucket.take() == 0 for _ in range(3)] == [True, True, True]
    wait = bucket.take()
    assert wait == pytest.approx(0.1)
    assert bucket.peak == 4  # one past the burst
    assert Limits(request_rate=0).bucket() is None


def test_a_stream_over_its_request_rate_is_slowed_down_not_closed_others_unaffected(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    rate, burst, sent = 20, 5, 45  # the noisy stream is held about 2 s
    server = serve(procs, tmp_path, "--max-request-rate", str(rate), "--request-burst", str(burst))

    async def scenario(channel: grpc.aio.Channel) -> None:
        s, first = await cds_stream(channel, "edge-noisy")  # 1 token
        started = time.monotonic()
        for _ in range(sent - 2):  # ACKs of the same response: never answered
            await s.write(sotw(CDS, version_info=first.version_info, response_nonce=first.nonce))
        await s.write(sotw(RDS, names=["http"]))  # answered once the server reads it
        # Meanwhile another stream is served at once.
        quiet_started = time.monotonic()
        quiet, _ = await cds_stream(channel, "edge-quiet")
        quiet_took = time.monotonic() - quiet_started
        got = await s.read(15)
        took = time.monotonic() - started
        assert got.type_url == RDS
        # The last request waited for (sent - burst) tokens at `rate` a second.
        assert took >= (sent - burst) / rate * 0.9, took
        # The quiet stream was answered while the noisy one was still held back (an order,
        # not a timing: the hold lasts ~2 s, the quiet stream's answer takes milliseconds).
        assert quiet_took < took, (quiet_took, took)
        info = server.stream("edge-noisy")
        assert info["requests"] == sent
        assert info["throttled"] >= sent - burst - 3, info
        assert metric(server.admin_port, "xdsplane_requests_throttled_total") == info["throttled"]
        await still_served(quiet)  # nothing was closed
        assert server.status()["refused"] == {}
        s.cancel()
        quiet.cancel()

    run(server, scenario)


# -- resource names -----------------------------------------------------------------------------


def test_more_names_than_max_names_ends_the_stream(procs: ProcessGroup, tmp_path: Path) -> None:
    server = serve(procs, tmp_path, "--max-names", "1000")

    async def scenario(channel: grpc.aio.Channel) -> None:
        ok = Stream.open(channel, "sotw")
        await ok.write(sotw(EDS, "edge-ok", names=["alpha", *(f"n{i}" for i in range(999))]))
        assert len((await ok.read(10)).resources) == 1

        over = Stream.open(channel, "sotw")
        await over.write(sotw(EDS, "edge-over", names=[f"n{i}" for i in range(1001)]))
        error = await over.ended(10)
        assert error is not None and error.code() == EXHAUSTED, error
        assert str(error.details()) == (
            "1001 resource names for EDS on one stream; the limit is 1000 (--max-names)"
        )

        # Delta: the subscription grows request by request; re-subscribing is not growth.
        d = Stream.open(channel, "delta")
        first = [f"n{i}" for i in range(600)]
        await d.write(delta(EDS, "edge-delta", resource_names_subscribe=["alpha", *first]))
        assert [r.name for r in (await d.read(10)).resources] == ["alpha"]
        await d.write(delta(EDS, resource_names_subscribe=first))  # the same names again
        await d.write(delta(EDS, resource_names_subscribe=[f"m{i}" for i in range(400)]))
        error = await d.ended(10)
        assert error is not None and error.code() == EXHAUSTED, error
        assert str(error.details()).startswith("1001 resource names for EDS")
        await still_served(ok)
        ok.cancel()

    run(server, scenario)
    assert server.status()["refused"] == {"max_names": 2}
    assert metric(server.admin_port, "xdsplane_streams_refused_total", reason="max_names") == 2


def test_overlong_node_id_is_refused(procs: ProcessGroup, tmp_path: Path) -> None:
    server = serve(procs, tmp_path)

    async def scenario(channel: grpc.aio.Channel) -> None:
        s = Stream.open(channel, "delta")
        await s.write(delta(CDS, "n" * (MAX_NODE_FIELD + 1)))
        error = await s.ended(10)
        assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
        ok, _ = await cds_stream(channel, "n" * MAX_NODE_FIELD)
        ok.cancel()

    run(server, scenario)
    assert server.status()["refused"] == {"node_too_long": 1}


@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_garbage_requests_end_their_stream_with_a_reason(
    procs: ProcessGroup, tmp_path: Path, variant: str
) -> None:
    """Requests wait in the inbox as bytes and are decoded when handled (ads.py): bytes
    that are no request end the stream with INVALID_ARGUMENT naming the message, counted,
    before admission and after it; other streams are served on."""
    server = serve(procs, tmp_path)
    want = "DeltaDiscoveryRequest" if variant == "delta" else "DiscoveryRequest"
    good = (delta(CDS, "n1") if variant == "delta" else sotw(CDS, "n1")).SerializeToString()

    async def scenario(channel: grpc.aio.Channel) -> None:
        ok, _ = await cds_stream(channel, "n0")
        for first in (b"\xff\xff\xff\xff", good):  # garbage first, then after admission
            s = Stream.open(channel, variant, raw=True)
            await s.write(first)
            if first == good:
                await s.read(10)  # admitted and served
                await s.write(b"\x0a\xff\xff")  # a field whose length runs past the end
            error = await s.ended(10)
            assert error is not None and error.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert str(error.details()).startswith(f"the request is not a {want}"), error
        await still_served(ok)
        ok.cancel()

    run(server, scenario)
    assert server.status()["refused"] == {"bad_request": 2}
    assert metric(server.admin_port, "xdsplane_streams_refused_total", reason="bad_request") == 2


def test_bad_limit_values_are_refused_by_the_command(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        xdsplane_argv(
            "serve", "--config", str(tmp_path), "--max-streams", "0", "--max-request-rate", "-1"
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        "xdsplane serve: --max-streams must be at least 1",
        "xdsplane serve: --max-request-rate must not be negative",
    ]


def test_write_gate_flags_reach_the_server(procs: ProcessGroup, tmp_path: Path) -> None:
    """--write-budget and --write-stall set the server's write gate (gate.py): /status
    shows them, and with a budget smaller than one response each response is written
    alone (the gate's peak is one response, never two streams' together)."""
    server = serve(procs, tmp_path, "--write-budget", "100", "--write-stall", "0.25")
    gate = server.status()["write_gate"]
    assert (gate["budget"], gate["stall"], gate["in_use"], gate["peak"]) == (100, 0.25, 0, 0)

    async def scenario(channel: grpc.aio.Channel) -> None:
        streams = await asyncio.gather(*(cds_stream(channel, f"edge-{i}") for i in range(4)))
        sizes = {got.ByteSize() for _, got in streams}
        after = server.status()["write_gate"]
        assert after["in_use"] == 0
        # one CDS response at a time (each is over the 100-byte budget); the gate's peak
        # is the largest single response's bytes, within a few bytes of framing
        assert 100 < after["peak"] < 2 * min(sizes), (after, sizes)
        for s, _ in streams:
            s.cancel()

    run(server, scenario)
    defaults = serve(procs, tmp_path / "defaults").status()["write_gate"]
    assert (defaults["budget"], defaults["stall"]) == (
        limits_module.WRITE_BUDGET,
        limits_module.WRITE_STALL,
    )


def test_bad_write_gate_values_are_refused_by_the_command(tmp_path: Path) -> None:
    import subprocess

    done = subprocess.run(
        xdsplane_argv(
            "serve", "--config", str(tmp_path), "--write-budget", "0", "--write-stall", "0"
        ),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done
    assert done.stderr.splitlines() == [
        "xdsplane serve: --write-budget must be at least 1 byte",
        "xdsplane serve: --write-stall must be more than 0 s",
    ]


# -- a real Envoy stays far below the defaults --------------------------------------------------


@pytest.mark.envoy
@pytest.mark.parametrize("variant", ["sotw", "delta"])
def test_real_envoy_traffic_stays_far_below_the_default_rate(
    variant: str,
    procs: ProcessGroup,
    tmp_path: Path,
    upstream: Callable[[str], Upstream],
) -> None:
    from test_e2e_envoy import Edge, base_resources

    ups = {"alpha": upstream("alpha")}
    edge = Edge(procs, tmp_path, variant)
    edge.write(base_resources(edge.port, ups))
    edge.start()
    # Ten quick edits, each a push of RDS that Envoy ACKs, as fast as the watcher reloads.
    for i in range(10):
        edge.write(base_resources(edge.port, ups, hello=f"hello v{i + 2}"))
        edge.wait_answer("/hello", f"hello v{i + 2}")
    wait_until(lambda: edge.server.settled(edge.node), 10, what="all types ACKed")
    info = edge.server.stream(edge.node)
    defaults = Limits()
    scrape = Scrape(edge.server.admin_port)
    print(f"\n{variant}: {info['requests']} requests, peak burst {info['peak_burst']}")
    assert info["throttled"] == 0
    assert scrape.get("xdsplane_requests_throttled_total") == 0
    # Startup plus ten pushes: a burst of a handful of requests, a tenth of the default.
    assert 0 < info["peak_burst"] <= defaults.request_burst // 10, info
    assert info["requests"] < 60, info
