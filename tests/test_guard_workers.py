"""``xdsplane guard --workers N``: N processes on one gRPC port (SO_REUSEPORT), sharing a
real redis-server, supervised by the parent (restarted with backoff, stopped by PID).

Which worker served a call is read from the workers' own /metrics (worker K on the admin
port + K): ``xdsplane_guard_worker_info{worker,pid}`` and its decision counters. New
connections are spread by the kernel (a hash of the connection's addresses), so each
probe opens a fresh connection.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc
from harness import HOST, Proc, ProcessGroup, free_port, http_get, wait_until, xdsplane_argv
from test_guard import Redis, allowed, check_request, denied

WORKERS = 2
PYTHON = "/usr/bin/python3"  # the system's: user 65534 may not read the venv


def two_free_ports() -> int:
    """A port P with P + 1 free too (worker K's admin port is P + K)."""
    for _ in range(50):
        p = free_port()
        with socket.socket() as s:
            try:
                s.bind((HOST, p + 1))
            except OSError:
                continue
        return p
    raise AssertionError("no two consecutive free ports")


def new_channel(port: int) -> grpc.Channel:
    """A channel with its own connection (never one shared with another channel)."""
    return grpc.insecure_channel(f"{HOST}:{port}", options=[("grpc.use_local_subchannel_pool", 1)])


class Workers:
    def __init__(self, procs: ProcessGroup, redis: Redis, *extra: str) -> None:
        self.port = free_port()
        self.admin = two_free_ports()
        argv = xdsplane_argv(
            "guard",
            *("--address", f"{HOST}:{self.port}", "--admin-address", f"{HOST}:{self.admin}"),
            *("--insecure", "--log-format", "json", "--redis", redis.url),
            *("--workers", str(WORKERS), *extra),
        )
        self.proc: Proc = procs.spawn("guard-workers", argv)
        self.seq = 0

    def start(self) -> Workers:
        self.proc.start()
        wait_until(self.all_healthy, 30, what="every worker's /healthz")
        return self

    def all_healthy(self) -> bool:
        self.proc.ensure_alive()
        return all(self.pid(k) is not None for k in range(WORKERS))

    def metrics(self, k: int) -> str:
        return http_get(self.admin + k, "/metrics").text

    def pid(self, k: int) -> int | None:
        """Worker k's PID as its own /metrics gives it (None: not answering)."""
        try:
            text = self.metrics(k)
        except OSError:
            return None
        m = re.search(r'xdsplane_guard_worker_info\{pid="(\d+)",worker="(\d+)"\} 1\.0', text)
        assert m is None or int(m.group(2)) == k, text
        return int(m.group(1)) if m else None

    def decisions(self, k: int) -> float:
        total = 0.0
        for line in self.metrics(k).splitlines():
            if line.startswith("xdsplane_guard_decisions_total{"):
                total += float(line.rpartition(" ")[2])
        return total

    def token(self) -> dict[str, Any]:
        self.seq += 1
        jti = f"w-{os.getpid()}-{time.monotonic_ns()}-{self.seq}"
        return {"jti": jti, "sub": "alice", "iss": "idp", "exp": time.time() + 120}

    def check(self, claims: dict[str, Any], channel: grpc.Channel | None = None) -> Any:
        """A Check on ``channel``, or on a new connection of its own."""
        if channel is not None:
            return external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                check_request(claims), timeout=5
            )
        with new_channel(self.port) as ch:
            return self.check(claims, ch)

    def served_by(self, channel: grpc.Channel) -> int:
        """Which worker serves ``channel``'s connection: the one whose count rises."""
        before = [self.decisions(k) for k in range(WORKERS)]
        assert allowed(self.check(self.token(), channel))
        after = [self.decisions(k) for k in range(WORKERS)]
        moved = [k for k in range(WORKERS) if after[k] > before[k]]
        assert len(moved) == 1, (before, after)
        return moved[0]

    def channel_on(self, k: int, limit: int = 200) -> grpc.Channel:
        """A connection the kernel gave to worker k (new connections until one lands)."""
        for _ in range(limit):
            ch = new_channel(self.port)
            if self.served_by(ch) == k:
                return ch
            ch.close()
        raise AssertionError(f"no connection landed on worker {k} in {limit} tries")


@pytest.fixture
def redis(procs: ProcessGroup, tmp_path: Path) -> Redis:
    return Redis(procs, tmp_path).start()


