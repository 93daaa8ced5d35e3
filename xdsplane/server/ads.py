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

from xdsplane import logs, xds_identity
from xdsplane.cache import SnapshotCache
from xdsplane.metrics import Metrics
from xdsplane.server.delta import DeltaStream
from xdsplane.server.limits import FIRST_REQUEST_TIMEOUT, MAX_NODE_FIELD, Limits, names_held
from xdsplane.server.registry import Registry
from xdsplane.server.sotw import SotwStream
from xdsplane.server.state import Outgoing
from xdsplane.types import ResourceType

SERVICE = "envoy.service.discovery.v3.AggregatedDiscoveryService"
MAX_INFLIGHT_REQUESTS = 16

_END = object()
_SNAPSHOT = object()
_REPLACED = object()  # a newer stream of the node took this one's place


def _identity(data: bytes) -> bytes:
    return data


def _answers(machine: SotwStream | DeltaStream, rtype: ResourceType | None) -> tuple[int, int]:
    """(ACKs, NACKs) the machine has counted for ``rtype`` on this stream."""
    st = machine.types.get(rtype) if rtype is not None else None
    return (st.status.acks, st.status.nacks) if st is not None else (0, 0)


class AdsService:
    """Serves StreamAggregatedResources and DeltaAggregatedResources from a SnapshotCache."""

    def __init__(
        self,
        cache: SnapshotCache,
        registry: Registry,
        require_identity: bool = False,
        metrics: Metrics | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.metrics = metrics if metrics is not None else Metrics()
        self.limits = limits if limits is not None else Limits()
        # Over mTLS: the node id of a stream's first request must be one its client
        # certificate speaks for (xds_identity); otherwise the stream is refused.
        self.require_identity = require_identity
        self.total_names = 0  # resource names held by all streams (--max-total-names)
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
        bucket = self.limits.bucket()
        marked = False

        def notify() -> None:
            nonlocal marked
            if not marked:
                marked = True
                inbox.put_nowait(_SNAPSHOT)

        async def read() -> None:
            try:
                async for req in requests:
                    info.requests += 1
                    if bucket is not None:
                        # Over the rate: read nothing more until a token is there (HTTP/2
                        # flow control holds the client back); nothing is dropped.
                        wait = bucket.take()
                        info.peak_burst = bucket.peak
                        if wait > 0:
                            info.throttled += 1
                            self.metrics.throttled()
                            await asyncio.sleep(wait)
                    await credits.acquire()
                    inbox.put_nowait(req)
            except asyncio.CancelledError:
                raise
            except Exception:  # the client went away or sent garbage: end the stream
                pass
            finally:
                inbox.put_nowait(_END)

        info = self.registry.open(variant, str(context.peer()))
        info.end = lambda: inbox.put_nowait(_REPLACED)
        log = self.log.bind(stream=info.id, variant=variant, peer=info.peer)
        reader = asyncio.create_task(read())
        watch = None
        # What groups select this stream by besides its node id, fixed when it is admitted:
        # over mTLS the cluster only when the client certificate proves it (None: the id).
        selector: str | None = None
        names = 0  # resource names this stream holds, charged to --max-total-names
        charged: dict[ResourceType, int] = {}  # by type: names charged
        initial: dict[ResourceType, int] = {}  # by type: initial_resource_versions (delta)
        out: list[Outgoing] = []
        o: Outgoing | None = None
        counted = False  # in the connected-streams gauge (once the node id is known)
        # Per type, the latest response caused by a snapshot change: its nonce and when that
        # snapshot was installed; its ACK observes the propagation latency.
        pending: dict[ResourceType, tuple[str, float]] = {}
        loop = asyncio.get_running_loop()
        first_deadline = loop.time() + self.limits.first_request_timeout
        try:
            while True:
                if watch is None:
                    try:
                        item = await asyncio.wait_for(
                            inbox.get(), max(0.0, first_deadline - loop.time())
                        )
                    except TimeoutError:
                        log.warning("stream refused", reason=FIRST_REQUEST_TIMEOUT)
                        self._refuse(FIRST_REQUEST_TIMEOUT)
                        await context.abort(
                            grpc.StatusCode.DEADLINE_EXCEEDED,
                            "no first request within "
                            f"{self.limits.first_request_timeout:g} s (--first-request-timeout)",
                        )
                        return
                else:
                    item = await inbox.get()
                if item is _END:
                    break
                if item is _REPLACED:
                    await context.abort(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"replaced by a newer stream of node {info.node_id!r}: a node has at "
                        f"most {self.limits.max_streams_per_node} ADS streams at once "
                        "(--max-streams-per-node)",
                    )
                    return
                if item is _SNAPSHOT:
                    marked = False
                    installed_at = self.metrics.installed_at
                    snap = self.cache.lookup(info.node_id, selector)
                    out = machine.on_snapshot(snap) if snap is not None else []
                    pending.update((x.type, (x.nonce, installed_at)) for x in out)
                else:
                    credits.release()
                    if watch is None:
                        node = item.node
                        if not node.id:
                            log.warning("stream refused", reason="first request has no node id")
                            self._refuse(xds_identity.NO_NODE_ID)
                            await context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                "the first request on a stream must carry node.id",
                            )
                            return
                        if max(len(node.id), len(node.cluster)) > MAX_NODE_FIELD:
                            log.warning("stream refused", reason="node_too_long")
                            self._refuse("node_too_long")
                            await context.abort(
                                grpc.StatusCode.INVALID_ARGUMENT,
                                f"node.id and node.cluster may have at most {MAX_NODE_FIELD} "
                                "characters",
                            )
                            return
                        node_id, cluster = str(node.id), str(node.cluster)
                        selector = cluster
                        if self.require_identity:
                            selector = await self._check_identity(log, node_id, cluster, context)
                        per_node = self.limits.max_streams_per_node
                        if (
                            self.require_identity
                            and self.registry.admitted_by_node.get(node_id, 0) >= per_node
                        ):
                            # Over mTLS only, where the node id is the certificate's: the
                            # node's oldest stream makes room (a stream left half-open by a
                            # network break, or one more of a client that opens too many).
                            # On plaintext anyone could end a real node's streams by its id.
                            self._replace_oldest(log, node_id)
                        if self.registry.admitted >= self.limits.max_streams:
                            # Checked and counted below with no await between: no race past
                            # the limit. Only admitted streams count: idle ones lock no one out.
                            log.warning("stream refused", reason="max_streams", node=node_id)
                            self._refuse("max_streams")
                            await context.abort(
                                grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"this server serves at most {self.limits.max_streams} ADS "
                                "streams at once (--max-streams); retry later or use another "
                                "replica",
                            )
                            return
                        self.registry.admit(info, node_id)
                        info.node_id, info.cluster = node_id, cluster
                        group = self.cache.group_for(info.node_id, selector)
                        info.group = group.name if group is not None else ""
                        log = log.bind(node=info.node_id)
                        machine.memory = self.registry.memory(info.node_id)
                        log.info("stream opened", cluster=info.cluster, group=info.group)
                        self.metrics.stream_opened(info.node_id, variant)
                        counted = True
                        watch = self.cache.watch(info.node_id, selector, notify)
                        if group is not None:
                            machine.on_snapshot(group.snapshot)
                    rtype = ResourceType.from_url(item.type_url)
                    too_many = self._names_problem(variant, machine, rtype, item)
                    if too_many is not None:
                        log.warning("stream refused", reason="max_names", detail=too_many)
                        self._refuse("max_names")
                        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, too_many)
                        return
                    if rtype is not None:
                        if rtype not in initial:  # its first request on this stream
                            initial[rtype] = (
                                len(item.initial_resource_versions) if variant == "delta" else 0
                            )
                        held = self._names_held(variant, machine, rtype, item) + initial[rtype]
                        grown = held - charged.get(rtype, 0)
                        if grown > 0 and self.total_names + grown > self.limits.max_total_names:
                            why = (
                                f"the server holds {self.total_names} resource names for all "
                                f"streams and this request would add {grown}; the limit is "
                                f"{self.limits.max_total_names} (--max-total-names)"
                            )
                            log.warning("stream refused", reason="max_total_names", detail=why)
                            self._refuse("max_total_names")
                            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)
                            return
                        self.total_names += grown
                        names += grown
                        info.names = names
                        charged[rtype] = held
                    self._log_request(log, variant, item)
                    before = _answers(machine, rtype)
                    out = machine.on_request(item)
                    self._count_answer(machine, rtype, before, item, pending)
                    info.statuses = {t: s.status for t, s in machine.types.items()}
                for o in out:
                    await context.write(o.data)
                    self.metrics.response_sent(o.type)
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
            self.registry.release(info)
            self.total_names -= names
            if counted:
                self.metrics.stream_closed(info.node_id, variant)
            log.info("stream closed")

    def _replace_oldest(self, log: Any, node_id: str) -> None:
        """End the oldest stream of ``node_id`` (--max-streams-per-node), counted and logged;
        it counts no more from now on."""
        old = self.registry.oldest(node_id)
        if old is None:
            return
        log.warning("stream replaced", reason="max_streams_per_node", node=node_id, replaced=old.id)
        self._refuse("max_streams_per_node")
        self.registry.release(old)
        if old.end is not None:
            old.end()

    def _refuse(self, reason: str) -> None:
        """Count a stream refused (or ended) for ``reason``: /status and /metrics."""
        self.registry.refuse(reason)
        self.metrics.stream_refused(reason)

    def _names_problem(
        self,
        variant: str,
        machine: SotwStream | DeltaStream,
        rtype: ResourceType | None,
        req: Any,
    ) -> str | None:
        st = machine.types.get(rtype) if rtype is not None else None
        subscribed = st.names if isinstance(machine, DeltaStream) and st is not None else ()
        return self.limits.names_problem(variant, req, subscribed)

    @staticmethod
    def _names_held(
        variant: str, machine: SotwStream | DeltaStream, rtype: ResourceType | None, req: Any
    ) -> int:
        """Resource names the stream names for ``req``'s type once it is handled (its
        ``initial_resource_versions`` are charged by the caller)."""
        st = machine.types.get(rtype) if rtype is not None else None
        subscribed = st.names if isinstance(machine, DeltaStream) and st is not None else ()
        return names_held(variant, req, subscribed)

    def _count_answer(
        self,
        machine: SotwStream | DeltaStream,
        rtype: ResourceType | None,
        before: tuple[int, int],
        req: Any,
        pending: dict[ResourceType, tuple[str, float]],
    ) -> None:
        """Count an ACK or NACK as the machine judged it (stale nonces are neither); the
        ACK of a response caused by a snapshot change observes the propagation latency."""
        if rtype is None:
            return
        acks, nacks = _answers(machine, rtype)
        if acks > before[0]:
            self.metrics.ack(rtype)
            sent = pending.pop(rtype, None)
            if sent is not None and sent[0] == req.response_nonce:
                self.metrics.propagated(rtype, sent[1])
        elif nacks > before[1]:
            self.metrics.nack(rtype)
            pending.pop(rtype, None)

    async def _check_identity(
        self, log: Any, node_id: str, cluster: str, context: Any
    ) -> str | None:
        """What groups may select the stream by besides ``node_id``: ``cluster`` when the
        client certificate proves it, else None. Aborts (PERMISSION_DENIED) unless the
        certificate speaks for ``node_id``, and when an unproven ``cluster`` would select
        another group than ``node_id`` alone (xds_identity)."""
        identity = xds_identity.peer_identity(context.auth_context())
        refused = xds_identity.refusal(identity, node_id)
        if refused is None and identity is not None:
            selector = xds_identity.selection_cluster(identity, cluster)
            if selector is not None or not cluster:
                return selector
            by_id = self.cache.group_for(node_id, None)
            by_cluster = self.cache.group_for(node_id, cluster)
            same = (by_id.name if by_id else None) == (by_cluster.name if by_cluster else None)
            if same:
                return None  # the cluster changes nothing: ignored, now and after reloads
            refused = (xds_identity.CLUSTER_NOT_PROVEN, xds_identity.cluster_refusal(cluster))
            log.warning(
                "stream refused",
                reason=refused[0],
                node=node_id,
                cluster=cluster,
                group_by_node_id=by_id.name if by_id is not None else None,
                group_by_cluster=by_cluster.name if by_cluster is not None else None,
                sans=identity.sans(),
            )
            self._refuse(refused[0])
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, refused[1])
            return None
        assert refused is not None
        reason, message = refused
        log.warning(
            "stream refused",
            reason=reason,
            node=node_id,
            sans=identity.sans() if identity is not None else [],
            subject=identity.subject if identity is not None else None,
        )
        self._refuse(reason)
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, message)
        return None

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
