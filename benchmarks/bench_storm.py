"""Reconnect storm: N ADS streams dropped at once and reconnected at once.

    .venv/bin/python benchmarks/bench_storm.py [--quick] [--streams 1000] [--rounds N]

``xdsplane serve`` (subprocess) serves the policy of _scale.py (20 upstreams, no
``nodes:``). This process opens N simulated ADS streams (bench_fanout's clients, node ids
``sim-<i>``, 100 per channel, CDS wildcard, every response ACKed) and waits until each
holds the current version. Then every stream and connection is closed at once (as a
network cut or a load balancer restart does) and all N are opened again at once, in one of
two ways:

- ``resume``: the policy changed while they were away; each stream comes back with what
  it holds, as Envoy does (SotW: the version in its first request; delta:
  ``initial_resource_versions``), so the server must send each one the change;
- ``fresh``: no change, streams come back without state (a restarted Envoy): the server
  sends each one everything.

Measured from the moment the streams are reopened: the time until every stream ACKed the
current version (all-current), and per stream (p50, p99); responses per stream (1 is the
minimum), the server's CPU meanwhile and its stream count afterwards (the dropped streams
must be gone: connected streams == N).

Issue #7 sets no figure; it asks for the time until all hold the current version.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common
import _procs
import _scale
from _common import fmt_ms, p50, percentile, table


@dataclass
class Storm:
    variant: str
    kind: str
    n: int
    all_current: list[float] = field(default_factory=list)  # per round
    per_stream: list[float] = field(default_factory=list)  # every stream of every round
    responses: list[float] = field(default_factory=list)  # per round: responses / stream
    server_cpu: list[float] = field(default_factory=list)  # per round, CPU seconds
    client_cpu: list[float] = field(default_factory=list)  # per round, this process
    rss_after: int = 0
    connected_after: float = 0.0
    problems: list[str] = field(default_factory=list)


def connected(server: _procs.XdsServer) -> float:
    return _scale.server_counter(server, "xdsplane_connected_streams")


async def storm(
    server: _procs.XdsServer,
    variant: str,
    kind: str,
    n: int,
    rounds: int,
    folder: Path,
    port: int,
    upstreams: int,
    seq: list[int],
) -> Storm:
    out = Storm(variant, kind, n)
    pid = server.proc.pid
    streams = _scale.Streams(variant, n, server.xds_address)
    streams.open()
    await asyncio.wait_for(streams.clients.synced.wait(), timeout=300)
    try:
        for _ in range(rounds):
            before = set(streams.clients.versions)
            await asyncio.to_thread(
                _procs.wait_until,
                lambda: connected(server) == n,
                30,
                0.05,
                f"the server counts {n} connected streams",
            )
            await streams.drop()
            if kind == "resume":
                reloads = _scale.server_counter(server, "xdsplane_reload_successes_total")
                seq[0] += 1
                _scale.write_policy(folder, port, upstreams, seq[0])
                await asyncio.to_thread(
                    _procs.wait_until,
                    lambda r=reloads: (
                        _scale.server_counter(server, "xdsplane_reload_successes_total") > r
                    ),
                    30,
                    0.02,
                    "the server loaded the change",
                )
            cpu0, self0 = _procs.cpu_seconds(pid), time.process_time()
            started = streams.open(resume=kind == "resume", timed=True)
            rnd = streams.clients.round
            assert rnd is not None
            try:
                await asyncio.wait_for(rnd.done.wait(), timeout=120)
            except TimeoutError:
                out.problems.append(f"{len(rnd.waiting)} streams never got the current version")
            took = [t - started for t in rnd.acked_at.values()]
            out.all_current.append(max(took))
            out.per_stream += took
            out.server_cpu.append(_procs.cpu_seconds(pid) - cpu0)
            out.client_cpu.append(time.process_time() - self0)
            streams.clients.round = None
            await asyncio.sleep(0.3)  # anything more the reconnect causes arrives now
            out.responses.append(sum(streams.clients.responses) / n)
            versions = set(streams.clients.versions)
            if len(versions) != 1:
                out.problems.append(f"streams hold {len(versions)} versions after the storm")
            elif kind == "resume" and versions == before:
                out.problems.append("streams still hold the version from before the change")
            elif kind == "fresh" and versions != before:
                out.problems.append("a fresh reconnect got another version")
        await asyncio.to_thread(
            _procs.wait_until,
            lambda: connected(server) == n,
            30,
            0.05,
            f"the server counts {n} connected streams after the storm",
        )
        out.connected_after = connected(server)
        out.rss_after = _procs.rss(pid)
    except AssertionError as e:
        out.problems.append(str(e).splitlines()[0])
    finally:
        await streams.drop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="200 streams, one round")
    ap.add_argument("--streams", type=int, help="default 1000, quick 200")
    ap.add_argument("--rounds", type=int, help="storms per row (default 3, quick 1)")
    ap.add_argument("--variants", default="sotw,delta")
    ap.add_argument("--kinds", default="resume,fresh")
    ap.add_argument("--upstreams", type=int, default=20)
    args = ap.parse_args()
    n = args.streams or (200 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 3)
    print(_common.header("bench_storm: N streams dropped and reconnected at once", args.quick))
    print(f"{n} streams, {args.upstreams} upstreams, {rounds} storm(s) per row")
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-storm-"))
    folder = workdir / "policy"
    folder.mkdir()
    procs = _procs.ProcessGroup(workdir / "logs")
    port = _procs.free_port()
    seq = [0]
    _scale.write_policy(folder, port, args.upstreams, 0)
    results: list[Storm] = []
    try:
        server = _procs.XdsServer(procs, folder, extra_args=["--log-level", "warning"])
        server.proc.cwd = workdir
        server.proc.max_seconds = 1800
        server.start(timeout=60)
        rss_idle = _procs.rss(server.proc.pid)
        for variant in args.variants.split(","):
            for kind in args.kinds.split(","):
                r = asyncio.run(
                    storm(server, variant, kind, n, rounds, folder, port, args.upstreams, seq)
                )
                results.append(r)
                print(
                    f"  {variant:5} {kind:6}: all current in "
                    + " / ".join(f"{x * 1000:.0f}" for x in r.all_current)
                    + " ms"
                    + (f"  PROBLEMS: {r.problems}" if r.problems else "")
                )
        hwm = _procs.proc_status(server.proc.pid)["VmHWM"]
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for r in results:
        rows.append(
            [
                r.variant,
                r.kind,
                r.n,
                fmt_ms(p50(r.all_current), 0),
                fmt_ms(max(r.all_current) if r.all_current else float("nan"), 0),
                fmt_ms(p50(r.per_stream), 0),
                fmt_ms(percentile(r.per_stream, 99), 0),
                f"{p50(r.responses):.2f}",
                f"{p50(r.server_cpu):.2f} s",
                f"{p50(r.client_cpu):.2f} s",
                f"{r.connected_after:.0f}",
                _procs.mb(r.rss_after),
            ]
        )
    print(
        "\nstreams reopened at once -> every stream ACKed the current version "
        f"(p50 over {rounds} storm(s); per-stream figures over all of them):"
    )
    print(
        table(
            [
                "variant",
                "kind",
                "streams",
                "all current",
                "worst",
                "per stream p50",
                "p99",
                "responses/stream",
                "server CPU",
                "client CPU",
                "connected after",
                "server RSS after",
            ],
            rows,
        )
    )
    print(f"server RSS idle {_procs.mb(rss_idle)}, peak (HWM) {_procs.mb(hwm)}")
    problems = [f"{r.variant}/{r.kind}: {p}" for r in results for p in r.problems]
    if problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(problems))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
