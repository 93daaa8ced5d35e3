"""grpc.aio wiring of the AggregatedDiscoveryService: one task per stream.

Each stream reads requests in a task of its own and handles requests and snapshot changes
one at a time; responses are written as bytes joined from the snapshot's pre-encoded pieces
(the serializer is the identity), each once its turn in the server-wide WriteGate comes
(gate.py), so that streams syncing at once do not multiply the snapshot in buffers.
A snapshot change only marks a stream as having work (the cache never waits on a stream),
so a slow or stuck Envoy delays nobody else. Requests in flight per stream are bounded,
and wait as the bytes gRPC received (the deserializer is the identity too): a request is
decoded when the stream takes it, and let go before its responses wait for the gate.

A stream's loop: admit its first request (limits.py, xds_identity.py), read, feed the state
machine (sotw.py, delta.py), write what it returns, and tell the observer what happened
(observe.py: metrics, /status and the log). What the client answered (ACK or NACK) is the
machine's judgement, returned with its responses (state.Step).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf.message import DecodeError

from xdsplane import xds_identity
from xdsplane.cache import SnapshotCache, Watch
from xdsplane.metrics import Metrics
from xdsplane.server.delta import DeltaStream
from xdsplane.server.gate import WriteGate
from xdsplane.server.limits import FIRST_REQUEST_TIMEOUT, MAX_NODE_FIELD, Limits, names_held
from xdsplane.server.observe import Refused, StreamObserver, observers
from xdsplane.server.registry import Registry, client_features, client_kind, user_agent
from xdsplane.server.sotw import SotwStream
from xdsplane.server.state import Ack, Nack, Step
from xdsplane.types import ResourceType

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
MAX_INFLIGHT_REQUESTS = 16

_END = object()
_SNAPSHOT = object()
_REPLACED = object()  # a newer stream of the node took this one's place


def _identity(data: bytes) -> bytes:
    return data


# What each stream variant's requests are; gRPC hands them over as bytes (_Stream.handle).
_REQUEST_TYPES = {
    "sotw": discovery_pb2.DiscoveryRequest,
    "delta": discovery_pb2.DeltaDiscoveryRequest,
}


class AdsService:
    """Serves StreamAggregatedResources and DeltaAggregatedResources from a SnapshotCache.

    ``observer``: what hears every stream's events; by default the log, ``registry``
    (/status) and ``metrics`` (observe.observers)."""

    def __init__(
        self,
        cache: SnapshotCache,
        registry: Registry,
        require_identity: bool = False,
        metrics: Metrics | None = None,
        limits: Limits | None = None,
        observer: StreamObserver | None = None,
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.metrics = metrics if metrics is not None else Metrics()
        self.limits = limits if limits is not None else Limits()
        # Over mTLS: the node id of a stream's first request must be one its client
        # certificate speaks for (xds_identity); otherwise the stream is refused.
        self.require_identity = require_identity
        self.observer = observer if observer is not None else observers(self.metrics, registry)
        self.total_names = 0  # resource names held by all streams (--max-total-names)
        # Responses being encoded and written at once, over all streams (gate.py).
        self.gate = WriteGate(self.limits.write_budget, self.limits.write_stall)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "StreamAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_sotw,
                    request_deserializer=_identity,  # decoded when handled (_Stream.handle)
                    response_serializer=_identity,
                ),
                "DeltaAggregatedResources": grpc.stream_stream_rpc_method_handler(
                    self.stream_delta,
                    request_deserializer=_identity,
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
        stream = _Stream(self, variant, machine, context)
        reader = asyncio.create_task(stream.read())
        try:
            while True:
                item = await stream.next()
                if item is _END:
                    break
                step = await stream.handle(item)
                # The request is not kept alive while its responses wait for their turn in
                # the write gate, nor while the next one is awaited: an Envoy's SotW EDS
                # request repeats thousands of names (a 2,000-name request: 20 KB of bytes,
                # ~110 KB decoded; 1,000 Envoys syncing together held most of 100 MB).
                del item
                await stream.write(step)
                # Nor the responses: at 2,000 clusters a full CDS is most of a megabyte.
                del step
        except Refused as refused:
            self.observer.on_refuse(stream.info, refused)
            await context.abort(refused.code, refused.message)
        finally:
            reader.cancel()
            stream.close()


class _Inbox:
    """A stream's queue of requests and events: what ``asyncio.Queue`` does here, without
    its four deques and event (~3 KB per stream, 3 MB at 1,000 streams). One reader."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []  # a few at most (MAX_INFLIGHT_REQUESTS + 2)
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.pop(0)


