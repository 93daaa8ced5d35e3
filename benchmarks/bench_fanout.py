"""Fan-out benchmark: one cluster edit pushed to N ADS streams, SotW and delta.

    .venv/bin/python benchmarks/bench_fanout.py [--quick] [--streams 100,1000] [--rounds N]
        [--clients K]

``xdsplane serve`` runs as a subprocess on the 2,000-cluster folder of bench_build (no
``nodes:``, so every node gets it). The clients run in K spawned processes (default one per
1,250 streams, so that 5,000 streams are not bound by one Python client; quick mode: 2),
each one asyncio loop opening its share of the N ADS streams over channels of 100 streams
(each its own TCP connection), node ids ``edge-0`` .. ``edge-N-1``. Each stream subscribes
to CDS as a wildcard, like Envoy, and acknowledges every response (version_info /
response_nonce for SotW, response_nonce for delta). Only the fields a client needs to ACK
are decoded (a minimal message type: the 2,000 clusters of a SotW response are skipped as
unknown fields), so the client's cost stays small.

Once every stream holds the initial version, one cluster's connect_timeout changes (file
written as tmp + rename) and the time from the rename to the last stream's ACK of the new
version is measured (all streams: the slowest one; p50 too; the processes share the
monotonic clock). The server's memory is read from /proc: its peak (VmHWM) is reset
(``5 > /proc/PID/clear_refs``) before the first stream and again after the settle time, so
each row reports the peak during the initial sync and the peak during the edits, beside
VmRSS at sync, settled, and after the edits.

Goals (issue 15 item 3): at 1,000 streams, peak <= 200 MB and steady RSS <= 150 MB in both
variants, delta p50 <= 250 ms, SotW (full CDS) every edit <= 1.5 s; at 5,000 delta streams,
peak <= 400 MB and every edit <= 1 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections import Counter
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
DELTA_GOAL = 0.250  # 1,000 streams, p50 of the edits
DELTA_GOAL_5000 = 1.0  # 5,000 streams, every edit
SOTW_GOAL = 1.5  # 1,000 streams, every edit
MB = 1024 * 1024
RSS_GOAL = 150 * MB  # 1,000 streams, steady (settled after the sync, after the edits)
PEAK_GOAL = 200 * MB  # 1,000 streams, VmHWM at sync and during the edits
PEAK_GOAL_5000 = 400 * MB
SYNC_TIMEOUT = 150  # seconds for every stream of a row to get its first response


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
    base: int = 0  # stream i's node id is edge-<base + i> (client processes share the ids)

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


async def _open(i: int, channel: grpc.aio.Channel, c: Clients, delta: bool) -> Any:
    """Stream i's ADS call, its first request (CDS by wildcard, the node) written."""
    method, response = (DELTA_METHOD, DeltaResponse) if delta else (SOTW_METHOD, SotwResponse)
    call = channel.stream_stream(
        method, request_serializer=_identity, response_deserializer=response.FromString
    )()
    request = discovery_pb2.DeltaDiscoveryRequest if delta else discovery_pb2.DiscoveryRequest
    first = request(type_url=CDS)
    first.node.id = f"edge-{c.base + i}"
    first.node.cluster = "edge"
    await call.write(first.SerializeToString())
    return call


async def sotw_stream(i: int, channel: grpc.aio.Channel, c: Clients) -> None:
    call = await _open(i, channel, c, delta=False)
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce
        )
        version = resp.version_info
        # The skipped resources stay in the message as unknown fields (610 KB): not kept
        # alive while the stream waits (thousands of streams would hold gigabytes here).
        del resp
        await call.write(ack.SerializeToString())
        c.record(i, version, (), time.perf_counter())


async def delta_stream(i: int, channel: grpc.aio.Channel, c: Clients) -> None:
    call = await _open(i, channel, c, delta=True)
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        names = tuple(r.name for r in resp.resources) if len(resp.resources) < 10 else ()
        version = resp.system_version_info
        del resp  # its resources (unknown fields, ~1 MB at first): not kept while waiting
        await call.write(ack.SerializeToString())
        c.record(i, version, names, time.perf_counter())


EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
# delta-eds: how many clusters' ClusterLoadAssignments it subscribes to (main sets it from
# --clusters; the client processes are spawned and read it from their environment)
EDS_CLUSTERS_ENV = "BENCH_FANOUT_EDS_CLUSTERS"


