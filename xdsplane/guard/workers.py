"""``xdsplane guard --workers N``: N guard processes on one gRPC port, sharing Redis.

The parent runs no guard itself: it starts N children (the same command line, plus
``--worker-index K`` and worker K's admin address), restarts one that exits (with the
backoff of ``xdsplane.supervise``), forwards SIGHUP to every child and stops them by PID
on SIGTERM or SIGINT.

- **One gRPC port.** Every worker binds ``--address`` with ``SO_REUSEPORT``
  (``grpc.so_reuseport`` = 1): the kernel spreads new connections over the workers
  (by a hash of the connection's addresses), so each Envoy connection is served by one
  worker for its life. A guard started without ``--workers`` binds without it, so a second
  guard cannot silently share a port by mistake, and Linux lets only processes of the same
  user join a ``SO_REUSEPORT`` group.
- **One admin port per worker.** Worker K serves ``/metrics`` and ``/healthz`` on the
  ``--admin-address`` port + K. Each worker's counters are its own (a shared admin port
  would answer from whichever worker the kernel picked, and each scrape would see one
  worker's counters at random); Prometheus scrapes each port as its own target, as it
  would separate guards, and ``xdsplane_guard_worker_info{worker,pid}`` says which is which.
- **A worker that dies.** Its listening socket closes only when its last thread has
  exited (a few ms after a SIGKILL, while its PID already shows as a zombie); the
  connections the kernel handed it until then are reset when it closes, unless
  ``net.ipv4.tcp_migrate_req`` = 1, which moves them to a worker still listening. From
  then on every new connection goes to the workers still listening. The parent says so
  at start when the sysctl is 0 (``migrate_note``). A restarted worker binds the port
  last, once nothing else can fail, so a restart that fails never holds connections.
- **Redis is required** for N > 1: with the memory store each worker would remember its
  own token ids and counters, so a token could be replayed once per worker and a limit
  would allow N times its rate.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry, Gauge

from xdsplane.bootstrap import split_address
from xdsplane.supervise import Child, Supervisor, describe_exit

STARTUP_SECONDS = 60.0  # every worker answers /healthz within this, or the parent gives up


def check_workers(workers: int, redis: str | None) -> str | None:
    """Why ``--workers`` cannot be used as given (None: it can)."""
    if workers < 1:
        return f"--workers {workers}: expected 1 or more"
    if workers > 1 and redis is None:
        return (
            f"--workers {workers} needs --redis: with the memory store each worker would "
            "keep its own replay state and counters, so a token could be used once per "
            "worker and each limit would allow N times its rate"
        )
    return None


def admin_address(base: str, index: int) -> str:
    """Worker ``index``'s admin address: the port of ``base`` + index."""
    host, port = split_address(base)
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port + index if port else 0}"


def worker_metric(registry: CollectorRegistry, index: int) -> None:
    """``xdsplane_guard_worker_info{worker,pid} 1`` in this worker's registry."""
    Gauge(
        "xdsplane_guard_worker_info",
        "This guard process: its --workers index and PID (1 per process)",
        ["worker", "pid"],
        registry=registry,
    ).labels(str(index), str(os.getpid())).set(1)


MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def migrate_note(sysctl: Path = MIGRATE_SYSCTL) -> str | None:
    """A note when the kernel resets, rather than hands on, the connections queued at a
    worker that dies (None: it hands them on, or this is not Linux >= 5.14)."""
    try:
        value = sysctl.read_text().strip()
    except OSError:
        return None
    if value != "0":
        return None
    return (
        "net.ipv4.tcp_migrate_req is 0: connections the kernel queued at a worker that "
        "dies are reset instead of handed to another worker; set it to 1 "
        "(sysctl -w net.ipv4.tcp_migrate_req=1) to keep them (docs/guard.md, Workers)"
    )


def _say(message: str) -> None:
    print(f"xdsplane guard: {message}", file=sys.stderr, flush=True)


def _healthy(address: str) -> bool:
    host, port = split_address(address)
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return int(r.status) == 200
    except Exception:
        return False


def child_argv(argv: Sequence[str], base_admin: str, index: int) -> list[str]:
    """Worker ``index``'s command: this command line with its own admin address and index
    (argparse keeps the last value of a repeated option)."""
    return [
        sys.executable,
        "-m",
        "xdsplane",
        *argv,
        "--admin-address",
        admin_address(base_admin, index),
        "--worker-index",
        str(index),
    ]


def supervise(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Start ``args.workers`` workers, keep them running until SIGTERM/SIGINT; the exit code."""
    sup = Supervisor(say=_say)
    stopping = False

    def on_stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        sup.request_stop()

    def on_hup(signum: int, frame: FrameType | None) -> None:
        for child in sup.children:
            if child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGHUP)

    handlers = {signal.SIGINT: on_stop, signal.SIGTERM: on_stop, signal.SIGHUP: on_hup}
    old = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        admin: dict[Child, str] = {}
        for k in range(args.workers):
            addr = admin_address(args.admin_address, k)
            child = sup.start(
                f"worker {k}",
                child_argv(argv, args.admin_address, k),
                ready=functools.partial(_healthy, addr),
            )
            admin[child] = addr
        note = migrate_note()
        if note is not None:
            _say(note)
        _say(
            f"{args.workers} workers on {args.address} (pids "
            + ", ".join(str(c.pid) for c in admin)
            + f"); admin on {', '.join(admin.values())}"
        )
        # A worker that exits before every worker answered is a startup error (a bad flag
        # or file, a port in use): the same for every worker, so restarting would not help.
        deadline = time.monotonic() + STARTUP_SECONDS
        waiting = list(admin)
        while waiting and not stopping:
            for c in admin:
                if c.proc is not None and c.proc.poll() is not None:
                    _say(f"{c.name} (pid {c.pid}) {describe_exit(c.proc.returncode)} at startup")
                    return 1
            waiting = [c for c in waiting if not _healthy(admin[c])]
            if waiting and time.monotonic() > deadline:
                _say(f"{len(waiting)} worker(s) not serving after {STARTUP_SECONDS:.0f} s")
                return 1
            time.sleep(0.05)
        if not stopping:
            _say("every worker serving; a worker that exits from now on is restarted")
        while not stopping:
            sup.poll()
            time.sleep(0.1)
        return 0
    finally:
        sup.stop()
        for s, h in old.items():
            signal.signal(s, h)
