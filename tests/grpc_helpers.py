"""Real grpcio backends and proxyless gRPC clients for the gRPC tests.

Backends run in the test process (grpcio servers on free loopback ports) and answer
``/billing.Billing/*`` with their name; they can fail the first N calls with UNAVAILABLE or
hold each call. Clients run as subprocesses (tests/grpc_client_main.py), each with its own
bootstrap from ``xdsplane bootstrap --grpc``: grpc C-core reads it once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from harness import HOST, Proc, ProcessGroup, free_port, xdsplane_argv

CLIENT = str(Path(__file__).with_name("grpc_client_main.py"))
SERVICE = "billing.Billing"
CHARGE = f"/{SERVICE}/Charge"
REFUND = f"/{SERVICE}/Refund"
# Every gRPC process of a test is bounded: a client run well under this, a loop as asked.
CLIENT_SECONDS = 60.0


class Backend:
    """A real grpcio server that answers every billing method with its name."""

    def __init__(
        self,
        name: str,
        fail_first: int = 0,
        delay: float = 0.0,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.name = name
        self.fail_first = fail_first
        self.delay = delay
        self.calls = 0
        self.peers: list[list[bytes]] = []  # the client certificate's SANs, per call (TLS)
        self._lock = threading.Lock()
        self.port = free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.unary_unary_rpc_method_handler(self._answer)
        generic = grpc.method_handlers_generic_handler(
            SERVICE, {"Charge": handler, "Refund": handler}
        )
        self.server.add_generic_rpc_handlers((generic,))
        address = f"{HOST}:{self.port}"
        if credentials is None:
            self.server.add_insecure_port(address)
        else:
            self.server.add_secure_port(address, credentials)
        self.server.start()

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    def _answer(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
            n = self.calls
            self.peers.append(list(context.peer_identities() or []))
        if n <= self.fail_first:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{self.name} fails call {n}")
        if self.delay:
            time.sleep(self.delay)
        return self.name.encode()

    def close(self) -> None:
        self.server.stop(grace=None)


def grpc_bootstrap(node: str, xds_address: str, *extra: str) -> str:
    """The bootstrap JSON ``xdsplane bootstrap --grpc`` prints (the real command)."""
    done = subprocess.run(
        xdsplane_argv("bootstrap", "--grpc", "--node", node, "--xds-address", xds_address, *extra),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    json.loads(done.stdout)
    return done.stdout


def client_env(bootstrap: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GRPC_XDS_BOOTSTRAP", None)
    env["GRPC_XDS_BOOTSTRAP_CONFIG"] = bootstrap
    return env


def run_calls(
    bootstrap: str,
    target: str,
    count: int,
    method: str = CHARGE,
    timeout: float = 10.0,
    hash_header: str | None = None,
) -> dict[str, Any]:
    """``count`` calls from a fresh client process; its JSON summary."""
    extra = [f"hash:{hash_header}"] if hash_header else []
    done = subprocess.run(
        [
            sys.executable,
            CLIENT,
            f"xds:///{target}",
            method,
            "calls",
            str(count),
            str(timeout),
            *extra,
        ],
        capture_output=True,
        text=True,
        timeout=CLIENT_SECONDS,
        env=client_env(bootstrap),
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def start_loop(procs: ProcessGroup, name: str, bootstrap: str, target: str, seconds: float) -> Proc:
    """A client calling every 10 ms for ``seconds``; its lines in the Proc's log."""
    argv = [sys.executable, CLIENT, f"xds:///{target}", CHARGE, "loop", str(seconds)]
    return procs.spawn(name, argv, env=client_env(bootstrap), max_seconds=seconds + 30).start()


def loop_lines(proc: Proc) -> list[dict[str, Any]]:
    out = []
    for line in proc.log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue  # a line being written
    return out
