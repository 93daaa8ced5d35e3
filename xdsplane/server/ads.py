"""grpc.aio wiring of the AggregatedDiscoveryService: one task per stream.

Each stream reads requests in a task of its own and handles requests and snapshot changes
one at a time; responses are written as pre-assembled bytes (the serializer is the identity).
A snapshot change only marks a stream as having work (the cache never waits on a stream),
so a slow or stuck Envoy delays nobody else. Requests in flight per stream are bounded.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2

from xdsplane import logs
from xdsplane.cache import SnapshotCache
from xdsplane.server.delta import DeltaStream
from xdsplane.server.registry import Registry
from xdsplane.server.sotw import SotwStream
from xdsplane.server.state import Outgoing
from xdsplane.types import ResourceType

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
MAX_INFLIGHT_REQUESTS = 16

_END = object()
_SNAPSHOT = object()


def _identity(data: bytes) -> bytes:
    return data


class AdsService:
    """Serves StreamAggregatedResources and DeltaAggregatedResources from a SnapshotCache."""

    def __init__(self, cache: SnapshotCache, registry: Registry) -> None:
        self.cache = cache
        self.registry = registry
        self.log = logs.get("xdsplane.ads")

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_sotw,
                    request_deserializer=discovery_pb2.DiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_delta,
                    request_deserializer=discovery_pb2.DeltaDiscoveryRequest.FromString,
                    response_serializer=_identity,
                ),
            },
        )

    async def stream_sotw(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve("sotw", SotwStream(), requests, context)

    async def stream_delta(self, requests: AsyncIterator[Any], context: Any) -> None:
        await self._serve("delta", DeltaStream(), requests, context)

    async def _serve(
        self,
        variant: str,
        machine: SotwStream | DeltaStream,
        requests: AsyncIterator[Any],
        context: Any,
    ) -> None:
        inbox: asyncio.Queue[Any] = asyncio.Queue()
        credits = asyncio.Semaphore(MAX_INFLIGHT_REQUESTS)
        marked = False

        def notify() -> None:
            nonlocal marked
            if not marked:
                marked = True
                inbox.put_nowait(_SNAPSHOT)

        async def read() -> None:
            try:
                async for req in requests:
                    await credits.acquire()
                    inbox.put_nowait(req)
            except asyncio.CancelledError:
                raise
            except Exception:  # the client went away or sent garbage: end the stream
                pass
            finally:
                inbox.put_nowait(_END)

        info = self.registry.open(variant, str(context.peer()))
        log = self.log.bind(stream=info.id, variant=variant, peer=info.peer)
        reader = asyncio.create_task(read())
        watch = None
        out: list[Outgoing] = []
        o: Outgoing | None = None
        try:
            while True:
                item = await inbox.get()
                if item is _END:
                    break
                if item is _SNAPSHOT:
                    marked = False
                    snap = self.cache.lookup(info.node_id, info.cluster)
                    out = machine.on_snapshot(snap) if snap is not None else []
                else:
                    credits.release()
                    if watch is None:
                        node = item.node
                        if not node.id:
                            log.warning("stream refused", reason="first request has no node id")
                            await context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                "the first request on a stream must carry node.id",
                            )
                            return
                        info.node_id, info.cluster = str(node.id), str(node.cluster)
                        group = self.cache.group_for(info.node_id, info.cluster)
                        info.group = group.name if group is not None else ""
                        log = log.bind(node=info.node_id)
                        machine.memory = self.registry.memory(info.node_id)
                        log.info("stream opened", cluster=info.cluster, group=info.group)
                        watch = self.cache.watch(info.node_id, info.cluster, notify)
                        if group is not None:
                            machine.on_snapshot(group.snapshot)
                    self._log_request(log, variant, item)
                    out = machine.on_request(item)
                    info.statuses = {t: s.status for t, s in machine.types.items()}
                for o in out:
                    await context.write(o.data)
                    self._log_push(log, o)
                if out:
                    info.statuses = {t: s.status for t, s in machine.types.items()}
                # Do not keep the last response alive while waiting: at 2,000 clusters a
                # full CDS is most of a megabyte, for every idle stream.
                out = []
                o = None
        finally:
            reader.cancel()
            if watch is not None:
                self.cache.cancel(watch)
            self.registry.close(info)
            log.info("stream closed")

    @staticmethod
    def _log_request(log: Any, variant: str, req: Any) -> None:
        rtype = ResourceType.from_url(req.type_url)
        kind = rtype.short if rtype is not None else req.type_url
        if req.HasField("error_detail"):
            log.warning("nack", type=kind, nonce=req.response_nonce, error=req.error_detail.message)
        elif req.response_nonce:
            version = req.version_info if variant == "sotw" else ""
            log.info("ack", type=kind, nonce=req.response_nonce, version=version)
        else:
            log.info("subscribe", type=kind)

    @staticmethod
    def _log_push(log: Any, o: Outgoing) -> None:
        log.info(
            "push",
            type=o.type.short,
            version=o.version,
            nonce=o.nonce,
            resources=o.resources,
            removed=o.removed,
        )
