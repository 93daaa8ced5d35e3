"""The demo billing service over gRPC, for proxyless gRPC clients (docs/grpc.md).

``billing.Billing`` with methods ``Charge``, ``Refund`` and ``List``, served by grpcio's
generic handlers with bytes in and out (no generated code, no protoc step): each answers a
JSON object naming the service instance, the method and the caller's certificate SANs (with
TLS), so a client sees which backend the control plane sent it to.
"""

from __future__ import annotations

import json
from concurrent import futures

import grpc

SERVICE = "billing.Billing"
METHODS = ("Charge", "Refund", "List")


def _handler(name: str, method: str) -> grpc.RpcMethodHandler:
    def answer(request: bytes, context: grpc.ServicerContext) -> bytes:
        peers = [p.decode(errors="replace") for p in context.peer_identities() or []]
        body = {"service": name, "method": f"/{SERVICE}/{method}", "peer_sans": peers}
        return json.dumps(body).encode()

    return grpc.unary_unary_rpc_method_handler(answer)


def start(
    address: str, name: str = "billing-grpc", credentials: grpc.ServerCredentials | None = None
) -> grpc.Server:
    """Serve on ``address`` (HOST:PORT) in background threads; call ``stop(None)``."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handlers = {m: _handler(name, m) for m in METHODS}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    try:
        if credentials is None:
            bound = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError:  # grpcio raises when the port cannot be bound
        bound = 0
    if not bound:
        raise OSError(f"cannot listen on {address}")
    server.start()
    return server
