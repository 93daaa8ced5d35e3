"""`xdsplane up`: from a clean checkout (no certificates yet) it serves the sample end to end
over an mTLS xDS channel, and it supervises: a control plane, guard or Envoy killed with
SIGKILL is reported and restarted while the edge keeps serving (zero failed requests when
the control plane dies); SIGTERM or Ctrl-C stops everything, even while a restart waits out
its backoff, and leaves no process behind.

Each test runs its own `up` in its own session (process group), found and killed as a group
at the end whatever happened (a watchdog kills the group after ``UP_CEILING`` seconds).
Processes under `up` are found from /proc (children of `up`, by their command line).
Waits poll (``wait_until``) with generous ceilings: ``READY`` seconds for a piece to come up.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from harness import ProcessDied, ProcessGroup, free_port, http_get, wait_until
from test_sample import bearer_get
from tls_helpers import TlsConnection

from xdsplane import jwt
from xdsplane.supervise import Backoff, Supervisor

REPO = Path(__file__).resolve().parent.parent
UP_CEILING = 300.0  # the watchdog: an `up` group older than this is killed
READY = 90.0  # ceiling for `up` (or one of its pieces) to be serving, on a busy machine
STOP = 60.0  # ceiling for `up` to stop everything after SIGTERM / SIGINT
STRICT = "mtls.billing.example.com"  # the sample's client-certificate host: no JWT, no guard


# -- processes from /proc ------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name: [state, ppid, pgrp, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes in process group ``pgid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _stat(int(entry.name))
            if fields is not None and fields[2] == str(pgid) and fields[0] != "Z":
                found.append(int(entry.name))
    return found


def children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(k) for k in (task / "children").read_text().split()]
    return found


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


def role(pid: int) -> str | None:
    argv = cmdline(pid)
    if argv and Path(argv[0]).name == "envoy":
        return "envoy"
    if "xdsplane" in argv and "serve" in argv:
        return "control plane"
    if "xdsplane" in argv and "guard" in argv:
        return "guard"
    return None


# -- one `up` ------------------------------------------------------------------------------


@dataclass
class Up:
    proc: subprocess.Popen[bytes]
    log: Path
    certs: Path
    policy: Path
    ports: dict[int, int]  # the sample's fixed ports -> the free ones this run uses
    addr: dict[str, str]
    killed: list[str] = field(default_factory=list)

    @property
    def edge_port(self) -> int:
        return self.ports[8443]

    def port(self, name: str) -> int:
        return int(self.addr[name].rsplit(":", 1)[1])

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def pieces(self) -> dict[str, int]:
        """The control plane, guard and Envoy `up` runs now: role -> pid."""
        if self.proc.poll() is not None:
            raise ProcessDied(f"up exited with {self.proc.returncode}:\n{self.text()[-3000:]}")
        out = {}
        for pid in children(self.proc.pid):
            name, fields = role(pid), _stat(pid)
            if name is not None and fields is not None and fields[0] != "Z":
                out[name] = pid
        return out

    def kill(self, name: str) -> int:
        pid = self.pieces()[name]
        os.kill(pid, signal.SIGKILL)
        self.killed.append(f"{name} {pid}")
        return pid

    def replaced(self, name: str, old: int) -> Callable[[], int | None]:
        """A predicate: the pid of a new ``name`` process, once `up` started one."""

        def check() -> int | None:
            pid = self.pieces().get(name)
            return pid if pid not in (None, old) else None

        return check

    def envoy_stats(self) -> dict[str, int]:
        body = http_get(self.port("envoy"), "/stats").text
        out = {}
        for line in body.splitlines():
            key, _, value = line.partition(": ")
            if value.strip().isdigit():
                out[key] = int(value)
        return out

    def status(self) -> dict[str, Any]:
        return dict(json.loads(http_get(self.port("admin"), "/status").body))

    def client(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.certs / "service-ca.crt"))
        ctx.load_cert_chain(str(self.certs / "alice.crt"), str(self.certs / "alice.key"))
        return ctx

    def strict_get(self) -> int:
        """One request on a new TLS connection to the strict host (billing, over mTLS)."""
        conn = TlsConnection(self.edge_port, self.client(), STRICT)
        try:
            return conn.get("/", close=True).status
        finally:
            conn.close()

    def edge_connected(self) -> bool:
        """Envoy holds an xDS stream to a control plane that lists it as node edge-1."""
        stats = self.envoy_stats()
        nodes = [s["node"] for s in self.status()["streams"]]
        return stats.get("control_plane.connected_state") == 1 and "edge-1" in nodes


def sample_policy(root: Path) -> tuple[Path, dict[int, int]]:
    ports = {
        8443: free_port(),
        8080: free_port(),
        9443: free_port(),
        18081: free_port(),
        50051: free_port(),  # the gRPC billing demo (the authority keeps :50051)
    }
    policy = root / "snapshots"
    policy.mkdir()
    for f in (REPO / "snapshots").glob("*.yaml"):
        text = f.read_text()
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}", f"127.0.0.1:{new}")
            text = text.replace(f"https_port: {old}", f"https_port: {new}")
        (policy / f.name).write_text(text)
    shutil.copytree(REPO / "policy-tests", root / "policy-tests")  # `up` prints how to run them
    return policy, ports


@contextlib.contextmanager
def running_up(tmp_path: Path, procs: ProcessGroup) -> Iterator[Up]:
    """`xdsplane up` on a copy of the sample (free ports, no certificates yet), in its own
    session; yields once it printed "xdsplane is up". Always kills its whole group after."""
    policy, ports = sample_policy(tmp_path)
    certs = tmp_path / "certs"
    assert not certs.exists()
    addr = {name: f"127.0.0.1:{free_port()}" for name in ("xds", "admin", "envoy", "ga")}
    addr["g"] = f"127.0.0.1:{ports[18081]}"  # the sample's guard address
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "xdsplane", "up",
                "--config", str(policy), "--certs", str(certs),
                "--xds-address", addr["xds"], "--admin-address", addr["admin"],
                "--envoy-admin-address", addr["envoy"],
                "--billing-address", f"127.0.0.1:{ports[9443]}",
                "--grpc-billing-address", f"127.0.0.1:{ports[50051]}",
                "--edge-address", f"127.0.0.1:{ports[8443]}",
                "--guard-address", addr["g"], "--guard-admin-address", addr["ga"],
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: killed as one below, whatever happens
        )  # fmt: skip
    up = Up(proc, log, certs, policy, ports, addr)
    procs.add_diagnostic(
        "xdsplane up log (tail)", lambda: "\n".join(up.text()[-6000:].splitlines())
    )
    procs.add_diagnostic("killed by the test", lambda: ", ".join(up.killed))
    watchdog = threading.Timer(UP_CEILING, lambda: _kill_group(proc.pid))
    watchdog.daemon = True
    watchdog.start()
    try:
        wait_until(
            lambda: "xdsplane is up" in up.text() or proc.poll() is not None, READY, what="up"
        )
        assert proc.poll() is None, up.text()[-3000:]
        yield up
    finally:
        watchdog.cancel()
        _kill_group(proc.pid)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def stop_and_check_nothing_left(up: Up, sig: signal.Signals, whole_group: bool = False) -> str:
    """Stop `up` with ``sig`` (sent to the whole group with ``whole_group``, as Ctrl-C in a
    terminal does); it exits 0 and no process of its group is left. Returns what `up`
    logged from the signal on."""
    before = len(up.text())
    pgid = up.proc.pid
    if whole_group:
        os.killpg(pgid, sig)
    else:
        up.proc.send_signal(sig)
    code = up.proc.wait(STOP)
    assert code == 0, up.text()[-3000:]
    wait_until(lambda: not group_members(pgid), 10, what="every process of up's group gone")
    return up.text()[before:]


# -- the tests -----------------------------------------------------------------------------


@pytest.mark.envoy
def test_up_serves_the_sample_over_mtls_as_edge_1_and_stops_cleanly(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    with running_up(tmp_path, procs) as up:
        assert set(up.pieces()) == {"control plane", "guard", "envoy"}, up.pieces()
        ctx = up.client()
        token = jwt.token(up.certs, "alice")
        answer = bearer_get(up.edge_port, ctx, "/billing/invoices", token)
        assert answer.status == 200, answer
        assert "commonName=gateway" in answer.text  # reached billing over mTLS
        assert "CN=alice" in answer.text  # with the client's identity in XFCC
        # the guard up started checks replay and serves the policy's global limit
        assert bearer_get(up.edge_port, ctx, "/billing/invoices", token).status == 403
        again = bearer_get(up.edge_port, ctx, "/billing/invoices", jwt.token(up.certs, "alice"))
        assert again.status == 200, again
        assert "x-ratelimit-limit" in again.headers, again.headers
        health = json.loads(http_get(up.port("ga"), "/healthz").body)
        assert health["domains"] == ["xdsplane"] and health["rules"] == 2, health
        assert health["grpc"] == "mtls" and health["insecure"] is False, health

        # Envoy's xDS connection is mTLS, as node edge-1. From Envoy's admin: the xDS
        # cluster's transport socket presents the node's certificate (whose SAN names
        # edge-1), it made TLS handshakes, and it is connected ...
        dump = json.loads(http_get(up.port("envoy"), "/config_dump?resource=static_clusters").body)
        xds = [c["cluster"] for c in dump["configs"] if c["cluster"]["name"] == "xds_cluster"]
        assert len(xds) == 1, dump
        tls = xds[0]["transport_socket"]["typed_config"]
        assert tls["@type"].endswith("UpstreamTlsContext"), tls
        chain = tls["common_tls_context"]["tls_certificates"][0]["certificate_chain"]["filename"]
        assert Path(chain) == (up.certs / "edge-1.crt").absolute(), chain
        sans = (
            x509.load_pem_x509_certificate(Path(chain).read_bytes())
            .extensions.get_extension_for_class(x509.SubjectAlternativeName)
            .value.get_values_for_type(x509.UniformResourceIdentifier)
        )
        assert sans == ["spiffe://xdsplane/node/edge-1"], sans
        stats = up.envoy_stats()
        assert stats["cluster.xds_cluster.ssl.handshake"] >= 1, stats
        assert stats["control_plane.connected_state"] == 1, stats
        # ... and the control plane serves xDS over mTLS only, with edge-1 connected.
        status = up.status()
        assert status["xds_tls"] is not None, status["xds_tls"]
        assert [s["node"] for s in status["streams"]] == ["edge-1"], status["streams"]
        refusal = _xds_without_client_certificate(up)
        assert refusal, "the xDS port answered a client without a certificate"

        # A request without a client certificate on the optional host: counted per host by
        # Envoy, and shown by the control plane, which `up` points at Envoy's admin.
        anonymous = ssl.create_default_context(cafile=str(up.certs / "service-ca.crt"))
        fresh = jwt.token(up.certs, "bob")
        assert bearer_get(up.edge_port, anonymous, "/billing/invoices", fresh).status == 200

        def missing_shown() -> int:
            envoys = up.status()["envoys"]
            assert [e["name"] for e in envoys] == ["edge-1"], envoys
            hosts = {h["host"]: h for e in envoys for h in e["hosts"]}
            return int(hosts.get("https/billing", {}).get("without_certificate", 0))

        wait_until(lambda: missing_shown() >= 1, 20, what="the missing certificate in /status")
        envoy_count = up.envoy_stats()[
            "http.https/billing.rbac.client_certificate_missing.shadow_denied"
        ]
        assert 1 <= missing_shown() <= envoy_count
        page = http_get(up.port("admin"), "/").text
        assert "Client certificates on optional hosts" in page and "https/billing" in page

        # The printed example commands run as shown in a new terminal: another directory,
        # a PATH without the virtual environment, no VIRTUAL_ENV.
        try_token = next(line.strip() for line in up.text().splitlines() if "Bearer $(" in line)
        assert shlex.split(try_token)[0] == "curl", try_token
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        shell = subprocess.run(
            ["/bin/sh", "-c", try_token],
            cwd=elsewhere,
            env={"PATH": "/usr/bin:/bin", "HOME": str(elsewhere)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shell.returncode == 0, shell
        assert '"path": "/billing/invoices"' in shell.stdout, shell
        # ... and so does the command running the policy's cases (xdsplane test).
        cases = (tmp_path / "policy-tests" / "billing-edge.yaml").resolve()
        try_test = next(line.strip() for line in up.text().splitlines() if " test " in line)
        assert shlex.split(try_test)[-3:] == ["test", str(up.policy.resolve()), str(cases)]
        assert "xdsplane" in shlex.split(try_test)[0], try_test

        # The printed gRPC client (a Python program that knows only grpcio) reaches the
        # gRPC billing demo through xds:/// with the bootstrap `bootstrap --grpc` prints.
        grpc_line = next(
            line.strip() for line in up.text().splitlines() if "GRPC_XDS_BOOTSTRAP" in line
        )
        # (gRPC's xds_client and subchannel traces: why an xDS connection failed is on
        # stderr, in the failure message; one CI run saw DEADLINE_EXCEEDED, the ADS stream
        # opening only after ~10 s. A passing run writes ~100 lines.)
        trace = {"GRPC_VERBOSITY": "INFO", "GRPC_TRACE": "xds_client,subchannel"}
        shell = subprocess.run(
            ["/bin/sh", "-c", grpc_line],
            cwd=elsewhere,
            env={"PATH": "/usr/bin:/bin", "HOME": str(elsewhere), **trace},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert shell.returncode == 0, (shell.returncode, shell.stdout, shell.stderr[-20_000:])
        assert json.loads(shell.stdout)["service"] == "billing-grpc", shell
        # A gRPC client that stays connected is listed beside Envoy in `xdsplane status`.
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=grpc_bootstrap_of(grpc_line))
        client = procs.spawn(
            "grpc-client",
            [sys.executable, str(REPO / "tests" / "grpc_client_main.py"),
             "xds:///billing.grpc:50051", "/billing.Billing/Charge", "loop", "60"],
            env=env,
        ).start()  # fmt: skip
        wait_until(
            lambda: (
                {s["node"]: s["client"] for s in up.status()["streams"]}
                == {"edge-1": "envoy", "grpc-1": "grpc"}
            ),
            30,
            what="edge-1 and grpc-1 in /status",
        )
        client.stop()

        tail = stop_and_check_nothing_left(up, signal.SIGTERM)
        assert "restart" not in tail, tail
        text = up.text()
        assert "PRIVATE KEY" not in text and token not in text


def grpc_bootstrap_of(line: str) -> str:
    """Run the `xdsplane bootstrap --grpc ...` inside the printed command; its JSON."""
    command = line.split('"$(', 1)[1].split(')"', 1)[0]
    done = subprocess.run(
        ["/bin/sh", "-c", command], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def _xds_without_client_certificate(up: Up) -> str:
    """Speak HTTP/2 to the xDS port over TLS without a client certificate; how it was
    refused ("" when an HTTP/2 frame came back)."""
    ctx = ssl.create_default_context(cafile=str(up.certs / "service-ca.crt"))
    ctx.set_alpn_protocols(["h2"])
    host, port = up.addr["xds"].rsplit(":", 1)
    try:
        with (
            socket.create_connection((host, int(port)), timeout=10) as raw,
            ctx.wrap_socket(raw, server_hostname=host) as tls,
        ):
            tls.sendall(
                b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
            )
            data = tls.recv(1024)
    except (ssl.SSLError, ConnectionError) as e:
        return repr(e)
    return "" if data else "closed"


@dataclass
class StrictLoad:
    """Requests to the strict host through Envoy in threads, each on a new TLS connection,
    until stopped: every outcome that is not a 200 is a failure."""

    up: Up
    threads: int = 3
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _workers: list[threading.Thread] = field(default_factory=list)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                status = self.up.strict_get()
                outcome = "" if status == 200 else f"status {status}"
            except Exception as e:
                outcome = repr(e)
            with self._lock:
                if outcome:
                    self.failures.append(outcome)
                else:
                    self.ok += 1

    def flowing(self, more_than: int) -> Callable[[], bool]:
        start = self.ok
        return lambda: self.ok > start + more_than

    def __enter__(self) -> StrictLoad:
        for i in range(self.threads):
            t = threading.Thread(target=self._run, name=f"strict-{i}", daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(15)


@pytest.mark.envoy
def test_control_plane_killed_under_up_fails_no_request(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    with running_up(tmp_path, procs) as up:
        envoy = up.pieces()["envoy"]
        handshakes = up.envoy_stats()["cluster.xds_cluster.ssl.handshake"]
        churn = {k: v for k, v in up.envoy_stats().items() if k.startswith("listener_manager.")}
        versions = [g["versions"] for g in up.status()["groups"]]
        with StrictLoad(up) as load:
            wait_until(load.flowing(20), READY, what="requests flowing through Envoy")
            old = up.kill("control plane")
            new = wait_until(up.replaced("control plane", old), READY, what="a new control plane")
            wait_until(lambda: http_get(up.port("admin"), "/readyz").status == 200, READY)
            # Envoy is connected again, to the new process, over a new mTLS handshake.
            wait_until(up.edge_connected, READY, what="Envoy connected again")
            assert up.envoy_stats()["cluster.xds_cluster.ssl.handshake"] > handshakes
            wait_until(load.flowing(20), READY, what="requests after the restart")
        assert load.failures == [], load.failures[:5]
        assert [g["versions"] for g in up.status()["groups"]] == versions  # the same config
        assert load.ok > 40
        assert up.pieces()["envoy"] == envoy  # Envoy itself kept running
        after = {k: v for k, v in up.envoy_stats().items() if k.startswith("listener_manager.")}
        for key in ("listener_modified", "listener_removed", "total_listeners_draining"):
            assert after.get(f"listener_manager.{key}") == churn.get(f"listener_manager.{key}")
        text = up.text()
        assert f"control plane (pid {old}) was killed by SIGKILL after" in text, text[-3000:]
        assert "; restarting it in 0.5 s" in text
        assert f"control plane restarted (pid {new}" in text
        stop_and_check_nothing_left(up, signal.SIGTERM)


@pytest.mark.envoy
def test_envoy_and_guard_killed_under_up_come_back_then_ctrl_c_stops_all(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    with running_up(tmp_path, procs) as up:
        old = up.kill("envoy")
        wait_until(up.replaced("envoy", old), READY, what="a new Envoy")
        wait_until(lambda: up.strict_get() == 200, READY, what="the edge serving again")
        wait_until(up.edge_connected, READY, what="the new Envoy connected over xDS")
        assert f"envoy (pid {old}) was killed by SIGKILL" in up.text()

        # The guard refuses nothing it should not: fail_open is false in the sample, so a
        # 200 on a replay-protected route means Envoy reached the new guard.
        old = up.kill("guard")
        wait_until(up.replaced("guard", old), READY, what="a new guard")
        ctx = up.client()
        wait_until(
            lambda: (
                bearer_get(
                    up.edge_port, ctx, "/billing/invoices", jwt.token(up.certs, "alice")
                ).status
                == 200
            ),
            READY,
            what="the guard answering Envoy again",
        )
        assert f"guard (pid {old}) was killed by SIGKILL" in up.text()

        # Ctrl-C in a terminal: SIGINT to the whole foreground group, `up` and its pieces.
        tail = stop_and_check_nothing_left(up, signal.SIGINT, whole_group=True)
        assert "restarting" not in tail and "restarted" not in tail, tail


@pytest.mark.envoy
def test_sigterm_while_a_restart_waits_out_its_backoff_leaves_nothing(
    tmp_path: Path, procs: ProcessGroup
) -> None:
    with running_up(tmp_path, procs) as up:
        # A broken policy file: the running control plane keeps the last good snapshot, a
        # new one refuses to start, so each restart fails and the delay doubles.
        (up.policy / "broken.yaml").write_text("listeners: [\n")
        old = up.kill("control plane")
        wait_until(
            lambda: "exited with code 1" in up.text() and "restarting it in 2.0 s" in up.text(),
            READY,
            what="the second failed restart",
        )
        assert up.strict_get() == 200  # Envoy serves what it has meanwhile
        wait_until(lambda: "restarting it in 4.0 s" in up.text(), READY, what="a third failure")
        assert "control plane" not in up.pieces()  # the 4 s backoff is pending
        tail = stop_and_check_nothing_left(up, signal.SIGTERM)
        assert "restarted" not in tail, tail
        assert old not in group_members(up.proc.pid)


# -- the supervisor alone (no Envoy) ----------------------------------------------------------


def test_backoff_doubles_to_the_cap_and_resets_after_a_long_run() -> None:
    b = Backoff(first=0.5, cap=10.0, reset_after=30.0)
    delays = []
    previous = None
    for _ in range(7):
        previous = b.delay(previous, ran_for=1.0)
        delays.append(previous)
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.delay(10.0, ran_for=30.0) == 0.5


def test_supervisor_restarts_after_the_delay_and_stop_cancels_a_pending_restart(
    tmp_path: Path,
) -> None:
    now = [0.0]
    said: list[str] = []
    sup = Supervisor(say=said.append, clock=lambda: now[0])
    marker = tmp_path / "starts"
    script = f"open({str(marker)!r}, 'a').write('x'); import sys; sys.exit(3)"
    child = sup.start("worker", [sys.executable, "-c", script])
    try:
        first = child.pid
        wait_until(lambda: sup.exited(), 60, what="the worker to exit")
        sup.poll()
        assert said == [
            f"worker (pid {first}) exited with code 3 after 0.0 s; restarting it in 0.5 s"
        ]
        assert child.proc is None
        now[0] = 0.4
        sup.poll()
        assert child.proc is None  # not yet due
        now[0] = 0.5
        sup.poll()
        assert child.proc is not None and "worker restarted" in said[-1]
        wait_until(lambda: sup.exited(), 60, what="the worker to exit again")
        sup.poll()
        assert said[-1].endswith("restarting it in 1.0 s")
        sup.stop()  # while the restart is pending
        now[0] = 100.0
        sup.poll()
        assert child.proc is None
        assert marker.read_text() == "xx"
    finally:
        sup.stop()


def test_supervisor_neither_reports_nor_restarts_exits_once_stop_is_requested() -> None:
    """Ctrl-C in a terminal reaches the children too: their exits are the stop, not a crash."""
    said: list[str] = []
    sup = Supervisor(say=said.append, backoff=Backoff(first=0.0))
    child = sup.start("worker", [sys.executable, "-c", "import sys; sys.exit(130)"])
    try:
        wait_until(lambda: sup.exited(), 60, what="the worker to exit")
        sup.request_stop()  # what `up`'s SIGINT / SIGTERM handler does
        sup.poll()
        sup.poll()
        assert said == []
        assert child.restarts == 0
    finally:
        sup.stop()
