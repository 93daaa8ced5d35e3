"""Run every benchmark, one after the other (they must not share the 2 CPUs).

    .venv/bin/python benchmarks/run_all.py [--quick] [--only NAME,...]

Each benchmark runs as its own process with a time limit; ``--quick`` is passed through.
The exit code is non-zero if any benchmark failed to run (a missed goal is not a failure:
the tables say MISS).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "build": "bench_build.py",
    "fanout": "bench_fanout.py",
    "propagation": "bench_propagation.py",
    "grpc": "bench_grpc.py",
    "policy": "bench_policy.py",
    "rotation": "bench_rotation.py",
    "guard": "bench_guard.py",
    "storm": "bench_storm.py",
    "policytest": "bench_policytest.py",
    "replicas": "bench_replicas.py",
    "soak": "bench_soak.py",  # last: 10 minutes in its full version
}
LIMIT_QUICK = 120.0
LIMIT_FULL = 1800.0


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="the small versions (< 30 s each)")
    ap.add_argument("--only", help="comma-separated subset of: " + ", ".join(BENCHMARKS))
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        ap.error(f"unknown benchmark(s): {', '.join(unknown)}")
    limit = LIMIT_QUICK if args.quick else LIMIT_FULL
    failed: list[str] = []
    for name in names:
        argv = [sys.executable, str(HERE / BENCHMARKS[name])]
        if args.quick:
            argv.append("--quick")
        started = time.monotonic()
        print(f"\n### {name}: {' '.join(argv[1:])}", flush=True)
        # The child runs in its own session: on a timeout it (and whatever it started that
        # did not stop with it) is killed by its process id, never by name.
        proc = subprocess.Popen(argv, start_new_session=True)
        try:
            code = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
            code = -9
            print(f"### {name}: killed after {limit:.0f} s", flush=True)
        took = time.monotonic() - started
        print(f"### {name}: exit {code} in {took:.1f} s", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
