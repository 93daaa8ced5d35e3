"""Process helpers for the benchmarks: the test harness's, plus /proc readings.

tests/harness.py (free ports, ``xdsplane serve`` and Envoy as subprocesses stopped by PID,
``wait_until``) is reused as it is; this module only adds what the benchmarks need on top.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _common

sys.path.insert(0, str(_common.ROOT / "tests"))

import harness

HOST = harness.HOST
ProcessGroup = harness.ProcessGroup
XdsServer = harness.XdsServer
Envoy = harness.Envoy
free_port = harness.free_port
wait_until = harness.wait_until

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends from /proc/PID/status, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
        elif key == "Threads":
            out[key] = int(parts[0])
    return out


def rss(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def mb(n: float) -> str:
    return f"{n / 1024 / 1024:.0f} MB"


def redis_binary() -> str:
    """The real redis-server (Debian's redis-server package)."""
    import shutil

    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(binary).exists():
        raise SystemExit("redis-server is missing: apt-get install redis-server")
    return binary


class Redis:
    """redis-server on a free port, no persistence, stopped by PID."""

    def __init__(self, procs: harness.ProcessGroup, workdir: Path, max_seconds: float) -> None:
        self.port = free_port()
        argv = [redis_binary(), "--port", str(self.port), "--bind", HOST, "--save", ""]
        argv += ["--appendonly", "no", "--dir", str(workdir), "--daemonize", "no"]
        self.proc = procs.spawn("redis", argv, max_seconds=max_seconds)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self) -> Redis:
        self.proc.start()
        wait_until(self._ping, 10, what="redis PING")
        return self

    def _ping(self) -> bool:
        import socket

        self.proc.ensure_alive()
        with socket.create_connection((HOST, self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")


class Guard:
    """``xdsplane guard`` as a process on free ports (gRPC and admin), stopped by PID."""

    def __init__(
        self,
        procs: harness.ProcessGroup,
        name: str,
        *args: str,
        log_level: str = "info",
        max_seconds: float = 600.0,
    ) -> None:
        self.port = free_port()
        # Worker K serves its admin on this port + K: all N ports must be free (one taken
        # by another process left worker 1 unreachable in a loaded CI run).
        workers = int(args[args.index("--workers") + 1]) if "--workers" in args else 1
        self.admin_port = harness.free_ports(workers)
        argv = harness.xdsplane_argv(
            *("guard", "--address", self.address, "--admin-address", f"{HOST}:{self.admin_port}"),
            # Plaintext on loopback: the figures are the guard's own cost, as measured before
            # mTLS was required (a deployed guard serves mTLS: docs/guard.md).
            "--insecure",
            # info (the default) logs one line per decision, as a deployed guard does.
            *("--log-format", "json", "--log-level", log_level, *args),
        )
        self.proc = procs.spawn(name, argv, max_seconds=max_seconds)

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def launch(self) -> Guard:
        self.proc.start()
        return self

    def wait_ready(self, timeout: float = 30.0) -> Guard:
        def healthy() -> bool:
            self.proc.ensure_alive()
            return harness.http_get(self.admin_port, "/healthz").status == 200

        wait_until(healthy, timeout, what=f"{self.proc.name} /healthz")
        return self

    def metrics(self) -> str:
        return harness.http_get(self.admin_port, "/metrics").text
