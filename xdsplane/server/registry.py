"""Connected streams and what each node made of what it was sent: the source of /status."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from xdsplane.server.state import NodeMemory, Subscription
from xdsplane.types import PUSH_ORDER, ResourceType

MAX_USER_AGENT = 80


def client_kind(user_agent_name: str) -> str:
    """``envoy`` for Envoy, ``grpc`` for gRPC's own xDS client ("gRPC Python", "gRPC C++",
    "grpc-go", ...), else the name itself (shortened)."""
    name = user_agent_name.strip()
    if name.lower() == "envoy":
        return "envoy"
    if "grpc" in name.lower():
        return "grpc"
    return name[:MAX_USER_AGENT]


def user_agent(node: Any) -> str:
    """``NAME VERSION`` from a node (Envoy puts its version in user_agent_build_version)."""
    version = str(node.user_agent_version)
    if not version and node.HasField("user_agent_build_version"):
        v = node.user_agent_build_version.version
        version = f"{v.major_number}.{v.minor_number}.{v.patch}"
    return f"{node.user_agent_name} {version}".strip()[:MAX_USER_AGENT]


MAX_FEATURES = 16


def client_features(node: Any) -> tuple[str, ...]:
    """The first MAX_FEATURES of node.client_features, each at most MAX_USER_AGENT long."""
    return tuple(str(f)[:MAX_USER_AGENT] for f in list(node.client_features)[:MAX_FEATURES])


@dataclass(eq=False)
class StreamInfo:
    id: int
    variant: str  # "sotw" or "delta"
    peer: str
    node_id: str = ""
    cluster: str = ""
    group: str = ""
    # What the client says it is (node.user_agent_name and version): "envoy", "grpc" or
    # the name as given; shown, never trusted for anything.
    client: str = ""
    user_agent: str = ""
    client_features: tuple[str, ...] = ()  # node.client_features, bounded; shown only
    connected_at: float = field(default_factory=time.time)
    # The stream's subscriptions, by type: its state machine's own (a live view, read for
    # /status; ads.py hands it over when the stream opens).
    types: Mapping[ResourceType, Subscription] = field(default_factory=dict)
    requests: int = 0  # requests received
    throttled: int = 0  # requests delayed by the per-stream rate limit
    peak_burst: int = 0  # the most rate-limit tokens used at once
    names: int = 0  # resource names it holds, charged to --max-total-names
    admitted: bool = False  # counted against --max-streams (its first request was valid)
    end: Callable[[], None] | None = field(default=None, repr=False)  # asks it to end

    def as_dict(self) -> dict[str, object]:
        return {
            "stream": self.id,
            "variant": self.variant,
            "peer": self.peer,
            "node": self.node_id,
            "cluster": self.cluster,
            "group": self.group,
            "client": self.client,
            "user_agent": self.user_agent,
            "client_features": list(self.client_features),
            "connected_at": self.connected_at,
            "requests": self.requests,
            "throttled": self.throttled,
            "peak_burst": self.peak_burst,
            "names": self.names,
            "types": {
                t.short: self.types[t].status.as_dict() for t in PUSH_ORDER if t in self.types
            },
        }


MAX_NODES_REMEMBERED = 10_000


@dataclass
class Registry:
    streams: dict[int, StreamInfo] = field(default_factory=dict)
    nodes: dict[str, NodeMemory] = field(default_factory=dict)
    refused: dict[str, int] = field(default_factory=dict)  # streams refused, by reason
    admitted: int = 0  # streams whose first request was valid: what --max-streams counts
    admitted_by_node: dict[str, int] = field(default_factory=dict)  # the same, per node id
    _next: int = 0

    def refuse(self, reason: str) -> None:
        """Count a stream refused for ``reason`` (shown in /status under "refused")."""
        self.refused[reason] = self.refused.get(reason, 0) + 1

    def memory(self, node_id: str) -> NodeMemory:
        """The last NACKs of ``node_id`` (for /status), shared by all its streams, kept after
        they close. What a stream does not resend is its own (state.Parked)."""
        found = self.nodes.pop(node_id, None)
        if found is None:
            found = NodeMemory()
            if len(self.nodes) >= MAX_NODES_REMEMBERED:
                del self.nodes[next(iter(self.nodes))]  # forget the least recently seen
        self.nodes[node_id] = found
        return found

    def admit(self, info: StreamInfo, node_id: str) -> None:
        """Count a stream whose first request was valid (--max-streams, per node)."""
        info.node_id, info.admitted = node_id, True
        self.admitted += 1
        self.admitted_by_node[node_id] = self.admitted_by_node.get(node_id, 0) + 1

    def release(self, info: StreamInfo) -> None:
        """The admitted stream ``info`` ends (or is being ended): it counts no more."""
        if not info.admitted:
            return
        info.admitted = False
        self.admitted -= 1
        left = self.admitted_by_node.get(info.node_id, 0) - 1
        if left > 0:
            self.admitted_by_node[info.node_id] = left
        else:
            self.admitted_by_node.pop(info.node_id, None)

    def oldest(self, node_id: str) -> StreamInfo | None:
        """The admitted stream of ``node_id`` opened first."""
        mine = (s for s in self.streams.values() if s.admitted and s.node_id == node_id)
        return min(mine, key=lambda s: s.id, default=None)

    def nacks(self) -> dict[str, dict[str, object]]:
        return {node: m.as_dict() for node, m in self.nodes.items() if m.last_nack}

    def open(self, variant: str, peer: str) -> StreamInfo:
        self._next += 1
        info = StreamInfo(self._next, variant, peer)
        self.streams[info.id] = info
        return info

    def close(self, info: StreamInfo) -> None:
        self.streams.pop(info.id, None)
