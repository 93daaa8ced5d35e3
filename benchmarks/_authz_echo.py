"""An ext_authz server that allows everything at once: the floor of a Python grpc.aio
Authorization service, for ``bench_guard.py --backends ...,echo``.

    python benchmarks/_authz_echo.py --address H:P --admin-address H:P

Same flags and ``/healthz`` as ``xdsplane guard`` so the benchmark starts it the same way;
the request is decoded (as the guard does) and an OK CheckResponse, encoded once, is sent.
Nothing else: no claims, no store, no metrics, no log. The difference between this and the
guard is what the guard's own work costs; this itself is the cost of gRPC in Python.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from typing import Any

import grpc
from aiohttp import web
from envoy.service.auth.v3 import external_auth_pb2
from google.rpc import code_pb2, status_pb2  # type: ignore[import-untyped]

OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=code_pb2.OK),
    ok_response=external_auth_pb2.OkHttpResponse(),
).SerializeToString()


async def check(request: Any, context: Any) -> bytes:
    return OK


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--address", required=True)
    ap.add_argument("--admin-address", required=True)
    args, _ = ap.parse_known_args()
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
    handler = grpc.unary_unary_rpc_method_handler(
        check,
        request_deserializer=external_auth_pb2.CheckRequest.FromString,
        response_serializer=lambda b: b,
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "envoy.service.auth.v3.Authorization", {"Check": handler}
            ),
        )
    )
    server.add_insecure_port(args.address)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "backend": "echo"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host, port = args.admin_address.rsplit(":", 1)
    await web.TCPSite(runner, host, int(port)).start()
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await server.stop(1)
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
