"""``xdsplane guard --workers N``: N processes on one gRPC port (SO_REUSEPORT), sharing a
real redis-server, supervised by the parent (restarted with backoff, stopped by PID).

Which worker served a call is read from the workers' own /metrics (worker K on the admin
port + K): ``xdsplane_guard_worker_info{worker,pid}`` and its decision counters. New
connections are spread by the kernel (a hash of the connection's addresses), so each
probe opens a fresh connection.
"""

from __future__ import annotations

import asyncio
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
from harness import (
    HOST,
    Proc,
    ProcessGroup,
    free_port,
    free_ports,
    http_get,
    wait_until,
    xdsplane_argv,
)
from test_guard import Redis, allowed, check_request, denied

WORKERS = 2
PYTHON = "/usr/bin/python3"  # the system's: user 65534 may not read the venv


def two_free_ports() -> int:
    """A port P with P + 1 free too (worker K's admin port is P + K)."""
    return free_ports(WORKERS)


def new_channel(port: int, host: str = HOST) -> grpc.Channel:
    """A channel with its own connection (never one shared with another channel)."""
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def listening(port: int) -> int:
    """How many sockets listen on TCP ``port`` in this network namespace (IPv4 and IPv6;
    grpcio binds 127.0.0.1 as an IPv6 socket on ::ffff:127.0.0.1)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                count += 1
    return count


class Workers:
    def __init__(self, procs: ProcessGroup, redis: Redis, *extra: str, bind: str = HOST) -> None:
        self.port = free_port()
        self.admin = two_free_ports()
        argv = xdsplane_argv(
            "guard",
            *("--address", f"{bind}:{self.port}", "--admin-address", f"{HOST}:{self.admin}"),
            *("--insecure", "--log-format", "json", "--redis", redis.url),
            *("--workers", str(WORKERS), *extra),
        )
        self.proc: Proc = procs.spawn("guard-workers", argv)
        self.seq = 0

    def start(self) -> Workers:
        self.proc.start()
        wait_until(self.all_healthy, 30, what="every worker's /healthz")
        # Until the parent has seen every worker answer, a worker that exits is a startup
        # error (the parent gives up), not a crash to restart.
        wait_until(lambda: "every worker serving" in self.proc.tail(), 30, what="the parent")
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

    def check(
        self, claims: dict[str, Any], channel: grpc.Channel | None = None, host: str = HOST
    ) -> Any:
        """A Check on ``channel``, or on a new connection of its own to ``host``."""
        if channel is not None:
            return external_auth_pb2_grpc.AuthorizationStub(channel).Check(
                check_request(claims), timeout=5
            )
        with new_channel(self.port, host) as ch:
            return self.check(claims, ch)

    def served_by(self, channel: grpc.Channel) -> int:
        """Which worker serves ``channel``'s connection: the one whose count rises."""
        before = [self.decisions(k) for k in range(WORKERS)]
        assert allowed(self.check(self.token(), channel))
        after = [self.decisions(k) for k in range(WORKERS)]
        moved = [k for k in range(WORKERS) if after[k] > before[k]]
        assert len(moved) == 1, (before, after)
        return moved[0]

    def channel_on(self, k: int, limit: int = 200, host: str = HOST) -> grpc.Channel:
        """A connection the kernel gave to worker k (new connections until one lands)."""
        for _ in range(limit):
            ch = new_channel(self.port, host)
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


def kill_worker(workers: Workers, k: int) -> int:
    """SIGKILL worker k and wait until its listening socket is closed; its PID.

    A zombie PID is not enough: the process's other threads (grpcio's) still hold its file
    table for a few ms, so the socket listens on, and the connections the kernel hands it
    then are reset when it closes (unless net.ipv4.tcp_migrate_req = 1). Only once the
    socket is gone is every new connection the surviving worker's.
    """
    victim = workers.pid(k)
    assert victim is not None
    assert listening(workers.port) == WORKERS
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: listening(workers.port) == WORKERS - 1, 10, what="its socket closed")
    return victim


CONNECTIONS = 15  # new connections per address family and phase


@pytest.mark.parametrize("bind", ["127.0.0.1", "[::]"], ids=["ipv4", "dual-stack"])
def test_every_new_connection_is_served_across_repeated_kills(
    procs: ProcessGroup, redis: Redis, bind: str
) -> None:
    """Kill each worker in turn (4 kills): every new connection, over each family the port
    is bound for, is served by the worker still listening while the killed one is down,
    and by either once the restarted one listens again (which serves each family too)."""
    workers = Workers(procs, redis, bind=bind).start()
    families = ["127.0.0.1", "::1"] if bind == "[::]" else ["127.0.0.1"]
    for kill in range(4):
        k = kill % 2
        survivor = workers.pid(1 - k)
        before = workers.decisions(1 - k)
        victim = kill_worker(workers, k)
        for host in families:
            for _ in range(CONNECTIONS):
                assert allowed(workers.check(workers.token(), host=host)), (kill, host)
        # the survivor served every one of them
        assert workers.decisions(1 - k) == before + CONNECTIONS * len(families)
        wait_until(lambda k=k, v=victim: workers.pid(k) not in (None, v), 30, what="back")
        # its /metrics answers only once its gRPC port is served (bound after the admin port)
        assert listening(workers.port) == WORKERS
        for host in families:
            workers.channel_on(k, host=host).close()  # the restarted one serves this family
            for _ in range(CONNECTIONS):
                assert allowed(workers.check(workers.token(), host=host)), (kill, host)
        assert workers.pid(1 - k) == survivor
    assert workers.proc.alive()