async def delta_eds_stream(i: int, channel: grpc.aio.Channel, c: Clients) -> None:
    """A delta stream as Envoy opens it: CDS by wildcard, then every cluster's
    ClusterLoadAssignment by name. Every response is ACKed; the EDS ones are recorded (a
    cluster edit reaches Envoy when the cluster's endpoints come again after it)."""
    call = await _open(i, channel, c, delta=True)
    eds = discovery_pb2.DeltaDiscoveryRequest(type_url=EDS)
    clusters = int(os.environ.get(EDS_CLUSTERS_ENV, "2000"))
    eds.resource_names_subscribe.extend(_snapgen.cluster_name(k) for k in range(clusters))
    await call.write(eds.SerializeToString())
    del eds
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DeltaDiscoveryRequest(type_url=resp.type_url, response_nonce=resp.nonce)
        is_eds = resp.type_url == EDS
        names = tuple(r.name for r in resp.resources) if len(resp.resources) < 10 else ()
        version = resp.system_version_info
        del resp
        await call.write(ack.SerializeToString())
        if is_eds:
            c.record(i, version, names, time.perf_counter())


async def sotw_eds_stream(i: int, channel: grpc.aio.Channel, c: Clients) -> None:
    """A SotW stream as Envoy opens it: CDS by wildcard, then every cluster's
    ClusterLoadAssignment by name; every ACK of EDS repeats every name, as Envoy's do. The
    EDS responses are recorded."""
    call = await _open(i, channel, c, delta=False)
    clusters = int(os.environ.get(EDS_CLUSTERS_ENV, "2000"))
    names = [_snapgen.cluster_name(k) for k in range(clusters)]
    eds = discovery_pb2.DiscoveryRequest(type_url=EDS, resource_names=names)
    await call.write(eds.SerializeToString())
    while True:
        resp = await call.read()
        if resp is grpc.aio.EOF:
            return
        ack = discovery_pb2.DiscoveryRequest(
            type_url=resp.type_url, version_info=resp.version_info, response_nonce=resp.nonce
        )
        is_eds = resp.type_url == EDS
        if is_eds:
            ack.resource_names.extend(names)
        version = resp.version_info
        del resp
        await call.write(ack.SerializeToString())
        if is_eds:
            c.record(i, version, (), time.perf_counter())


@dataclass
class Result:
    variant: str
    n: int
    clients: int  # client processes
    load: str  # the load average when the row started
    connect: float  # open all streams -> every stream ACKed its first response
    rounds: list[list[float]]  # per edit: per stream, rename -> ACK
    rss_before: int
    hwm_start: int  # the server's peak before any stream (its start)
    hwm_sync: int  # the peak from the first stream to the end of the settle time
    rss_synced: int
    rss_connected: int
    hwm_steady: int  # the peak during the edits (reset after the settle time)
    rss_after: int  # the settle time after the last edit
    server_cpu_connect: float
    server_cpu_push: list[float]
    client_cpu_push: list[float]
    reloads: list[float]
    problems: list[str]
    rss_edited: int = 0  # right after the last edit reached every stream
    gate_sync: str = ""  # the write gate (/status) after the sync: peak bytes, waited, stalled

    @property
    def peak(self) -> int:
        return max(self.hwm_sync, self.hwm_steady)

    @property
    def steady(self) -> int:
        return max(self.rss_connected, self.rss_after)


