"""Replicas benchmark: 3 ``xdsplane serve`` on one policy folder, N ADS streams spread
across them, one change, every stream on the same version.

    .venv/bin/python benchmarks/bench_replicas.py [--quick] [--streams 3000] [--replicas 3]

R replicas (``xdsplane serve`` subprocesses, each its own ports) serve the same folder: the
2,000-cluster folder of bench_build / bench_fanout (``_snapgen.Shape()``, the snapshot the
fan-out goals are stated for; ``--clusters`` for a smaller one). This process is the client:
bench_fanout's minimal-decoding SotW and delta streams (imported from it), stream ``i`` on
replica ``i % R``, 100 streams per channel (one TCP connection each), node ids ``edge-i``.

Checked before any edit: every replica's /status shows the same versions (content hashes:
the same files give the same versions, whatever replica, whatever start order), and every
stream holds the same version. Then one cluster's connect_timeout changes (file written as
tmp + rename, which every replica's watch sees) and the time from the rename to the last
stream's ACK of the new version is measured, over all streams and per replica. After each
edit every stream must hold one and the same new version (SotW ``version_info``, delta
``system_version_info``), different from the one before.

Per replica: RSS and peak RSS (VmHWM from /proc/PID/status, the kernel's high-water mark)
and the CPU it used for the initial sync and per edit. The machine's load average is printed
before and after: on a shared machine the figures move with it.

Goal (issue 15's fan-out goal): delta, one changed cluster reaches every stream within 1 s.
SotW (a full CDS per stream) is reported against the single-server 1.5 s goal.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _common
import _procs
import _snapgen
import bench_fanout
import grpc
from _common import fmt_ms, p50, table, verdict
from bench_fanout import STREAMS_PER_CHANNEL, Clients, Round

DELTA_GOAL = 1.0
SOTW_GOAL = 1.5
EDITED_CLUSTER = bench_fanout.EDITED_CLUSTER
CHANNEL_OPTIONS = [
    ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per channel
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
]


@dataclass
class ReplicaFigures:
    name: str
    pid: int
    streams: int
    cpu_sync: float = 0.0
    cpu_edits: list[float] = field(default_factory=list)
    rss_synced: int = 0
    rss_after: int = 0
    hwm: int = 0
    versions: dict[str, str] = field(default_factory=dict)  # /status after the last edit


@dataclass
class Result:
    variant: str
    n: int
    connect: float
    rounds: list[list[float]]  # per edit: per stream, rename -> ACK
    per_replica_worst: list[list[float]]  # per edit: per replica, its slowest stream
    versions: list[str]  # per edit: the one version every stream holds ("" when not one)
    replicas: list[ReplicaFigures]
    client_cpu: list[float]
    problems: list[str]


def status_versions(server: Any) -> list[dict[str, str]]:
    return [g["versions"] for g in server.status()["groups"]]


async def run(
    variant: str,
    n: int,
    servers: list[Any],
    folder: Path,
    shape: _snapgen.Shape,
    rounds: int,
    edit_seq: list[int],
    settle: float,
) -> Result:
    r_count = len(servers)
    c = Clients(variant, n)
    figures = [
        ReplicaFigures(s.proc.name, s.proc.pid, len(range(k, n, r_count)))
        for k, s in enumerate(servers)
    ]
    # Channels per replica; stream i is the (i // R)-th stream of replica i % R.
    channels = [
        [
            grpc.aio.insecure_channel(s.xds_address, options=CHANNEL_OPTIONS)
            for _ in range(-(-f.streams // STREAMS_PER_CHANNEL))
        ]
        for s, f in zip(servers, figures, strict=True)
    ]
    stream = bench_fanout.sotw_stream if variant == "sotw" else bench_fanout.delta_stream
    problems: list[str] = []
    before = [status_versions(s) for s in servers]
    if any(v != before[0] for v in before):
        problems.append(f"replicas disagree before any stream: {before}")
    pids = [s.proc.pid for s in servers]
    cpu0 = [_procs.cpu_seconds(p) for p in pids]
    t0 = time.perf_counter()
    tasks = [
        asyncio.create_task(
            stream(i, channels[i % r_count][(i // r_count) // STREAMS_PER_CHANNEL], c)
        )
        for i in range(n)
    ]
    results: list[list[float]] = []
    worst: list[list[float]] = []
    versions: list[str] = []
    client_cpu: list[float] = []
    try:
        await synced(c, tasks, 600)
        connect = time.perf_counter() - t0
        for f, p, c0 in zip(figures, pids, cpu0, strict=True):
            f.cpu_sync = _procs.cpu_seconds(p) - c0
        await asyncio.sleep(settle)  # the last ACKs reach the servers; buffers drain
        for f, p in zip(figures, pids, strict=True):
            f.rss_synced = _procs.rss(p)
        initial = set(c.versions)
        if len(initial) != 1:
            problems.append(f"streams hold {len(initial)} different initial versions")
        edited = min(EDITED_CLUSTER, shape.clusters - 1)
        team = _snapgen.team_of(edited, shape)
        path = folder / "clusters" / f"team-{team:03d}.yaml"
        for _ in range(rounds):
            edit_seq[0] += 1
            text = _snapgen.team_text(team, shape, {edited: 1000 + 10 * edit_seq[0]})
            tmp = folder.parent / f".bench-{edit_seq[0]}.tmp"
            tmp.write_text(text)
            s_cpu0 = [_procs.cpu_seconds(p) for p in pids]
            c_cpu0 = time.process_time()
            rnd = Round(time.perf_counter(), set(range(n)))
            c.round = rnd
            rnd.started = time.perf_counter()
            tmp.replace(path)
            try:
                await asyncio.wait_for(rnd.done.wait(), timeout=120)
            except TimeoutError:
                problems.append(f"{len(rnd.waiting)} streams never got the edit")
            c.round = None
            await asyncio.sleep(0.3)  # anything else the edit causes arrives now
            for f, p, c0 in zip(figures, pids, s_cpu0, strict=True):
                f.cpu_edits.append(_procs.cpu_seconds(p) - c0)
            client_cpu.append(time.process_time() - c_cpu0)
            took = {i: t - rnd.started for i, t in rnd.acked_at.items()}
            results.append(list(took.values()))
            worst.append(
                [
                    max((took[i] for i in range(k, n, r_count) if i in took), default=0.0)
                    for k in range(r_count)
                ]
            )
            now = set(c.versions)
            if len(now) != 1:
                problems.append(f"after an edit the streams hold {len(now)} versions")
            elif now & initial:
                problems.append("after an edit the streams still hold the version before")
            versions.append(next(iter(now)) if len(now) == 1 else "")
            initial = now
        for f, p, s in zip(figures, pids, servers, strict=True):
            f.rss_after = _procs.rss(p)
            f.hwm = _procs.proc_status(p)["VmHWM"]
            f.versions = status_versions(s)[0]
        if any(f.versions != figures[0].versions for f in figures):
            problems.append("replicas' /status versions differ after the edits")
        if versions and figures[0].versions.get("CDS") != versions[-1]:
            problems.append("the streams' version is not the replicas' CDS version")
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for chans in channels:
            for ch in chans:
                await ch.close()
    return Result(variant, n, connect, results, worst, versions, figures, client_cpu, problems)


async def synced(c: Clients, tasks: list[asyncio.Task[None]], timeout: float) -> None:
    """Every stream holds its first response; a stream ending before that fails the run
    at once (refused by a replica, connection lost) rather than at the timeout."""
    waiter = asyncio.create_task(c.synced.wait())
    pending: set[asyncio.Future[Any]] = {waiter, *tasks}
    deadline = time.perf_counter() + timeout
    while not waiter.done():
        left = deadline - time.perf_counter()
        if left <= 0:
            waiter.cancel()
            raise TimeoutError(f"{c.n - c.synced_count} streams not synced after {timeout} s")
        done, pending = await asyncio.wait(pending, timeout=left, return_when="FIRST_COMPLETED")
        for t in done:
            if t is not waiter:
                waiter.cancel()
                error = t.exception() if not t.cancelled() else None
                raise RuntimeError(f"a stream ended before it synced: {error!r}")


def shape_for(clusters: int | None) -> _snapgen.Shape:
    if not clusters:
        return _snapgen.Shape()
    return _snapgen.Shape(
        clusters=clusters,
        listeners=max(1, clusters // 10),
        cluster_files=max(1, clusters // 20),
        listener_files=max(1, min(10, clusters // 200)),
        secret_files=max(1, min(10, clusters // 200)),
    )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="3 replicas x 30 streams, 200 clusters, one edit"
    )
    ap.add_argument("--replicas", type=int, default=3)
    ap.add_argument("--streams", type=int, help="streams in all (default 3000, quick 90)")
    ap.add_argument("--variants", default="delta,sotw")
    ap.add_argument("--rounds", type=int, help="edits per variant (default 3, quick 1)")
    ap.add_argument("--clusters", type=int, help="clusters in the folder (default 2000)")
    args = ap.parse_args()
    n = args.streams or (30 * args.replicas if args.quick else 3000)
    rounds = args.rounds or (1 if args.quick else 3)
    shape = shape_for(args.clusters or (200 if args.quick else None))
    settle = 1.0 if args.quick else 3.0

    print(_common.header(f"bench_replicas: {args.replicas} replicas, {n} streams", args.quick))
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-replicas-"))
    folder = workdir / "snap"
    procs = _procs.ProcessGroup(workdir / "logs", max_seconds=1800.0)
    results: list[Result] = []
    edit_seq = [0]
    try:
        counts = _snapgen.generate(folder, shape)
        print("folder: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
        for variant in args.variants.split(","):
            servers = []
            for k in range(args.replicas):
                s = _procs.XdsServer(
                    procs,
                    folder,
                    name=f"replica-{k}-{variant}",
                    # One Python client opens every stream; on 2 shared cores it can take
                    # longer than the 10 s a first request may take (a real Envoy sends it
                    # at once): streams refused for it would never sync.
                    extra_args=["--log-level", "warning", "--first-request-timeout", "120"],
                )
                s.proc.cwd = workdir  # `-m xdsplane` must not pick up ./xdsplane first
                servers.append(s)
            for s in servers:
                s.launch()
            for s in servers:
                s.wait_ready(timeout=120)
            try:
                r = asyncio.run(run(variant, n, servers, folder, shape, rounds, edit_seq, settle))
            finally:
                for s in servers:
                    s.stop()
            results.append(r)
            print(
                f"  {variant:5} {n} streams on {args.replicas} replicas: connect "
                f"{r.connect:.2f} s, edit {max(max(x) for x in r.rounds) * 1000:.0f} ms (worst)"
                + (f"  PROBLEMS: {r.problems}" if r.problems else "")
            )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"\nafter the runs: {_common.load()}\n")
    rows = []
    for r in results:
        last = [max(x) for x in r.rounds]
        goal = DELTA_GOAL if r.variant == "delta" else SOTW_GOAL
        rows.append(
            [
                r.variant,
                r.n,
                fmt_ms(p50(last), 0),
                fmt_ms(max(last), 0),
                fmt_ms(p50([p50(x) for x in r.rounds]), 0),
                " / ".join(f"{x * 1000:.0f}" for x in last),
                " / ".join(
                    f"{max(w[k] for w in r.per_replica_worst) * 1000:.0f}"
                    for k in range(len(r.replicas))
                ),
                "yes" if all(r.versions) and len(set(r.versions)) == len(r.versions) else "NO",
                f"{p50(r.client_cpu):.2f} s",
                f"<= {goal * 1000:.0f} ms",
                verdict(max(last), goal),
            ]
        )
    print(f"edit -> every stream on every replica ACKed the new version ({rounds} edit(s)):")
    print(
        table(
            [
                "variant",
                "streams",
                "all ACKed p50",
                "worst",
                "median stream",
                "each edit (ms)",
                "worst per replica (ms)",
                "one new version",
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
        for f in r.replicas:
            rows.append(
                [
                    f"{r.variant} {f.name}",
                    f.streams,
                    f"{r.connect:.2f} s",
                    f"{f.cpu_sync:.2f} s",
                    f"{p50(f.cpu_edits):.2f} s",
                    _procs.mb(f.rss_synced),
                    _procs.mb(f.rss_after),
                    _procs.mb(f.hwm),
                    f.versions.get("CDS", ""),
                ]
            )
    print("per replica (CPU: user+system of the process; peak: VmHWM since start):")
    print(
        table(
            [
                "replica",
                "streams",
                "initial sync",
                "CPU sync",
                "CPU per edit",
                "RSS synced",
                "RSS after",
                "peak (HWM)",
                "CDS version (/status)",
            ],
            rows,
        )
    )
    for r in results:
        print(f"{r.variant}: versions after each edit, on every stream: {', '.join(r.versions)}")
    problems = [f"{r.variant}: {p}" for r in results for p in r.problems]
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
