"""A scripted ADS client over a real gRPC channel (grpc.aio), SotW or delta.

Requests are written as they come; responses are read by a task of their own (cancelling a
pending ``read()`` would cancel the whole RPC), so waiting for one can time out harmlessly.
The end of the call (an ``AioRpcError``, or ``None`` for a clean end) is put in the inbox
too: ``read`` raises it, ``ended`` waits for it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

ADS_SERVICE = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
METHODS = {
    "sotw": (
        "StreamAggregatedResources",
        discovery_pb2.DiscoveryRequest,
        discovery_pb2.DiscoveryResponse,
    ),
    "delta": (
        "DeltaAggregatedResources",
        discovery_pb2.DeltaDiscoveryRequest,
        discovery_pb2.DeltaDiscoveryResponse,
    ),
}


def _identity(data: bytes) -> bytes:
    return data


class Stream:
    """One ADS stream; ``variant`` "sotw" or "delta"."""

    def __init__(self, call: Any, variant: str = "sotw") -> None:
        self.call = call
        self.variant = variant
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    @classmethod
    def open(
        cls, channel: grpc.aio.Channel, variant: str, timeout: float = 30, raw: bool = False
    ) -> Stream:
        """``raw``: requests are written as the bytes given (garbage on the wire)."""
        name, request, response = METHODS[variant]
        method = channel.stream_stream(
            ADS_SERVICE + name,
            request_serializer=_identity if raw else request.SerializeToString,
            response_deserializer=response.FromString,
        )
        return cls(method(timeout=timeout), variant)

    async def _read(self) -> None:
        try:
            while True:
                item = await self.call.read()
                if item is grpc.aio.EOF:
                    break
                self.inbox.put_nowait(item)
        except grpc.aio.AioRpcError as e:
            self.inbox.put_nowait(e)
            return
        self.inbox.put_nowait(None)

    async def write(self, req: Any) -> None:
        await self.call.write(req)

    async def read(self, timeout: float) -> Any:
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(item, Exception):
            raise item
        assert item is not None, "the call ended"
        return item

    async def within(self, seconds: float) -> list[Any]:
        """Every response that arrives within ``seconds`` (a negative check: the window)."""
        out = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                out.append(await self.read(left))
            except TimeoutError:
                break
        return out

    async def ended(self, timeout: float) -> grpc.aio.AioRpcError | None:
        """Wait for the end of the call, skipping responses: its error, or None."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            item = await asyncio.wait_for(self.inbox.get(), max(0.0, deadline - loop.time()))
            if item is None or isinstance(item, grpc.aio.AioRpcError):
                return item

    def cancel(self) -> None:
        self.call.cancel()
        self.reader.cancel()