@pytest.fixture
def workers(procs: ProcessGroup, redis: Redis) -> Iterator[Workers]:
    yield Workers(procs, redis).start()


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by the parent) is not alive either.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_two_workers_answer_on_one_port_and_a_killed_one_comes_back(workers: Workers) -> None:
    pids = [workers.pid(k) for k in range(WORKERS)]
    assert None not in pids and len(set(pids)) == WORKERS
    assert workers.proc.pid not in pids  # the parent only supervises
    # Both serve the one port: connections land on each (the kernel's hash spreads them).
    on = [workers.channel_on(k) for k in range(WORKERS)]
    for k, ch in enumerate(on):
        assert workers.served_by(ch) == k
        ch.close()

    victim = pids[0]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), 10, what="the killed worker gone")
    # The parent restarts it (backoff 0.5 s first) with a new PID on the same admin port.
    wait_until(lambda: workers.pid(0) not in (None, victim), 20, what="worker 0 restarted")
    assert workers.pid(1) == pids[1]  # the other one was left alone
    assert workers.proc.alive()


@pytest.mark.xfail(
    strict=False,
    reason="known issue (docs/guard.md, Workers): after a worker is SIGKILLed, IPv4 "
    "connections to the shared port are sometimes refused by the kernel although the other "
    "worker (and later the restarted one) still listens; not reproduced with plain grpc.aio "
    "servers or raw sockets; under investigation",
)
def test_the_port_keeps_answering_while_a_killed_worker_restarts(workers: Workers) -> None:
    on = [workers.channel_on(k) for k in range(WORKERS)]
    for ch in on:
        ch.close()
    victim = workers.pid(0)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: not alive(victim), 10, what="the killed worker gone")
    # New connections go to the worker still listening.
    for _ in range(20):
        assert allowed(workers.check(workers.token()))
    wait_until(lambda: workers.pid(0) not in (None, victim), 20, what="worker 0 restarted")
    ch = workers.channel_on(0)  # and the restarted one serves the shared port again
    ch.close()


def test_stopping_the_parent_stops_every_worker(workers: Workers) -> None:
    pids = [workers.pid(k) for k in range(WORKERS)]
    assert all(p is not None for p in pids)
    assert workers.proc.stop(timeout=20) == 0
    for p in pids:
        assert p is not None
        wait_until(lambda p=p: not alive(p), 10, what=f"worker pid {p} gone")


def test_a_replayed_token_is_refused_across_workers(workers: Workers) -> None:
    """The attacker replays a token on a connection served by another worker: refused,
    because the token ids live in the shared Redis, not in a worker."""
    a, b = workers.channel_on(0), workers.channel_on(1)
    try:
        token = workers.token()
        assert allowed(workers.check(token, a))
        status, reason, _ = denied(workers.check(token, b))
        assert (status, reason) == (403, "replay")
        assert workers.served_by(b) == 1  # it was worker 1 that refused it
        # the other way round, too
        other = workers.token()
        assert allowed(workers.check(other, b))
        assert denied(workers.check(other, a))[:2] == (403, "replay")
    finally:
        a.close()
        b.close()


def test_workers_with_the_memory_store_are_refused() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "xdsplane", "guard", "--insecure", "--workers", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r
    assert "--workers 2 needs --redis" in r.stderr and "replay" in r.stderr, r.stderr


def test_nobody_else_joins_the_workers_port(workers: Workers, procs: ProcessGroup) -> None:
    """SO_REUSEPORT is not an open door: a guard started without --workers (no
    SO_REUSEPORT) cannot bind the workers' port, nor can a process of another user that
    asks for SO_REUSEPORT (Linux groups only sockets of the same effective user)."""
    stray = procs.spawn(
        "stray-guard",
        xdsplane_argv(
            "guard",
            *("--address", f"{HOST}:{workers.port}", "--admin-address", f"{HOST}:{free_port()}"),
            "--insecure",
        ),
    ).start()
    assert stray.wait(30) == 1, stray.tail()
    assert "cannot listen for gRPC" in stray.tail()

    code = (
        "import socket,sys\n"
        "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
        f"s.bind(('{HOST}', {workers.port}))\n"
    )
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", PYTHON, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.returncode != 0 and "Address already in use" in r.stderr, r
    assert all(workers.pid(k) is not None for k in range(WORKERS))