def reset_peak(pid: int) -> bool:
    """Reset VmHWM of ``pid`` to its current RSS (Linux: 5 > /proc/PID/clear_refs)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


# -- client processes: each runs its share of the streams in its own asyncio loop ------------


async def _orphaned(parent: int) -> None:
    """End this client process when the benchmark that started it is gone."""
    while os.getppid() == parent:
        await asyncio.sleep(1)
    os._exit(1)


async def _worker(conn: Any, variant: str, address: str, base: int, n: int) -> None:
    loop = asyncio.get_running_loop()
    watch = asyncio.create_task(_orphaned(os.getppid()))

    async def command() -> Any:
        return await loop.run_in_executor(None, conn.recv)

    c = Clients(variant, n, base=base)
    options = [
        ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
        ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ]
    channels = [
        grpc.aio.insecure_channel(address, options=options)
        for _ in range(-(-n // STREAMS_PER_CHANNEL))
    ]
    stream = {
        "sotw": sotw_stream,
        "delta-eds": delta_eds_stream,
        "sotw-eds": sotw_eds_stream,
    }.get(variant, delta_stream)
    assert await command() == "start"
    tasks = [
        asyncio.create_task(stream(i, channels[i // STREAMS_PER_CHANNEL], c)) for i in range(n)
    ]
    try:
        try:
            await asyncio.wait_for(c.synced.wait(), timeout=SYNC_TIMEOUT)
        except TimeoutError:
            ended = Counter(
                repr(t.exception())[:160] if t.exception() else "ended" for t in tasks if t.done()
            )
            conn.send(
                (
                    "failed",
                    f"{n - c.synced_count} of {n} streams never synced; "
                    f"streams ended: {dict(ended)}",
                )
            )
            return
        conn.send(("synced", time.perf_counter()))
        while (cmd := await command()) != "stop":
            if cmd == "state":
                conn.send(("state", sum(c.responses), sorted(set(c.versions))))
                continue
            # "arm": the next edit comes; report when every stream ACKed it
            rnd = Round(time.perf_counter(), set(range(n)))
            c.round = rnd
            cpu0 = time.process_time()
            conn.send(("armed",))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(rnd.done.wait(), timeout=60)
            c.round = None
            await asyncio.sleep(0.3)  # anything else the edit causes arrives now
            conn.send(
                (
                    "round",
                    list(rnd.acked_at.values()),
                    len(rnd.waiting),
                    time.process_time() - cpu0,
                    sum(c.responses),
                    sorted(set(c.versions)),
                    list(rnd.contents.values()),
                )
            )
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for ch in channels:
            await ch.close()
        watch.cancel()
    conn.send(("bye",))


def worker_main(conn: Any, variant: str, address: str, base: int, n: int) -> None:
    asyncio.run(_worker(conn, variant, address, base, n))


class Workers:
    """Client processes (multiprocessing, spawned), streams split evenly between them."""

    def __init__(self, variant: str, n: int, address: str, count: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns: list[Any] = []
        self.procs: list[Any] = []
        share, extra = divmod(n, count)
        base = 0
        for k in range(count):
            size = share + (1 if k < extra else 0)
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=worker_main, args=(child, variant, address, base, size), daemon=True
            )
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
            base += size

    def send(self, msg: Any) -> None:
        for conn in self.conns:
            conn.send(msg)

    def gather(self, timeout: float) -> list[Any]:
        out = []
        deadline = time.monotonic() + timeout
        for conn in self.conns:
            if not conn.poll(max(0.0, deadline - time.monotonic())):
                raise TimeoutError("a client process did not answer")
            msg = conn.recv()
            if msg[0] == "failed":
                raise RuntimeError(msg[1])
            out.append(msg)
        return out

    def stop(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.send("stop")
        for conn in self.conns:
            with contextlib.suppress(OSError, EOFError):
                if conn.poll(30):
                    conn.recv()
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)


def run_clients(
    variant: str,
    n: int,
    server: Any,
    folder: Path,
    rounds: int,
    edit_seq: list[int],
    settle: float = 3.0,
    shape: _snapgen.Shape | None = None,
    clients: int = 1,
    py_spy: str | None = None,
) -> Result:
    pid = server.proc.pid
    load = _common.load()
    rss_before = _procs.rss(pid)
    hwm_start = _procs.proc_status(pid)["VmHWM"]
    workers = Workers(variant, n, server.xds_address, clients)
    problems: list[str] = []
    try:
        time.sleep(0.5)  # the client processes import grpc meanwhile
        if not reset_peak(pid):
            problems.append("cannot reset VmHWM (/proc/PID/clear_refs): peaks are since start")
        cpu0 = _procs.cpu_seconds(pid)
        t0 = time.perf_counter()
        workers.send("start")
        synced_at = [m[1] for m in workers.gather(SYNC_TIMEOUT + 30)]
        connect = max(synced_at) - t0
        cpu_connect = _procs.cpu_seconds(pid) - cpu0
        time.sleep(0.5)  # let the last ACKs reach the server before reading RSS
        rss_synced = _procs.rss(pid)
        time.sleep(settle)  # response buffers of the initial sync drain meanwhile
        rss_connected = _procs.rss(pid)
        hwm_sync = _procs.proc_status(pid)["VmHWM"]
        reset_peak(pid)
        gate_sync = ""
        with contextlib.suppress(OSError, KeyError, AssertionError, ValueError, TypeError):
            g = server.status()["write_gate"]
            gate_sync = (
                f"gate peak {g['peak'] / MB:.0f} MB, {g['waited']} waited, {g['stalled']} stalled"
            )
        workers.send("state")
        states = workers.gather(60)
        total = sum(m[1] for m in states)
        initial = {v for m in states for v in m[2]}
        if len(initial) != 1:
            problems.append(f"streams hold {len(initial)} different initial versions")
        if total != n:
            problems.append(f"{total - n} responses beyond one per stream before any edit")
        results: list[list[float]] = []
        server_cpu: list[float] = []
        client_cpu: list[float] = []
        reloads: list[float] = []
        shape = shape or _snapgen.Shape()
        edited = min(EDITED_CLUSTER, shape.clusters - 1)
        team = _snapgen.team_of(edited, shape)
        path = folder / "clusters" / f"team-{team:03d}.yaml"
        tmp_dir = folder.parent
        spy = start_py_spy(pid, py_spy, f"{variant}-{n}") if py_spy else None
        for _ in range(rounds):
            edit_seq[0] += 1
            text = _snapgen.team_text(team, shape, {edited: 1000 + 10 * edit_seq[0]})
            tmp = tmp_dir / f".bench-{edit_seq[0]}.tmp"
            tmp.write_text(text)
            workers.send("arm")
            workers.gather(60)
            s_cpu0 = _procs.cpu_seconds(pid)
            started = time.perf_counter()
            tmp.replace(path)
            done = workers.gather(120)
            server_cpu.append(_procs.cpu_seconds(pid) - s_cpu0)
            client_cpu.append(sum(m[3] for m in done))
            with contextlib.suppress(OSError, KeyError, AssertionError, ValueError):
                reloads.append(server.status()["reload"]["last_duration_ms"] / 1000)
            results.append([t - started for m in done for t in m[1]])
            missing = sum(m[2] for m in done)
            if missing:
                problems.append(f"{missing} streams never got the edit")
            new_total = sum(m[4] for m in done)
            if new_total - total - n:
                problems.append(f"{new_total - total - n} responses beyond one per stream")
            total = new_total
            versions = {v for m in done for v in m[5]}
            # (delta-eds times the EDS response: a cluster edit leaves the EDS version as it
            # was, the ClusterLoadAssignment goes again unchanged)
            if len(versions) != 1 or (versions & initial and not variant.endswith("-eds")):
                problems.append("streams disagree on the version after the edit")
            initial = versions
            if variant in ("delta", "delta-eds"):
                want = (_snapgen.cluster_name(edited),)
                wrong = sum(1 for m in done for names in m[6] if tuple(names) != want)
                if wrong:
                    problems.append(f"{wrong} delta updates did not carry just the edit")
        if spy is not None:
            stop_py_spy(spy)
        rss_edited = _procs.rss(pid)
        time.sleep(settle)  # as after the sync: what the edits leave once they settled
        rss_after = _procs.rss(pid)
        hwm_steady = _procs.proc_status(pid)["VmHWM"]
    finally:
        workers.stop()
    return Result(
        variant,
        n,
        clients,
        load,
        connect,
        results,
        rss_before,
        hwm_start,
        hwm_sync,
        rss_synced,
        rss_connected,
        hwm_steady,
        rss_after,
        cpu_connect,
        server_cpu,
        client_cpu,
        reloads,
        problems,
        rss_edited,
        gate_sync,
    )


def start_py_spy(pid: int, prefix: str, row: str) -> subprocess.Popen[bytes]:
    """py-spy (not a dependency: on PATH) samples the server during the edits only, as
    collapsed stacks (``PREFIX-ROW.txt``, for flamegraph.pl or a grep)."""
    out = f"{prefix}-{row}.txt"
    spy = subprocess.Popen(
        ["py-spy", "record", "-p", str(pid), "-r", "250", "--format", "raw", "-o", out],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(1.0)  # attached before the first edit
    return spy


def stop_py_spy(spy: subprocess.Popen[bytes]) -> None:
    spy.send_signal(signal.SIGINT)  # it writes the file on SIGINT
    try:
        spy.wait(timeout=30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()


def wrap(server: Any, gc_log: str | None, env: list[str]) -> None:
    """Start the server through _serve_diag.py (the GC log) when asked."""
    if gc_log:
        argv = server.proc.argv
        extra = ["--gc-log", gc_log]
        cli = argv.index("-m")
        server.proc.argv = [
            argv[0],
            str(Path(__file__).resolve().parent / "_serve_diag.py"),
            *extra,
            "--",
            *argv[cli + 2 :],
        ]
    if env:
        server.proc.env = {**os.environ, **dict(e.split("=", 1) for e in env)}


DEV_ONLY = ("rich", "pygments")  # in the venv for import-linter; not in a runtime install


def hide_dev_packages(folder: Path, env: list[str]) -> list[str]:
    """``env`` with a PYTHONPATH entry whose stand-ins for DEV_ONLY fail to import (as in
    a runtime install, where they are absent): the server's memory as deployed."""
    for name in DEV_ONLY:
        (folder / name).mkdir(parents=True, exist_ok=True)
        (folder / name / "__init__.py").write_text(
            f"raise ImportError('{name}: not in a runtime install (bench --runtime-deps-only)')\n"
        )
    given = dict(e.split("=", 1) for e in env)
    paths = [str(folder), *filter(None, [given.pop("PYTHONPATH", "")])]
    return [f"{k}={v}" for k, v in given.items()] + ["PYTHONPATH=" + os.pathsep.join(paths)]


