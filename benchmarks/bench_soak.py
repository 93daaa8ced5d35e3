"""Soak: simulated ADS streams plus real Envoys, a policy change every few seconds.

    .venv/bin/python benchmarks/bench_soak.py [--quick] [--minutes 10] [--streams 1000]

``xdsplane serve`` (subprocess) serves the policy of _scale.py (one listener, 20
upstreams, no ``nodes:``). Clients:

- ``--streams`` simulated ADS streams in this process (bench_fanout's clients: CDS wildcard,
  every response ACKed; half SotW, half delta by default; 100 streams per channel);
- ``--envoys`` real Envoys (``xdsplane bootstrap``, ``--concurrency 1``; every other one
  over delta). They share one listener port (Envoy binds it with SO_REUSEPORT).

Every ``--interval`` seconds (on a fixed schedule) the policy file is rewritten (tmp +
rename): one cluster's connect_timeout and the ``/healthz`` body change, i.e. one
Cluster, its endpoints (Envoy re-warms the cluster) and one RouteConfiguration. For each
change: the time until every simulated stream ACKed the new CDS version, and until every
Envoy reports it (``cluster_manager.cds.version_text`` equal to it, the RDS version_text
changed). At the end: NACKs (Envoy's ``update_rejected`` over every subscription, the
server's ``xdsplane_nacks_total``), streams that ended, and the server's RSS sampled every
second (start, quarters, end, peak, slope of a least-squares line).

Goal (issue #7): at 1,000 streams + 5 Envoys for 10 minutes with a change every 5 s, the
server's RSS stays flat, every change is acknowledged by every client, no NACK.
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
from bench_fanout import Round

FLAT_MB = 5.0  # RSS "flat": the fitted line grows by less than this over the run ...
FLAT_SHARE = 0.05  # ... or less than this share of the RSS at the start


@dataclass
class Change:
    seq: int
    at: float  # wall offset from the start of the changes
    sims: float | None = None  # write -> every simulated stream ACKed (None: not at all)
    envoys: float | None = None  # write -> every Envoy reports the new versions
    envoy_ok: list[bool] = field(default_factory=list)  # per Envoy: reached it at all
    goal: float = 0.0  # the goal for both: before the next change is due

    def sims_in_time(self) -> bool:
        return self.sims is not None and self.sims <= self.goal

    def envoys_in_time(self) -> bool:
        return self.envoys is not None and self.envoys <= self.goal


@dataclass
class Soak:
    changes: list[Change] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)  # (seconds, bytes)
    problems: list[str] = field(default_factory=list)


def slope_mb_per_min(samples: list[tuple[float, int]]) -> float:
    n = len(samples)
    if n < 2:
        return float("nan")
    xs = [t for t, _ in samples]
    ys = [v / 1024 / 1024 for _, v in samples]
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    if var == 0:
        return float("nan")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var * 60


async def soak(
    server: _procs.XdsServer,
    envoys: list[_procs.Envoy],
    streams: list[_scale.Streams],
    folder: Path,
    port: int,
    upstreams: int,
    seconds: float,
    interval: float,
    ack_ceiling: float,
) -> Soak:
    out = Soak()
    pid = server.proc.pid
    for s in streams:
        s.open()
    await asyncio.wait_for(asyncio.gather(*(s.clients.synced.wait() for s in streams)), timeout=300)
    version = {v for s in streams for v in s.clients.versions}
    if len(version) != 1:
        out.problems.append(f"simulated streams hold {len(version)} initial versions")
    current = next(iter(version))

    def envoys_at(cds: str, rds_not: list[str]) -> list[bool]:
        ok = []
        for e, old_rds in zip(envoys, rds_not, strict=True):
            v = _scale.envoy_versions(e)
            ok.append(v.get("cds") == cds and bool(v.get("rds")) and v.get("rds") != old_rds)
        return ok

    await asyncio.to_thread(
        _procs.wait_until,
        lambda: all(envoys_at(current, [""] * len(envoys))),
        60,
        0.05,
        "every Envoy holds the initial version",
    )
    counters0 = [await asyncio.to_thread(_scale.envoy_counters, e) for e in envoys]
    nacks0 = await asyncio.to_thread(_scale.server_counter, server, "xdsplane_nacks_total")
    t0 = time.monotonic()
    out.rss.append((0.0, _procs.rss(pid)))
    seq = 0
    while True:
        seq += 1
        due = t0 + seq * interval
        if due - t0 > seconds:
            break
        # between changes: sample RSS every second until the change is due
        while (now := time.monotonic()) < due:
            await asyncio.sleep(min(1.0, due - now))
            out.rss.append((time.monotonic() - t0, await asyncio.to_thread(_procs.rss, pid)))
        rds_before = [_scale.envoy_versions(e).get("rds", "") for e in envoys]
        started = time.perf_counter()
        rounds = []
        for s in streams:
            s.clients.round = Round(started, set(range(s.n)))
            rounds.append(s.clients.round)
        ch = Change(seq, time.monotonic() - t0)
        await asyncio.to_thread(_scale.write_policy, folder, port, upstreams, seq)
        # The goal: acknowledged before the next change is due (a figure: "all in time").
        # A problem only when not acknowledged within the ceiling (--ack-ceiling).
        ch.goal = due + interval - 0.2 - time.monotonic()
        deadline = time.monotonic() + max(ch.goal, ack_ceiling)
        try:
            await asyncio.wait_for(
                asyncio.gather(*(r.done.wait() for r in rounds)),
                timeout=max(0.1, deadline - time.monotonic()),
            )
            ch.sims = max(t for r in rounds for t in r.acked_at.values()) - started
        except TimeoutError:
            waiting = sum(len(r.waiting) for r in rounds)
            out.problems.append(
                f"change {seq}: {waiting} simulated streams not ACKed within {ack_ceiling:g} s"
            )
        for s in streams:
            s.clients.round = None
        versions = {v for s in streams for v in s.clients.versions}
        if len(versions) != 1 or current in versions:
            out.problems.append(f"change {seq}: simulated streams hold {sorted(versions)}")
        current = next(iter(versions)) if len(versions) == 1 else current
        ok = [False] * len(envoys)
        while time.monotonic() < deadline:
            ok = await asyncio.to_thread(envoys_at, current, rds_before)
            if all(ok):
                ch.envoys = time.perf_counter() - started
                break
            await asyncio.sleep(0.02)
        ch.envoy_ok = ok
        if not all(ok):
            missing = [envoys[i].node for i, x in enumerate(ok) if not x]
            out.problems.append(f"change {seq}: not applied within {ack_ceiling:g} s by {missing}")
        out.changes.append(ch)
    out.rss.append((time.monotonic() - t0, _procs.rss(pid)))
    counters1 = [await asyncio.to_thread(_scale.envoy_counters, e) for e in envoys]
    pairs = zip(counters0, counters1, strict=True)
    rejected = [b["update_rejected"] - a["update_rejected"] for a, b in pairs]
    if any(rejected) or any(c["update_rejected"] for c in counters0):
        out.problems.append(f"Envoy update_rejected: {[c['update_rejected'] for c in counters1]}")
    nacks = await asyncio.to_thread(_scale.server_counter, server, "xdsplane_nacks_total")
    if nacks:
        out.problems.append(f"server counted {nacks:.0f} NACKs ({nacks - nacks0:.0f} in the run)")
    ended = sum(s.ended() for s in streams)
    if ended:
        out.problems.append(f"{ended} simulated streams ended during the run")
    for s in streams:
        await s.drop()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="100 streams, 2 Envoys, 24 s")
    ap.add_argument("--minutes", type=float, help="length of the run (default 10, quick 0.4)")
    ap.add_argument("--interval", type=float, help="seconds between changes (default 5, quick 2)")
    ap.add_argument("--streams", type=int, help="simulated streams (default 1000, quick 100)")
    ap.add_argument("--envoys", type=int, help="real Envoys (default 5, quick 2)")
    ap.add_argument("--variants", default="sotw,delta", help="of the simulated streams")
    ap.add_argument("--upstreams", type=int, default=20)
    ap.add_argument(
        "--ack-ceiling",
        type=float,
        default=0.0,
        help="seconds a change may take to be acknowledged everywhere before the run fails "
        "(default: until the next change is due, the goal itself; the smoke test gives 30)",
    )
    args = ap.parse_args()
    minutes = args.minutes or (0.4 if args.quick else 10.0)
    interval = args.interval or (2.0 if args.quick else 5.0)
    n_streams = args.streams if args.streams is not None else (100 if args.quick else 1000)
    n_envoys = args.envoys if args.envoys is not None else (2 if args.quick else 5)
    variants = args.variants.split(",")
    seconds = minutes * 60
    print(
        _common.header("bench_soak: streams + Envoys under a change every few seconds", args.quick)
    )
    print(
        f"{n_streams} simulated streams ({'/'.join(variants)}), {n_envoys} Envoys, "
        f"{args.upstreams} upstreams, a change every {interval:g} s for {minutes:g} min"
    )
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-soak-"))
    folder = workdir / "policy"
    folder.mkdir()
    procs = _procs.ProcessGroup(workdir / "logs")
    limit = seconds + 300
    port = _procs.free_port()
    _scale.write_policy(folder, port, args.upstreams, 0)
    cpu: dict[str, float] = {}
    try:
        server = _procs.XdsServer(procs, folder, extra_args=["--log-level", "warning"])
        server.proc.cwd = workdir
        server.proc.max_seconds = limit
        server.start(timeout=60)
        envoys = []
        for i in range(n_envoys):
            delta = "delta" in variants and i % 2 == 1
            e = _procs.Envoy(
                procs, workdir, f"envoy-{i}", server.xds_address, delta=delta, log_level="warning"
            )
            e.proc.max_seconds = limit
            e.proc.start()
            envoys.append(e)
        for e in envoys:
            _procs.wait_until(e.ready, 60, what=f"{e.node} /ready")
        per = [n_streams // len(variants)] * len(variants)
        per[0] += n_streams - sum(per)
        streams = []
        offset = 0
        for v, n in zip(variants, per, strict=True):
            streams.append(_scale.Streams(v, n, server.xds_address, offset))
            offset += n
        pids = {"server": server.proc.pid} | {e.node: e.proc.pid for e in envoys}
        c0 = {k: _procs.cpu_seconds(p) for k, p in pids.items()}
        w0, self0 = time.monotonic(), time.process_time()
        result = asyncio.run(
            soak(
                server,
                envoys,
                streams,
                folder,
                port,
                args.upstreams,
                seconds,
                interval,
                args.ack_ceiling,
            )
        )
        wall = time.monotonic() - w0
        cpu = {k: (_procs.cpu_seconds(p) - c0[k]) / wall for k, p in pids.items()}
        cpu["client"] = (time.process_time() - self0) / wall
        hwm = _procs.proc_status(server.proc.pid)["VmHWM"]
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    changes = result.changes
    sims = [c.sims for c in changes if c.sims is not None]
    envs = [c.envoys for c in changes if c.envoys is not None]
    sims_in_time = sum(c.sims_in_time() for c in changes)
    envs_in_time = sum(c.envoys_in_time() for c in changes)
    print("\nchanges (write -> every client holds the new version):")
    rows = [
        [
            f"{n_streams} simulated streams",
            len(changes),
            f"{sims_in_time}/{len(changes)}",
            fmt_ms(p50(sims), 0),
            fmt_ms(percentile(sims, 99), 0),
            fmt_ms(max(sims) if sims else float("nan"), 0),
        ],
        [
            f"{n_envoys} Envoys",
            len(changes),
            f"{envs_in_time}/{len(changes)}",
            fmt_ms(p50(envs), 0),
            fmt_ms(percentile(envs, 99), 0),
            fmt_ms(max(envs) if envs else float("nan"), 0),
        ],
    ]
    print(table(["clients", "changes", "all in time", "p50", "p99", "max"], rows))
    per_envoy = [
        f"{e.node} {sum(1 for c in changes if c.envoy_ok and c.envoy_ok[i])}/{len(changes)}"
        for i, e in enumerate(envoys)
    ]
    print("per Envoy: " + ", ".join(per_envoy))
    print(
        f"acknowledged at all: {len(sims)}/{len(changes)} by the simulated streams, "
        f"{len(envs)}/{len(changes)} by the Envoys"
    )

    rss = result.rss
    start_mb = rss[0][1] / 1024 / 1024
    end_mb = rss[-1][1] / 1024 / 1024
    slope = slope_mb_per_min(rss)
    fitted = slope * minutes
    flat = fitted < max(FLAT_MB, FLAT_SHARE * start_mb)
    quarters = [rss[min(len(rss) - 1, round(q * (len(rss) - 1)))] for q in (0.25, 0.5, 0.75)]
    print("\nserver RSS (sampled every second from the first change):")
    print(
        table(
            ["start", "25%", "50% (middle)", "75%", "end", "peak (HWM)", "slope", "goal", "status"],
            [
                [
                    _procs.mb(rss[0][1]),
                    *(_procs.mb(v) for _, v in quarters),
                    _procs.mb(rss[-1][1]),
                    _procs.mb(hwm),
                    f"{slope:+.2f} MB/min",
                    "flat",
                    "ok" if flat else f"GROWS {end_mb - start_mb:+.0f} MB",
                ]
            ],
        )
    )
    print(
        f"(flat: the least-squares line over {len(rss)} samples grows by less than "
        f"{FLAT_MB:.0f} MB or {FLAT_SHARE:.0%} over the run)"
    )
    print(
        "\nCPU (share of one core, whole run): "
        + " ".join(f"{k} {v * 100:.1f}%" for k, v in cpu.items())
    )
    nack_free = not any("rejected" in p or "NACK" in p for p in result.problems)
    print(
        f"\nNACKs: {'none' if nack_free else 'SOME (see problems)'}; "
        f"every change acknowledged by every client: "
        f"{'yes' if len(sims) == len(envs) == len(changes) else 'NO'}"
    )
    if result.problems:
        print("\nPROBLEMS:\n  " + "\n  ".join(result.problems[:40]))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
