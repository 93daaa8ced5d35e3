"""Who hears what an ADS stream does: metrics, the registry (/status) and the log.

ads.py reports each event of a stream once, to one ``StreamObserver``; ``observers()``
composes the three that a server has (``MetricsObserver``, ``RegistryObserver``,
``LogObserver``). The events:

- ``on_open``: the stream's first request was admitted (its node id and group are known);
- ``on_request``: a request is handed to the state machine (logged as the client sent it:
  a stale ACK is logged as "ack" but counted as no ACK, since only the machine's ``on_ack``
  and ``on_nack`` count);
- ``on_throttle``: a request was read late (the stream was over its request rate);
- ``on_push``: a response was written;
- ``on_ack`` / ``on_nack``: the client accepted or rejected the latest response of a type,
  as the state machine judged it (state.Ack, state.Nack);
- ``on_refuse``: the server refused or ended a stream (``Refused``): counted by reason. A
  stream that replaces an older one of its node (--max-streams-per-node) reports it as a
  refusal whose event is "stream replaced";
- ``on_close``: the stream ended, however it ended (every stream that was opened in the
  registry, admitted or not).
"""

from __future__ import annotations

from typing import Any, Protocol

import grpc

from xdsplane import logs
from xdsplane.metrics import Metrics
from xdsplane.server.registry import Registry, StreamInfo
from xdsplane.server.state import Ack, Nack, Outgoing
from xdsplane.types import ResourceType


