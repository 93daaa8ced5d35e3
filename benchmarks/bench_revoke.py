"""Revocation: how long from `xdsplane revoke` until every Envoy refuses the subject.

    .venv/bin/python benchmarks/bench_revoke.py [--quick] [--runs N]

Processes (the same as tests/test_revoke.py's shared edge): a real redis-server, two
``xdsplane guard`` processes sharing it, ``xdsplane serve`` and two real Envoys, each Envoy
calling its own guard over mTLS. Each run takes a new subject, opens one kept-alive
connection to each Envoy and has a request served on it, then runs
``xdsplane revoke --sub NAME --redis URL`` as a user would, and sends requests on both open
connections (a new token each time, so replay protection never answers first) until both
are refused with ``x-guard-reason: revoked_sub``.

Two figures per run:
- *written -> refused*: from the moment the command returned (the entry is in Redis) until
  both Envoys refused; the guard reads revocations from the store on every Check, so this is
  about one request through each Envoy;
- *command -> refused*: from starting the command (a Python process) until both refused.

Goal (issue #13): a revocation takes effect on every Envoy within a second, with no reload
and no dropped connection; the same connections are checked to be open throughout.
"""

from __future__ import annotations

import argparse
import http.client
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common
import _procs  # also puts tests/ on sys.path
from test_ratelimit import shared_edges, token

GOAL_S = 1.0
POLL_S = 0.002


def keepalive_get(conn: http.client.HTTPConnection, tok: str) -> tuple[int, str | None]:
    conn.request("GET", "/once/x", headers={"authorization": f"Bearer {tok}"})
    r = conn.getresponse()
    r.read()
    return r.status, r.getheader("x-guard-reason")


def one_run(edges: object, n: int) -> tuple[float, float]:
    from test_ratelimit import Shared

    assert isinstance(edges, Shared)
    sub = edges.sub(f"mallory{n}")
    conns = [http.client.HTTPConnection(_procs.HOST, e.port, timeout=5) for e in (edges.a, edges.b)]
    try:
        for c in conns:
            status, _ = keepalive_get(c, token(edges.key, sub))
            assert status == 200, status
        socks = [c.sock for c in conns]
        started = time.monotonic()
        argv = [sys.executable, "-m", "xdsplane", "revoke", "--sub", sub, "--reason", "bench"]
        r = subprocess.run(
            [*argv, "--redis", edges.redis.url],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        written = time.monotonic()
        pending = list(conns)
        deadline = written + 30
        while pending:
            if time.monotonic() > deadline:
                raise SystemExit(f"run {n}: not refused within 30 s")
            for c in list(pending):
                if keepalive_get(c, token(edges.key, sub)) == (403, "revoked_sub"):
                    pending.remove(c)
            if pending:
                time.sleep(POLL_S)
        done = time.monotonic()
        assert [c.sock for c in conns] == socks, "a connection was dropped"
        return done - written, done - started
    finally:
        for c in conns:
            c.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 runs (the test suite's smoke run)")
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    runs = 3 if args.quick else args.runs
    print(_common.header("revocation: xdsplane revoke -> refused on two Envoys", args.quick))
    written: list[float] = []
    command: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-revoke-") as tmp,
        shared_edges(Path(tmp), max_seconds=120 + 10 * runs) as edges,
    ):
        for n in range(runs):
            w, c = one_run(edges, n)
            written.append(w)
            command.append(c)
    rows = []
    for name, values in (("written -> refused", written), ("command -> refused", command)):
        p99 = _common.percentile(values, 99)
        rows.append(
            [
                name,
                len(values),
                _common.fmt_ms(_common.p50(values)),
                _common.fmt_ms(p99),
                _common.fmt_ms(max(values)),
                _common.verdict(max(values), GOAL_S),
            ]
        )
    print()
    print(_common.table(["figure", "runs", "p50", "p99", "max", "goal 1 s (max)"], rows))
    print("\nconnections: the same two kept-alive connections before and after every revocation")


if __name__ == "__main__":
    main()
