"""Fan-out benchmark: one cluster edit pushed to N ADS streams, SotW and delta.

    .venv/bin/python benchmarks/bench_fanout.py [--quick] [--streams 100,1000] [--rounds N]

``xdsplane serve`` runs as a subprocess on the 2,000-cluster folder of bench_build (no
``nodes:``, so every node gets it). This process is the client: one asyncio loop opening N
ADS streams over N/100 channels (each its own TCP connection), node ids ``edge-0`` ..
``edge-N-1``. Each stream subscribes to CDS as a wildcard, like Envoy, and acknowledges
every response (version_info / response_nonce for SotW, response_nonce for delta). Only the
fields a client needs to ACK are decoded (a minimal message type: the 2,000 clusters of a
SotW response are skipped as unknown fields), so the client's cost stays small.

Once every stream holds the initial version, one cluster's connect_timeout changes (file
written as tmp + rename) and the time from the rename to the last stream's ACK of the new
version is measured (all streams: the slowest one; p50 too). The server's RSS is read from
/proc (VmRSS with all streams connected and settled; VmHWM is its peak since start).

Goals at 1,000 streams: delta all acknowledged within 250 ms, SotW (full CDS) within 1.5 s,
server RSS at most 150 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import _procs
import _snapgen
import grpc
from _common import fmt_ms, p50, table, verdict
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
SOTW_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"
DELTA_METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources"
STREAMS_PER_CHANNEL = 100
EDITED_CLUSTER = 700
DELTA_GOAL = 0.250
SOTW_GOAL = 1.5
RSS_GOAL = 150 * 1024 * 1024


def _mini_types() -> tuple[Any, Any]:
    """Response types holding only what an ACK needs; everything else stays unparsed."""
    f = descriptor_pb2.FileDescriptorProto(
        name="bench_mini.proto", package="bench", syntax="proto3"
    )
    s = descriptor_pb2.FieldDescriptorProto
    opt, rep = s.LABEL_OPTIONAL, s.LABEL_REPEATED
    string, msg = s.TYPE_STRING, s.TYPE_MESSAGE
    m = f.message_type.add(name="SotwResponse")
    m.field.add(name="version_info", number=1, label=opt, type=string)
    m.field.add(name="type_url", number=4, label=opt, type=string)
    m.field.add(name="nonce", number=5, label=opt, type=string)
    r = f.message_type.add(name="ResourceName")
    r.field.add(name="version", number=1, label=opt, type=string)
    r.field.add(name="name", number=3, label=opt, type=string)
    d = f.message_type.add(name="DeltaResponse")
    d.field.add(name="system_version_info", number=1, label=opt, type=string)
    d.field.add(name="resources", number=2, label=rep, type=msg, type_name=".bench.ResourceName")
    d.field.add(name="type_url", number=4, label=opt, type=string)
    d.field.add(name="nonce", number=5, label=opt, type=string)
    d.field.add(name="removed_resources", number=6, label=rep, type=string)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(f)
    return (
        message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.SotwResponse")),
        message_factory.GetMessageClass(pool.FindMessageTypeByName("bench.DeltaResponse")),
    )


SotwResponse, DeltaResponse = _mini_types()


def _identity(data: bytes) -> bytes:
    return data


@dataclass
class Round:
    """One edit: which streams still wait for it, and when each acknowledged it."""

    started: float
    waiting: set[int]
    acked_at: dict[int, float] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    contents: dict[int, tuple[str, ...]] = field(default_factory=dict)


@dataclass
class Clients:
    variant: str
    n: int
    responses: list[int] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    synced: asyncio.Event = field(default_factory=asyncio.Event)
    synced_count: int = 0
    round: Round | None = None
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.responses = [0] * self.n
        self.versions = [""] * self.n

    def record(self, i: int, version: str, names: tuple[str, ...], acked: float) -> None:
        self.responses[i] += 1
        self.versions[i] = version
        if self.responses[i] == 1:
            self.synced_count += 1
            if self.synced_count == self.n:
                self.synced.set()
        rnd = self.round
        if rnd is not None and i in rnd.waiting:
            rnd.waiting.discard(i)
            rnd.acked_at[i] = acked
            rnd.contents[i] = names
            if not rnd.waiting:
                rnd.done.set()


async def sotw_stream(i: int, channel: grpc.aio.Channel, c: Clients) -> None:
    call = channel.stream_stream(
        SOTW_METHOD, request_serializer=_identity, response_deserializer=SotwResponse.FromString
    )()
    node = discovery_pb2.DiscoveryRequest(type_url=CDS)
    node.node.id = f"edge-{i}"
    node.node.cluster = "edge"
    await call.write(node.SerializeToString())
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce
        )
        await call.write(ack.SerializeToString())
        c.record(i, resp.version_info, (), time.perf_counter())


async def delta_stream(i: int, channel: grpc.aio.Channel, c: Clients) -> None:
    call = channel.stream_stream(
        DELTA_METHOD, request_serializer=_identity, response_deserializer=DeltaResponse.FromString
    )()
    first = discovery_pb2.DeltaDiscoveryRequest(type_url=CDS)
    first.node.id = f"edge-{i}"
    first.node.cluster = "edge"
    await call.write(first.SerializeToString())
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        await call.write(ack.SerializeToString())
        names = tuple(r.name for r in resp.resources) if len(resp.resources) < 10 else ()
        c.record(i, resp.system_version_info, names, time.perf_counter())


@dataclass
class Result:
    variant: str
    n: int
    connect: float  # open all streams -> every stream ACKed its first response
    rounds: list[list[float]]  # per edit: per stream, rename -> ACK
    rss_before: int
    rss_synced: int
    rss_connected: int
    rss_after: int
    hwm: int
    server_cpu_connect: float
    server_cpu_push: list[float]
    client_cpu_push: list[float]
    reloads: list[float]
    problems: list[str]


async def run_clients(
    variant: str,
    n: int,
    server: Any,
    folder: Path,
    rounds: int,
    edit_seq: list[int],
    settle: float = 3.0,
    shape: _snapgen.Shape | None = None,
) -> Result:
    pid = server.proc.pid
    rss_before = _procs.rss(pid)
    c = Clients(variant, n)
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    channels = [
        grpc.aio.insecure_channel(server.xds_address, options=options)
        for _ in range(-(-n // STREAMS_PER_CHANNEL))
    ]
    stream = sotw_stream if variant == "sotw" else delta_stream
    cpu0 = _procs.cpu_seconds(pid)
    t0 = time.perf_counter()
    tasks = [
        asyncio.create_task(stream(i, channels[i // STREAMS_PER_CHANNEL], c)) for i in range(n)
    ]
    problems: list[str] = []
    try:
        await asyncio.wait_for(c.synced.wait(), timeout=300)
        connect = time.perf_counter() - t0
        cpu_connect = _procs.cpu_seconds(pid) - cpu0
        await asyncio.sleep(0.5)  # let the last ACKs reach the server before reading RSS
        rss_synced = _procs.rss(pid)
        await asyncio.sleep(settle)  # response buffers of the initial sync drain meanwhile
        rss_connected = _procs.rss(pid)
        initial = set(c.versions)
        if len(initial) != 1:
            problems.append(f"streams hold {len(initial)} different initial versions")
        extra = sum(c.responses) - n
        if extra:
            problems.append(f"{extra} responses beyond one per stream before any edit")
        results: list[list[float]] = []
        server_cpu: list[float] = []
        client_cpu: list[float] = []
        reloads: list[float] = []
        shape = shape or _snapgen.Shape()
        edited = min(EDITED_CLUSTER, shape.clusters - 1)
        team = _snapgen.team_of(edited, shape)
        path = folder / "clusters" / f"team-{team:03d}.yaml"
        tmp_dir = folder.parent
        for _ in range(rounds):
            edit_seq[0] += 1
            text = _snapgen.team_text(team, shape, {edited: 1000 + 10 * edit_seq[0]})
            before = list(c.responses)
            tmp = tmp_dir / f".bench-{edit_seq[0]}.tmp"
            tmp.write_text(text)
            s_cpu0, c_cpu0 = _procs.cpu_seconds(pid), time.process_time()
            rnd = Round(time.perf_counter(), set(range(n)))
            c.round = rnd
            rnd.started = time.perf_counter()
            tmp.replace(path)
            try:
                await asyncio.wait_for(rnd.done.wait(), timeout=60)
            except TimeoutError:
                problems.append(f"{len(rnd.waiting)} streams never got the edit")
            c.round = None
            await asyncio.sleep(0.3)  # anything else the edit causes arrives now
            server_cpu.append(_procs.cpu_seconds(pid) - s_cpu0)
            client_cpu.append(time.process_time() - c_cpu0)
            with contextlib.suppress(OSError, KeyError, AssertionError, ValueError):
                reloads.append(server.status()["reload"]["last_duration_ms"] / 1000)
            results.append([t - rnd.started for t in rnd.acked_at.values()])
            more = sum(c.responses) - sum(before) - n
            if more:
                problems.append(f"{more} responses beyond one per stream for one edit")
            versions = set(c.versions)
            if len(versions) != 1 or versions & initial:
                problems.append("streams disagree on the version after the edit")
            initial = versions
            if variant == "delta":
                wrong = [
                    i
                    for i, names in rnd.contents.items()
                    if names != (_snapgen.cluster_name(edited),)
                ]
                if wrong:
                    problems.append(f"{len(wrong)} delta updates did not carry just the edit")
        rss_after = _procs.rss(pid)
        hwm = _procs.proc_status(pid)["VmHWM"]
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
    return Result(
        variant,
        n,
        connect,
        results,
        rss_before,
        rss_synced,
        rss_connected,
        rss_after,
        hwm,
        cpu_connect,
        server_cpu,
        client_cpu,
        reloads,
        problems,
    )


def wrap(server: Any, proposals: str, gc_log: str | None, env: list[str]) -> None:
    """Start the server through _serve_diag.py (prototype fixes, GC log) when asked."""
    if proposals or gc_log:
        argv = server.proc.argv
        extra = ["--proposals", proposals] if proposals else []
        extra += ["--gc-log", gc_log] if gc_log else []
        cli = argv.index("-m")
        server.proc.argv = [
            argv[0],
            str(Path(__file__).resolve().parent / "_serve_diag.py"),
            *extra,
            "--",
            *argv[cli + 2 :],
        ]
    if env:
        import os

        server.proc.env = {**os.environ, **dict(e.split("=", 1) for e in env)}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="50 streams, one edit (< 30 s)")
    ap.add_argument("--streams", help="comma-separated stream counts (default 100,1000)")
    ap.add_argument("--variants", default="delta,sotw")
    ap.add_argument("--rounds", type=int, help="edits per run (default 3, quick 1)")
    ap.add_argument(
        "--proposals",
        default="",
        help="run the server with these prototype fixes (_proposals.py), e.g. delta,sotw",
    )
    ap.add_argument("--clusters", type=int, help="clusters in the folder (default 2000)")
    ap.add_argument("--gc-log", metavar="FILE", help="log the server's GC pauses to FILE")
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server (e.g. MALLOC_ARENA_MAX=2)",
    )
    args = ap.parse_args()
    counts = [int(x) for x in (args.streams or ("50" if args.quick else "100,1000")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    variants = args.variants.split(",")
    settle = 1.0 if args.quick else 3.0
    shape = _snapgen.Shape()
    if args.clusters:
        c = args.clusters
        shape = _snapgen.Shape(
            clusters=c,
            listeners=max(1, c // 10),
            cluster_files=max(1, c // 20),
            listener_files=max(1, min(10, c // 200)),
            secret_files=max(1, min(10, c // 200)),
        )

    print(_common.header("bench_fanout: one cluster edit to N ADS streams", args.quick))
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-fanout-"))
    folder = workdir / "snap"
    procs = _procs.ProcessGroup(workdir / "logs")
    results: list[Result] = []
    edit_seq = [0]
    try:
        counts_desc = _snapgen.generate(folder, shape)
        print("folder: " + ", ".join(f"{v} {k}" for k, v in counts_desc.items()))
        for variant in variants:
            for n in counts:
                server = _procs.XdsServer(
                    procs,
                    folder,
                    name=f"xdsplane-{variant}-{n}",
                    extra_args=["--log-level", "warning"],
                )
                server.proc.cwd = workdir  # `-m xdsplane` must not pick up ./xdsplane first
                wrap(server, args.proposals, args.gc_log, args.server_env)
                server.start(timeout=90)
                try:
                    results.append(
                        asyncio.run(
                            run_clients(variant, n, server, folder, rounds, edit_seq, settle, shape)
                        )
                    )
                finally:
                    server.stop()
                r = results[-1]
                print(
                    f"  {variant:5} {n:5} streams: connect {r.connect:.2f} s, "
                    f"edit {max(max(x) for x in r.rounds) * 1000:.0f} ms (worst), "
                    f"RSS {_procs.mb(r.rss_connected)}"
                    + (f"  PROBLEMS: {r.problems}" if r.problems else "")
                )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    rows = []
    for r in results:
        last = [max(x) for x in r.rounds]
        med = [p50(x) for x in r.rounds]
        goal = DELTA_GOAL if r.variant == "delta" else SOTW_GOAL
        at_goal_scale = r.n >= 1000
        rows.append(
            [
                r.variant,
                r.n,
                fmt_ms(p50(last), 0),
                fmt_ms(max(last), 0),
                fmt_ms(p50(med), 0),
                " / ".join(f"{x * 1000:.0f}" for x in last),
                fmt_ms(p50(r.reloads), 0) if r.reloads else "-",
                f"{p50(r.server_cpu_push):.2f} s",
                f"{p50(r.client_cpu_push):.2f} s",
                f"<= {goal * 1000:.0f} ms" if at_goal_scale else "",
                verdict(p50(last), goal) if at_goal_scale else "",
            ]
        )
    print(f"edit -> every stream ACKed the new version ({rounds} edit(s) per row):")
    print(
        table(
            [
                "variant",
                "streams",
                "all ACKed p50",
                "worst",
                "median stream",
                "each edit (ms)",
                "server reload",
                "server CPU",
                "client CPU",
                "goal",
                "status",
            ],
            rows,
        )
    )
    print()
    rows = []
    for r in results:
        at_goal_scale = r.n >= 1000
        rows.append(
            [
                r.variant,
                r.n,
                _procs.mb(r.rss_before),
                _procs.mb(r.rss_synced),
                _procs.mb(r.rss_connected),
                _procs.mb(r.rss_after),
                _procs.mb(r.hwm),
                f"{r.connect:.2f} s",
                f"{r.server_cpu_connect:.2f} s",
                "<= 150 MB" if at_goal_scale else "",
                verdict(r.rss_connected, RSS_GOAL) if at_goal_scale else "",
            ]
        )
    print(
        "server memory (RSS: before any stream, 0.5 s after every stream ACKed its first\n"
        f"response, {settle:.0f} s later (graded), after the edits, peak) and the initial sync:"
    )
    print(
        table(
            [
                "variant",
                "streams",
                "RSS idle",
                "at sync",
                f"connected +{settle:.0f} s",
                "after edits",
                "peak (HWM)",
                "initial sync",
                "server CPU",
                "goal (RSS)",
                "status",
            ],
            rows,
        )
    )
    problems = [f"{r.variant}/{r.n}: {p}" for r in results for p in r.problems]
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
