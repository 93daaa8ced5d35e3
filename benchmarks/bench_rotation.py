"""Certificate rotation latency: file replaced -> first new handshake with the new serial.

    .venv/bin/python benchmarks/bench_rotation.py [--quick] [--rotations N]

A real Envoy serves the sample policy (a copy on free ports, with a PKI from
`xdsplane certs init`); `edge` is rotated N times with `xdsplane.pki.rotate` (key, then
certificate, each written atomically); after each rotation new TLS handshakes are made in a
tight loop until one presents the new serial. Reported: p50 and p99 over the rotations,
and whether Envoy drained or modified any listener meanwhile (it must not).

Goal (issue 4): p50 at most 20 ms.
"""

from __future__ import annotations

import argparse
import socket
import ssl
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _procs
from _common import ROOT, fmt_ms, header, p50, percentile, table, verdict
from cryptography import x509

from xdsplane import pki

GOAL = 0.020
SNI = "billing.example.com"


def serial_now(port: int, ctx: ssl.SSLContext) -> int:
    with (
        socket.create_connection((_procs.HOST, port), 2) as raw,
        ctx.wrap_socket(raw, server_hostname=SNI) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rotations", type=int, default=None, help="default 20, quick 5")
    args = ap.parse_args()
    rotations = args.rotations or (5 if args.quick else 20)
    print(header("bench_rotation: edge rotated -> first handshake with the new serial", args.quick))
    with tempfile.TemporaryDirectory(prefix="xdsplane-bench-rotation-") as tmp:
        root = Path(tmp)
        certs, folder = root / "certs", root / "snapshots"
        folder.mkdir()
        https = _procs.free_port()
        text = (ROOT / "snapshots" / "billing-edge.yaml").read_text()
        text = text.replace("127.0.0.1:8443", f"127.0.0.1:{https}")
        text = text.replace("127.0.0.1:8080", f"127.0.0.1:{_procs.free_port()}")
        (folder / "billing-edge.yaml").write_text(text)
        pki.init(certs)
        procs = _procs.ProcessGroup(root / "logs")
        try:
            server = _procs.XdsServer(procs, folder, watch_step_ms=2).start()
            envoy = _procs.Envoy(procs, root, "edge-1", server.xds_address, log_level="warning")
            envoy.start()
            ctx = ssl.create_default_context(cafile=str(certs / "service-ca.crt"))
            _procs.wait_until(lambda: serial_now(https, ctx), 20, what="TLS on the edge")
            before = envoy.stats(
                r"^listener_manager\.(listener_modified|listener_removed|total_listeners_draining)$"
            )
            latencies = []
            for _ in range(rotations):
                time.sleep(0.2)
                started = time.perf_counter()
                new = pki.rotate(certs, "edge")
                serial = x509.load_pem_x509_certificate(new.read_bytes()).serial_number
                deadline = started + 10
                while serial_now(https, ctx) != serial:
                    if time.perf_counter() > deadline:
                        raise SystemExit("the new certificate was not served within 10 s")
                latencies.append(time.perf_counter() - started)
            after = envoy.stats(
                r"^listener_manager\.(listener_modified|listener_removed|total_listeners_draining)$"
            )
        finally:
            procs.stop_all()
    rows = [
        [
            "rotation -> new serial on a new handshake",
            fmt_ms(p50(latencies)),
            fmt_ms(percentile(latencies, 99)),
            fmt_ms(min(latencies)),
            len(latencies),
            f"p50 <= {GOAL * 1000:.0f} ms",
            verdict(p50(latencies), GOAL),
        ]
    ]
    print(table(["measure", "p50", "p99", "min", "rotations", "goal", "status"], rows))
    print(
        "\nlisteners (must not move):",
        {k.split(".")[-1]: (before[k], after[k]) for k in sorted(after)},
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
