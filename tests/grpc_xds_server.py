"""A real xDS-enabled gRPC server (grpcio, ``grpc.server(..., xds=True)``) for the tests.

Run as ``python grpc_xds_server.py IP:PORT`` with ``GRPC_XDS_BOOTSTRAP_CONFIG`` in its
environment (C-core reads the bootstrap once per process, hence a process of its own). It
serves generic handlers (no generated code): ``/billing.Billing/Charge``,
``/billing.Billing/Refund``, ``/billing.Status/Get`` and ``/billing.Admin/Delete``, each
answering ``METHOD:REQUEST`` with the bytes it received, so a caller sees which method
ran. Its TLS comes from xDS (``xds_server_credentials``); it stops on SIGTERM.
"""

from __future__ import annotations

import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc

METHODS = {
    "billing.Billing": ("Charge", "Refund"),
    "billing.Status": ("Get",),
    "billing.Admin": ("Delete",),
}


def _handler(path: str) -> Any:
    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        return path.encode() + b":" + request

    return grpc.unary_unary_rpc_method_handler(answer)  # bytes in, bytes out


def main() -> None:
    address = sys.argv[1]
    handlers = [
        grpc.method_handlers_generic_handler(
            service, {m: _handler(f"/{service}/{m}") for m in methods}
        )
        for service, methods in METHODS.items()
    ]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=handlers, xds=True)
    server.add_secure_port(address, grpc.xds_server_credentials(grpc.insecure_server_credentials()))
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    print(f"xDS-enabled gRPC server on {address}", flush=True)
    stop.wait()
    server.stop(grace=1).wait()


if __name__ == "__main__":
    main()
