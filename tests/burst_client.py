"""Client of tests/test_ads_burst.py: opens N streams at once, then says so, then reports.

    python burst_client.py PORT N

Opens N bidirectional streams of ``/burst.Echo/Stream`` to 127.0.0.1:PORT over channels
of 100 streams (each its own connection, as 100 is the server's limit per connection) and
writes one message on each. Once every write has completed or failed it prints ``sent``
(the server, whose event loop is held meanwhile, then lets go); then it reads one answer
per stream and prints a JSON object {outcome: count}: ``ok`` or the status code's name.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

import grpc

METHOD = "/burst.Echo/Stream"
PER_CHANNEL = 100


def _identity(b: bytes) -> bytes:
    return b


async def main(port: int, n: int) -> None:
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        for _ in range(-(-n // PER_CHANNEL))
    ]
    calls = [
        channels[i // PER_CHANNEL].stream_stream(
            METHOD, request_serializer=_identity, response_deserializer=_identity
        )()
        for i in range(n)
    ]

    async def write(call: grpc.aio.StreamStreamCall) -> str | None:
        try:
            await call.write(b"hello")
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return None

    failed = await asyncio.gather(*(write(c) for c in calls))
    print("sent", flush=True)

    async def answer(call: grpc.aio.StreamStreamCall, failure: str | None) -> str:
        if failure is not None:
            return failure
        try:
            got = await call.read()
        except grpc.aio.AioRpcError as e:
            return e.code().name
        return "ok" if got == b"hello" else f"unexpected {got!r}"

    outcomes = await asyncio.gather(*(answer(c, f) for c, f in zip(calls, failed, strict=True)))
    for c in calls:
        c.cancel()
    for ch in channels:
        await ch.close()
    print(json.dumps(Counter(outcomes)), flush=True)


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