class Refused(Exception):
    """The server refuses or ends a stream: counted under ``reason`` (/status "refused",
    ``xdsplane_streams_refused_total``), logged as ``event`` with ``fields``, and the
    stream aborted with ``code`` and ``message``. ``logged_reason``: the reason the log
    names, when it says more than the counter's label."""

    def __init__(
        self,
        reason: str,
        code: grpc.StatusCode,
        message: str,
        *,
        event: str = "stream refused",
        logged_reason: str | None = None,
        **fields: object,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        self.message = message
        self.event = event
        self.logged_reason = logged_reason if logged_reason is not None else reason
        self.fields = fields


class StreamObserver(Protocol):
    """What hears a stream's events (see the module's docstring)."""

    def on_open(self, stream: StreamInfo) -> None: ...
    def on_request(self, stream: StreamInfo, req: Any) -> None: ...
    def on_throttle(self, stream: StreamInfo) -> None: ...
    def on_push(self, stream: StreamInfo, push: Outgoing) -> None: ...
    def on_ack(self, stream: StreamInfo, ack: Ack) -> None: ...
    def on_nack(self, stream: StreamInfo, nack: Nack) -> None: ...
    def on_refuse(self, stream: StreamInfo, refused: Refused) -> None: ...
    def on_close(self, stream: StreamInfo) -> None: ...


class Observer:
    """A StreamObserver that does nothing: subclasses override what they hear."""

    def on_open(self, stream: StreamInfo) -> None:
        pass

    def on_request(self, stream: StreamInfo, req: Any) -> None:
        pass

    def on_throttle(self, stream: StreamInfo) -> None:
        pass

    def on_push(self, stream: StreamInfo, push: Outgoing) -> None:
        pass

    def on_ack(self, stream: StreamInfo, ack: Ack) -> None:
        pass

    def on_nack(self, stream: StreamInfo, nack: Nack) -> None:
        pass

    def on_refuse(self, stream: StreamInfo, refused: Refused) -> None:
        pass

    def on_close(self, stream: StreamInfo) -> None:
        pass


class MetricsObserver(Observer):
    """Prometheus: connected streams, responses, ACKs, NACKs, propagation, refusals."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._open: set[int] = set()  # streams counted in the connected-streams gauge

    def on_open(self, stream: StreamInfo) -> None:
        self._open.add(stream.id)
        self.metrics.stream_opened(stream.node_id, stream.variant)

    def on_throttle(self, stream: StreamInfo) -> None:
        self.metrics.throttled()

    def on_push(self, stream: StreamInfo, push: Outgoing) -> None:
        self.metrics.response_sent(push.type)

    def on_ack(self, stream: StreamInfo, ack: Ack) -> None:
        self.metrics.ack(ack.type)
        if ack.installed_at is not None:
            self.metrics.propagated(ack.type, ack.installed_at)

    def on_nack(self, stream: StreamInfo, nack: Nack) -> None:
        self.metrics.nack(nack.type)

    def on_refuse(self, stream: StreamInfo, refused: Refused) -> None:
        self.metrics.stream_refused(refused.reason)

    def on_close(self, stream: StreamInfo) -> None:
        if stream.id in self._open:
            self._open.discard(stream.id)
            self.metrics.stream_closed(stream.node_id, stream.variant)


class RegistryObserver(Observer):
    """/status: refusals by reason, throttled requests, and streams that are gone. (What a
    stream holds per type is read live from its subscriptions: StreamInfo.types.)"""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def on_throttle(self, stream: StreamInfo) -> None:
        stream.throttled += 1

    def on_refuse(self, stream: StreamInfo, refused: Refused) -> None:
        self.registry.refuse(refused.reason)

    def on_close(self, stream: StreamInfo) -> None:
        self.registry.close(stream)
        self.registry.release(stream)


class LogObserver(Observer):
    """The "xdsplane.ads" log: one line per stream event, bound to the stream's id, variant
    and peer, and to its node once it is admitted."""

    def __init__(self, name: str = "xdsplane.ads") -> None:
        self.log = logs.get(name)
        self._bound: dict[int, Any] = {}

    def _for(self, stream: StreamInfo) -> Any:
        log = self._bound.get(stream.id)
        if log is None:
            log = self.log.bind(stream=stream.id, variant=stream.variant, peer=stream.peer)
            self._bound[stream.id] = log
        return log

    def on_open(self, stream: StreamInfo) -> None:
        log = self._for(stream).bind(node=stream.node_id)
        self._bound[stream.id] = log
        log.info("stream opened", cluster=stream.cluster, group=stream.group)

    def on_request(self, stream: StreamInfo, req: Any) -> None:
        log = self._for(stream)
        rtype = ResourceType.from_url(req.type_url)
        kind = rtype.short if rtype is not None else req.type_url
        if req.HasField("error_detail"):
            log.warning("nack", type=kind, nonce=req.response_nonce, error=req.error_detail.message)
        elif req.response_nonce:
            version = req.version_info if stream.variant == "sotw" else ""
            log.info("ack", type=kind, nonce=req.response_nonce, version=version)
        else:
            log.info("subscribe", type=kind)

    def on_push(self, stream: StreamInfo, push: Outgoing) -> None:
        self._for(stream).info(
            "push",
            type=push.type.short,
            version=push.version,
            nonce=push.nonce,
            resources=push.resources,
            removed=push.removed,
        )

    def on_refuse(self, stream: StreamInfo, refused: Refused) -> None:
        self._for(stream).warning(refused.event, reason=refused.logged_reason, **refused.fields)

    def on_close(self, stream: StreamInfo) -> None:
        self._for(stream).info("stream closed")
        self._bound.pop(stream.id, None)


class Observers(Observer):
    """Several observers heard as one, in order."""

    def __init__(self, *observers: StreamObserver) -> None:
        self.observers = observers

    def on_open(self, stream: StreamInfo) -> None:
        for o in self.observers:
            o.on_open(stream)

    def on_request(self, stream: StreamInfo, req: Any) -> None:
        for o in self.observers:
            o.on_request(stream, req)

    def on_throttle(self, stream: StreamInfo) -> None:
        for o in self.observers:
            o.on_throttle(stream)

    def on_push(self, stream: StreamInfo, push: Outgoing) -> None:
        for o in self.observers:
            o.on_push(stream, push)

    def on_ack(self, stream: StreamInfo, ack: Ack) -> None:
        for o in self.observers:
            o.on_ack(stream, ack)

    def on_nack(self, stream: StreamInfo, nack: Nack) -> None:
        for o in self.observers:
            o.on_nack(stream, nack)

    def on_refuse(self, stream: StreamInfo, refused: Refused) -> None:
        for o in self.observers:
            o.on_refuse(stream, refused)

    def on_close(self, stream: StreamInfo) -> None:
        for o in self.observers:
            o.on_close(stream)


def observers(metrics: Metrics, registry: Registry) -> Observers:
    """What a server's streams report to: the log, /status and /metrics."""
    return Observers(LogObserver(), RegistryObserver(registry), MetricsObserver(metrics))
