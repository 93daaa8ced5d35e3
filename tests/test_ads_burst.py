"""Thousands of streams arriving while the server's event loop is busy are all served.

New calls wait in gRPC's core until the asyncio loop picks them up. With gRPC's defaults,
past 1,000 waiting calls core refuses the ones that waited long, and past 3,000 every new
one (RESOURCE_EXHAUSTED "Too many pending requests for this server"; a client writing its
first request sees INTERNAL "Failed execute_batch"). A control plane sending the first
snapshots to thousands of reconnecting Envoys keeps its loop busy for seconds: the
5,000-stream fan-out benchmark lost 1,100-1,600 streams this way. ``grpc_options`` bounds
the waiting calls by ``--max-streams`` instead.

Here the loop is held (as a busy server's is) until a client process has sent the first
message of 3,100 streams, then let go: every stream must get its answer.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from xdsplane.app import grpc_options
from xdsplane.server.limits import Limits

CLIENT = Path(__file__).parent / "burst_client.py"
STREAMS = 3100  # past gRPC's default hard limit of 3,000 waiting calls
# Ceiling for the client to open and write 3,100 streams, and then to read their answers:
# ~5-10 s here; generous for a shared, slow machine.
CLIENT_SECONDS = 240


def _identity(b: bytes) -> bytes:
    return b


async def _echo(
    requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext
) -> AsyncIterator[bytes]:
    async for message in requests:
        yield message


async def _burst(options: list[tuple[str, int]]) -> dict[str, int]:
    server = grpc.aio.server(options=options)
    handler = grpc.stream_stream_rpc_method_handler(_echo, _identity, _identity)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("burst.Echo", {"Stream": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = subprocess.Popen(
        [sys.executable, str(CLIENT), str(port), str(STREAMS)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout is not None
        # Blocking read: the loop is held here until every call waits in gRPC's core.
        assert client.stdout.readline() == "sent\n"
        out, _ = await asyncio.to_thread(client.communicate, timeout=CLIENT_SECONDS)
    finally:
        if client.poll() is None:
            client.kill()
        await server.stop(0)
    assert client.returncode == 0
    result: dict[str, int] = json.loads(out)
    return result


def test_a_burst_of_streams_past_grpcs_pending_call_limit_is_all_served() -> None:
    outcomes = asyncio.run(_burst(grpc_options(Limits())))
    assert outcomes == {"ok": STREAMS}


def test_the_pending_call_limit_follows_max_streams() -> None:
    options = dict(grpc_options(Limits(max_streams=20_000)))
    assert options["grpc.server.max_pending_requests_hard_limit"] == 20_000
    assert options["grpc.server.max_pending_requests"] == 20_000
