"""What both protocol variants share: outgoing messages and per-type status."""

from __future__ import annotations

from dataclasses import dataclass, field

from xdsplane.snapshot import Snapshot
from xdsplane.types import ResourceType


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One response ready to write: its bytes plus what status and metrics need."""

    type: ResourceType
    version: str
    nonce: str
    data: bytes
    resources: int
    removed: int = 0


@dataclass(slots=True)
class TypeStatus:
    """What a client made of one type: for /status, metrics and logs."""

    acked_version: str = ""
    sent_version: str = ""
    responses: int = 0
    acks: int = 0
    nacks: int = 0
    last_nack: str = ""
    nacked_version: str = ""

    def as_dict(self) -> dict[str, object]:
        return {
            "acked_version": self.acked_version,
            "sent_version": self.sent_version,
            "responses": self.responses,
            "acks": self.acks,
            "nacks": self.nacks,
            "last_nack": self.last_nack,
            "nacked_version": self.nacked_version,
        }


@dataclass(slots=True)
class Nonces:
    """Nonces are per stream: one counter, the latest per type remembered by the caller."""

    counter: int = 0
    prefix: str = field(default="")

    def next(self) -> str:
        self.counter += 1
        return f"{self.prefix}{self.counter}"


@dataclass(slots=True)
class NackRecord:
    message: str
    version: str
    at: float


@dataclass(slots=True)
class Parked:
    """What one stream's client rejected: not sent to it again on that stream.

    ``parked`` holds the NACKed version per full-state type, ``nacked`` the NACKed version of
    each named resource. A changed snapshot gives new versions, which are sent. This belongs
    to the stream that NACKed: a new stream, even with the same node id, is sent the current
    version (and parks it for itself if it NACKs too), so a client that claims a node's id
    and NACKs cannot freeze the real node's config (shared/design/envoy-xds-facts.md).
    """

    parked: dict[ResourceType, str] = field(default_factory=dict)
    nacked: dict[ResourceType, dict[str, str]] = field(default_factory=dict)

    def record(self, rtype: ResourceType, version: str, resources: dict[str, str]) -> None:
        self.parked[rtype] = version
        self.nacked.setdefault(rtype, {}).update(resources)

    def rejected(self, rtype: ResourceType, name: str, version: str) -> bool:
        return self.nacked.get(rtype, {}).get(name) == version


@dataclass(slots=True)
class NodeMemory:
    """The last NACK per type of a node, over all its streams and kept after they close: a
    view for /status only. It decides nothing about what is sent (that is ``Parked``, per
    stream)."""

    last_nack: dict[ResourceType, NackRecord] = field(default_factory=dict)

    def record_nack(self, rtype: ResourceType, version: str, message: str) -> None:
        import time

        self.last_nack[rtype] = NackRecord(message, version, time.time())

    def as_dict(self) -> dict[str, object]:
        return {
            t.short: {"message": r.message, "version": r.version, "at": r.at}
            for t, r in self.last_nack.items()
        }


MAX_IGNORED_TYPES = 64  # unknown type URLs remembered per stream


class StreamBase:
    """What both variants' per-stream machines keep besides their per-type state."""

    def __init__(self, memory: NodeMemory | None = None) -> None:
        # ``memory``: the node's NACK view (/status), shared by the node's streams;
        # ``parked``: what this stream's client rejected, this stream's own.
        self.memory = memory if memory is not None else NodeMemory()
        self.parked = Parked()
        self.snapshot: Snapshot | None = None
        self._nonces = Nonces()
        self.ignored_types: set[str] = set()
        self.stale = 0

    def _record_nack(
        self, rtype: ResourceType, version: str, resources: dict[str, str], message: str
    ) -> None:
        self.parked.record(rtype, version, resources)
        self.memory.record_nack(rtype, version, message)

    def _served_type(self, type_url: str) -> ResourceType | None:
        """The resource type of a request; None (and remembered) for types not served."""
        rtype = ResourceType.from_url(type_url)
        if rtype is None and len(self.ignored_types) < MAX_IGNORED_TYPES:
            # Bounded: a client sending ever new type URLs must not grow the stream.
            self.ignored_types.add(str(type_url)[:200])
        return rtype


def nack_message(error_detail: object) -> str:
    message = str(getattr(error_detail, "message", "") or "")
    return message[:2000] or "rejected without a message"