class _Stream:
    """One ADS stream being served: its machine, its inbox (requests, snapshot changes),
    what it was admitted with, and the resource names it is charged for."""

    def __init__(
        self, service: AdsService, variant: str, machine: SotwStream | DeltaStream, context: Any
    ) -> None:
        self.service = service
        self.variant = variant
        self.machine = machine
        self.context = context
        self.observer = service.observer
        self.inbox = _Inbox()
        self.credits = asyncio.Semaphore(MAX_INFLIGHT_REQUESTS)
        self.marked = False  # a snapshot change is in the inbox already
        self.info = service.registry.open(variant, str(context.peer()))
        self.info.end = lambda: self.inbox.put_nowait(_REPLACED)
        self.watch: Watch | None = None  # set once the first request is admitted
        # What groups select this stream by besides its node id, fixed when it is admitted:
        # over mTLS the cluster only when the client certificate proves it (None: the id).
        self.selector: str | None = None
        self.charged: dict[ResourceType, int] = {}  # by type: names charged
        self.initial: dict[ResourceType, int] = {}  # by type: initial_resource_versions (delta)
        loop = asyncio.get_running_loop()
        self.first_deadline = loop.time() + service.limits.first_request_timeout

    # -- the inbox ----------------------------------------------------------------------------

    def notify(self) -> None:
        """The stream's snapshot changed (called by the cache; never waits)."""
        if not self.marked:
            self.marked = True
            self.inbox.put_nowait(_SNAPSHOT)

    async def read(self) -> None:
        """Read requests into the inbox. Through ``context.read()``, not the request
        iterator: grpc.aio's iterator is a generator that keeps the request it yielded
        alive until the next one arrives, and an Envoy's SotW EDS request repeats thousands
        of names (measured: ~30 KB held per idle stream)."""
        info = self.info
        bucket = self.service.limits.bucket()
        context = self.context
        try:
            while (req := await context.read()) is not grpc.aio.EOF:
                info.requests += 1
                if bucket is not None:
                    # Over the rate: read nothing more until a token is there (HTTP/2 flow
                    # control holds the client back); nothing is dropped.
                    wait = bucket.take()
                    info.peak_burst = bucket.peak
                    if wait > 0:
                        self.observer.on_throttle(info)
                        await asyncio.sleep(wait)
                await self.credits.acquire()
                self.inbox.put_nowait(req)
                del req  # not kept alive while the next request is awaited
        except asyncio.CancelledError:
            raise
        except Exception:  # the client went away or sent garbage: end the stream
            pass
        finally:
            self.inbox.put_nowait(_END)

    async def next(self) -> Any:
        """The next request or event; before the first request, within its deadline."""
        if self.watch is not None:
            return await self.inbox.get()
        limit = self.service.limits.first_request_timeout
        left = max(0.0, self.first_deadline - asyncio.get_running_loop().time())
        try:
            return await asyncio.wait_for(self.inbox.get(), left)
        except TimeoutError:
            raise Refused(
                FIRST_REQUEST_TIMEOUT,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no first request within {limit:g} s (--first-request-timeout)",
            ) from None

    # -- one item -----------------------------------------------------------------------------

    async def handle(self, item: Any) -> Step:
        """What a request or an event causes: the responses to write (``write``). Nothing
        returned refers to the request."""
        if item is _REPLACED:
            limit = self.service.limits.max_streams_per_node
            await self.context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"replaced by a newer stream of node {self.info.node_id!r}: a node has at "
                f"most {limit} ADS streams at once (--max-streams-per-node)",
            )
            return Step()
        if item is _SNAPSHOT:
            self.marked = False
            snap = self.service.cache.lookup(self.info.node_id, self.selector)
            return self.machine.on_snapshot(snap) if snap is not None else Step()
        self.credits.release()
        # Requests wait in the inbox as the bytes gRPC received, decoded only now: a decoded
        # 2,000-name EDS request is ~110 KB of upb arena against 20 KB of bytes.
        kind = _REQUEST_TYPES[self.variant]
        try:
            req = kind.FromString(item)
        except DecodeError as e:
            raise Refused(
                "bad_request",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a {kind.DESCRIPTOR.name}: {e}",
            ) from None
        del item
        if self.watch is None:
            self._admit(req)
        self._charge(req)
        self.observer.on_request(self.info, req)
        return self.machine.on_request(req)

    async def write(self, step: Step) -> None:
        if isinstance(step.answer, Ack):
            self.observer.on_ack(self.info, step.answer)
        elif isinstance(step.answer, Nack):
            self.observer.on_nack(self.info, step.answer)
        gate = self.service.gate
        for o in step.responses:
            await gate.write(self.context, o)  # encoded only once its turn comes
            self.observer.on_push(self.info, o)

    # -- admission ----------------------------------------------------------------------------

    def _admit(self, req: Any) -> None:
        """Admit the stream by its first request, or raise Refused. No await from the
        --max-streams check to the count: no race past the limit."""
        service, info = self.service, self.info
        registry, limits = service.registry, service.limits
        node = req.node
        if not node.id:
            raise Refused(
                xds_identity.NO_NODE_ID,
                grpc.StatusCode.INVALID_ARGUMENT,
                "the first request on a stream must carry node.id",
                logged_reason="first request has no node id",
            )
        if max(len(node.id), len(node.cluster)) > MAX_NODE_FIELD:
            raise Refused(
                "node_too_long",
                grpc.StatusCode.INVALID_ARGUMENT,
                f"node.id and node.cluster may have at most {MAX_NODE_FIELD} characters",
            )
        node_id, cluster = str(node.id), str(node.cluster)
        self.selector = cluster
        if service.require_identity:
            self.selector = self._check_identity(node_id, cluster)
            if registry.admitted_by_node.get(node_id, 0) >= limits.max_streams_per_node:
                # Over mTLS only, where the node id is the certificate's: the node's oldest
                # stream makes room (a stream left half-open by a network break, or one more
                # of a client that opens too many). On plaintext anyone could end a real
                # node's streams by its id.
                self._replace_oldest(node_id)
        if registry.admitted >= limits.max_streams:
            # Only admitted streams count: idle ones lock no one out.
            raise Refused(
                "max_streams",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"this server serves at most {limits.max_streams} ADS streams at once "
                "(--max-streams); retry later or use another replica",
                node=node_id,
            )
        registry.admit(info, node_id)
        info.cluster = cluster
        info.client = client_kind(str(node.user_agent_name))
        info.user_agent = user_agent(node)
        info.client_features = client_features(node)
        group = service.cache.group_for(node_id, self.selector)
        info.group = group.name if group is not None else ""
        self.machine.memory = registry.memory(node_id)
        info.types = self.machine.types
        self.observer.on_open(info)
        self.watch = service.cache.watch(node_id, self.selector, self.notify)
        if group is not None:
            self.machine.on_snapshot(group.snapshot)  # no type subscribed yet: sends nothing

    def _replace_oldest(self, node_id: str) -> None:
        """End the oldest stream of ``node_id`` (--max-streams-per-node), counted and logged
        by this one; it counts no more from now on."""
        registry = self.service.registry
        old = registry.oldest(node_id)
        if old is None:
            return
        self.observer.on_refuse(
            self.info,
            Refused(
                "max_streams_per_node",
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"replaced by a newer stream of node {node_id!r}",
                event="stream replaced",
                node=node_id,
                replaced=old.id,
            ),
        )
        registry.release(old)
        if old.end is not None:
            old.end()

    def _check_identity(self, node_id: str, cluster: str) -> str | None:
        """What groups may select the stream by besides ``node_id``: ``cluster`` when the
        client certificate proves it, else None. Refused (PERMISSION_DENIED) unless the
        certificate speaks for ``node_id``, and when an unproven ``cluster`` would select
        another group than ``node_id`` alone (xds_identity)."""
        cache = self.service.cache
        identity = xds_identity.peer_identity(self.context.auth_context())
        refused = xds_identity.refusal(identity, node_id)
        if refused is None and identity is not None:
            selector = xds_identity.selection_cluster(identity, cluster)
            if selector is not None or not cluster:
                return selector
            by_id = cache.group_for(node_id, None)
            by_cluster = cache.group_for(node_id, cluster)
            same = (by_id.name if by_id else None) == (by_cluster.name if by_cluster else None)
            if same:
                return None  # the cluster changes nothing: ignored, now and after reloads
            raise Refused(
                xds_identity.CLUSTER_NOT_PROVEN,
                grpc.StatusCode.PERMISSION_DENIED,
                xds_identity.cluster_refusal(cluster),
                node=node_id,
                cluster=cluster,
                group_by_node_id=by_id.name if by_id is not None else None,
                group_by_cluster=by_cluster.name if by_cluster is not None else None,
                sans=identity.sans(),
            )
        assert refused is not None
        reason, message = refused
        raise Refused(
            reason,
            grpc.StatusCode.PERMISSION_DENIED,
            message,
            node=node_id,
            sans=identity.sans() if identity is not None else [],
            subject=identity.subject if identity is not None else None,
        )

    # -- resource names (--max-names, --max-total-names) -----------------------------------

    def _charge(self, req: Any) -> None:
        """Charge the names ``req`` makes the stream hold, or raise Refused past a limit."""
        service, info = self.service, self.info
        rtype = ResourceType.from_url(req.type_url)
        sub = self.machine.types.get(rtype) if rtype is not None else None
        subscribed = sub.names if self.variant == "delta" and sub is not None else ()
        too_many = service.limits.names_problem(self.variant, req, subscribed)
        if too_many is not None:
            raise Refused(
                "max_names", grpc.StatusCode.RESOURCE_EXHAUSTED, too_many, detail=too_many
            )
        if rtype is None:
            return
        if rtype not in self.initial:  # its first request on this stream
            initial = req.initial_resource_versions if self.variant == "delta" else ()
            self.initial[rtype] = len(initial)
        held = names_held(self.variant, req, subscribed) + self.initial[rtype]
        grown = held - self.charged.get(rtype, 0)
        limit = service.limits.max_total_names
        if grown > 0 and service.total_names + grown > limit:
            why = (
                f"the server holds {service.total_names} resource names for all streams and "
                f"this request would add {grown}; the limit is {limit} (--max-total-names)"
            )
            raise Refused("max_total_names", grpc.StatusCode.RESOURCE_EXHAUSTED, why, detail=why)
        service.total_names += grown
        info.names += grown
        self.charged[rtype] = held

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        if self.watch is not None:
            self.service.cache.cancel(self.watch)
        self.service.total_names -= self.info.names
        self.observer.on_close(self.info)