def default_clients(n: int) -> int:
    """Client processes for ``n`` streams: one per 1,250 (a single Python client is the
    bottleneck past that on 2 cores)."""
    return max(1, -(-n // 1250))


def goals(r: Result) -> tuple[float | None, str, list[tuple[str, float, float]]]:
    """(edit goal in s, which edit figure it grades, [(memory figure, value, goal)]) of a
    row: issue 15 item 3's goals at 1,000 and 5,000 streams."""
    mem: list[tuple[str, float, float]] = []
    edit: float | None = None
    graded = "p50"
    if r.n >= 5000:
        mem = [("peak", r.peak, PEAK_GOAL_5000)]
        edit, graded = (DELTA_GOAL_5000, "worst") if r.variant.startswith("delta") else (None, "")
    elif r.n >= 1000:
        mem = [("peak", r.peak, PEAK_GOAL), ("steady", r.steady, RSS_GOAL)]
        edit, graded = (
            (DELTA_GOAL, "p50") if r.variant.startswith("delta") else (SOTW_GOAL, "worst")
        )
    return edit, graded, mem


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="50 streams, one edit (< 30 s)")
    ap.add_argument(
        "--streams",
        help="comma-separated stream counts (default: delta 100,1000,5000; SotW 100,1000)",
    )
    ap.add_argument(
        "--clients",
        type=int,
        help="client processes per row (default: one per 1,250 streams; quick: 2)",
    )
    ap.add_argument(
        "--variants",
        default="delta,sotw",
        help="delta, sotw (CDS by wildcard), delta-eds, sotw-eds (as Envoy: CDS by wildcard "
        "and every ClusterLoadAssignment by name; the EDS responses are timed) "
        "(default: %(default)s)",
    )
    ap.add_argument("--rounds", type=int, help="edits per run (default 3, quick 1)")
    ap.add_argument("--clusters", type=int, help="clusters in the folder (default 2000)")
    ap.add_argument("--gc-log", metavar="FILE", help="log the server's GC pauses to FILE")
    ap.add_argument(
        "--gc-young",
        type=int,
        metavar="N",
        help="serve --gc-young N (default: serve's own; 700 is Python's default)",
    )
    ap.add_argument(
        "--py-spy",
        metavar="PREFIX",
        help="sample the server during the edits with py-spy (on PATH; not a dependency) "
        "into PREFIX-VARIANT-N.txt (collapsed stacks)",
    )
    ap.add_argument(
        "--server-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the server (e.g. MALLOC_ARENA_MAX=2)",
    )
    ap.add_argument(
        "--serve-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="an extra argument for `xdsplane serve` (repeat it; e.g. --serve-arg=--write-stall "
        "--serve-arg=2)",
    )
    ap.add_argument(
        "--runtime-deps-only",
        action="store_true",
        help="hide from the server the packages a dev install has and a runtime install "
        "does not (rich, pygments: structlog imports rich when it is there, ~5 MB of RSS)",
    )
    args = ap.parse_args()
    if args.streams or args.quick:
        same = [int(x) for x in (args.streams or "50").split(",")]
        counts = {"delta": same, "sotw": same, "delta-eds": same, "sotw-eds": same}
    else:
        counts = {
            "delta": [100, 1000, 5000],
            "sotw": [100, 1000],
            "delta-eds": [100, 1000],
            "sotw-eds": [100, 1000],
        }
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

    os.environ[EDS_CLUSTERS_ENV] = str(shape.clusters)
    print(_common.header("bench_fanout: one cluster edit to N ADS streams", args.quick))
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-fanout-"))
    folder = workdir / "snap"
    procs = _procs.ProcessGroup(workdir / "logs")
    if args.runtime_deps_only:
        args.server_env = hide_dev_packages(workdir / "hide", args.server_env)
    results: list[Result] = []
    edit_seq = [0]
    try:
        counts_desc = _snapgen.generate(folder, shape)
        print("folder: " + ", ".join(f"{v} {k}" for k, v in counts_desc.items()))
        for variant in variants:
            for n in counts.get(variant, []):
                server = _procs.XdsServer(
                    procs,
                    folder,
                    name=f"xdsplane-{variant}-{n}",
                    extra_args=["--log-level", "warning"]
                    + (["--gc-young", str(args.gc_young)] if args.gc_young else [])
                    + args.serve_arg,
                )
                server.proc.cwd = workdir  # `-m xdsplane` must not pick up ./xdsplane first
                server.proc.max_seconds = 900  # the watchdog: a 5,000-stream row takes minutes
                wrap(server, args.gc_log, args.server_env)
                server.start(timeout=90)
                try:
                    k = args.clients or (2 if args.quick else default_clients(n))
                    results.append(
                        run_clients(
                            variant,
                            n,
                            server,
                            folder,
                            rounds,
                            edit_seq,
                            settle,
                            shape,
                            k,
                            args.py_spy,
                        )
                    )
                finally:
                    server.stop()
                r = results[-1]
                print(
                    f"  {variant:5} {n:5} streams: connect {r.connect:.2f} s, "
                    f"edit {max(max(x) for x in r.rounds) * 1000:.0f} ms (worst), "
                    f"peak {_procs.mb(r.hwm_sync)} at sync, {_procs.mb(r.hwm_steady)} "
                    f"during edits, RSS {_procs.mb(r.rss_connected)}, after the edits "
                    f"{_procs.mb(r.rss_edited)} then {_procs.mb(r.rss_after)}; {r.gate_sync} "
                    f"({r.load})" + (f"  PROBLEMS: {r.problems}" if r.problems else "")
                )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    rows = []
    for r in results:
        last = [max(x) for x in r.rounds]
        med = [p50(x) for x in r.rounds]
        edit, graded, _ = goals(r)
        value = max(last) if graded == "worst" else p50(last)
        rows.append(
            [
                r.variant,
                r.n,
                r.clients,
                fmt_ms(p50(last), 0),
                fmt_ms(max(last), 0),
                fmt_ms(p50(med), 0),
                " / ".join(f"{x * 1000:.0f}" for x in last),
                fmt_ms(p50(r.reloads), 0) if r.reloads else "-",
                f"{p50(r.server_cpu_push):.2f} s",
                f"{p50(r.client_cpu_push):.2f} s",
                f"{graded} <= {edit * 1000:.0f} ms" if edit is not None else "",
                verdict(value, edit) if edit is not None else "",
            ]
        )
    print(f"edit -> every stream ACKed the new version ({rounds} edit(s) per row):")
    print(
        table(
            [
                "variant",
                "streams",
                "clients",
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
        _, _, mem = goals(r)
        rows.append(
            [
                r.variant,
                r.n,
                _procs.mb(r.rss_before),
                _procs.mb(r.hwm_sync),
                _procs.mb(r.rss_synced),
                _procs.mb(r.rss_connected),
                _procs.mb(r.hwm_steady),
                _procs.mb(r.rss_after),
                f"{r.connect:.2f} s",
                f"{r.server_cpu_connect:.2f} s",
                ", ".join(f"{k} <= {_procs.mb(g)}" for k, _, g in mem),
                ", ".join(verdict(v, g) for _, v, g in mem),
                r.load,
            ]
        )
    print(
        "server memory: RSS before any stream; VmHWM (peak) from the first stream to the\n"
        f"end of the settle time; RSS 0.5 s after every stream ACKed its first response and\n"
        f"{settle:.0f} s later; VmHWM during the edits (reset after the settle time); RSS\n"
        f"{settle:.0f} s after the last edit reached every stream. Steady = the larger of the\n"
        "two settled RSS. Then the initial\n"
        "sync (time, server CPU) and the load average when the row started:"
    )
    print(
        table(
            [
                "variant",
                "streams",
                "RSS idle",
                "peak at sync",
                "RSS at sync",
                f"+{settle:.0f} s",
                "peak in edits",
                f"after +{settle:.0f} s",
                "initial sync",
                "server CPU",
                "goal",
                "status",
                "load",
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