def test_a_restart_that_fails_never_takes_connections(workers: Workers) -> None:
    """Worker 0 is killed and its admin port taken, so each restart fails: the restarted
    process never listens on the shared port (it binds it last), and every new connection
    meanwhile is served by worker 1. Once the admin port is free, worker 0 comes back."""
    victim = kill_worker(workers, 0)
    holder = socket.socket()
    # SO_REUSEADDR as the worker's own admin socket (aiohttp) has: the port may still have
    # connections in TIME_WAIT; two listening sockets still cannot share it.
    holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        holder.bind((HOST, workers.admin))
        holder.listen()
        failed = re.compile(r"worker 0 \(pid \d+\) exited with code 1")
        served = 0
        deadline = time.monotonic() + 60  # a generous ceiling: restarts at +0.5 s, +1 s
        while len(failed.findall(workers.proc.tail(200))) < 2:
            assert time.monotonic() < deadline, workers.proc.tail()
            assert listening(workers.port) == WORKERS - 1
            assert allowed(workers.check(workers.token()))
            served += 1
        assert served > 0
        assert "cannot listen for admin" in workers.proc.tail(200)
    finally:
        holder.close()
    wait_until(lambda: workers.pid(0) not in (None, victim), 30, what="worker 0 back")
    workers.channel_on(0).close()


def test_the_parent_notes_when_queued_connections_would_be_reset(tmp_path: Path) -> None:
    from xdsplane.guard.workers import migrate_note

    sysctl = tmp_path / "tcp_migrate_req"
    sysctl.write_text("0\n")
    note = migrate_note(sysctl)
    assert note is not None and "net.ipv4.tcp_migrate_req=1" in note
    sysctl.write_text("1\n")
    assert migrate_note(sysctl) is None
    assert migrate_note(tmp_path / "absent") is None  # not Linux >= 5.14: nothing to say


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


async def test_admin_answers_503_until_the_grpc_port_is_served() -> None:
    """A worker binds its admin port before its gRPC port (a taken admin port must fail
    before the shared port is joined): until the gRPC port is served, /healthz and /metrics
    say 503, so a 200 (what the parent and the probes wait for) means it is served."""
    from aiohttp.test_utils import TestClient, TestServer

    from xdsplane.guard.app import GuardOptions, admin_app
    from xdsplane.guard.service import GuardService
    from xdsplane.guard.store import MemoryStore

    serving = asyncio.Event()
    app = admin_app(GuardService(MemoryStore(), None), GuardOptions(), serving=serving)
    async with TestClient(TestServer(app)) as client:
        for path in ("/healthz", "/metrics"):
            r = await client.get(path)
            assert r.status == 503 and (await r.json()) == {"status": "starting"}
        serving.set()
        for path in ("/healthz", "/metrics"):
            assert (await client.get(path)).status == 200


def http_check(port: int, claims: dict[str, Any]) -> tuple[int, str]:
    """One check on the HTTP front, on a new connection: (status, guard_reason)."""
    import http.client
    import json

    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        path = "/xdsplane-check/replay/x"
        conn.request("GET", path, headers={"x-xdsplane-jwt-payload": json.dumps(claims)})
        r = conn.getresponse()
        r.read()
        return r.status, r.getheader("guard_reason") or ""
    finally:
        conn.close()


def test_workers_share_the_http_front_and_its_replay_state(
    procs: ProcessGroup, redis: Redis
) -> None:
    """--http-address among --workers: every worker listens on it (SO_REUSEPORT, as gRPC),
    new connections are spread over them, and a token used on one is refused on another."""
    http_port = free_port()
    w = Workers(procs, redis, "--http-address", f"{HOST}:{http_port}").start()
    assert listening(http_port) == WORKERS
    before = [w.decisions(k) for k in range(WORKERS)]
    for _ in range(40):  # each on a new connection: the kernel picks the worker
        assert http_check(http_port, w.token()) == (200, "ok")
    after = [w.decisions(k) for k in range(WORKERS)]
    assert all(a > b for a, b in zip(after, before, strict=True)), (before, after)
    token = w.token()
    assert http_check(http_port, token) == (200, "ok")
    assert [http_check(http_port, token) for _ in range(10)] == [(403, "replay")] * 10
    assert denied(w.check(token))[:2] == (403, "replay")  # the gRPC side agrees
