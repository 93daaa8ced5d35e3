"""What both protocol variants share: what goes out, what the client answered, and the
per-type subscription of a stream.

A machine (sotw.py, delta.py) turns each input into a ``Step``: the responses to write, in
order, and the client's answer (``Ack`` or ``Nack``) when the request was one. The grpc
wiring writes the responses and hands the events to its observers (observe.py); nothing here
does I/O.
"""

from __future__ import annotations

import functools
import time
import weakref
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from xdsplane.snapshot import Resource, Snapshot
from xdsplane.types import ResourceType


@dataclass(frozen=True, slots=True)
class Outgoing:
    """One response to write: its header's bytes and the body it is assembled from, plus
    what status and metrics need.

    The bytes are joined only when the stream is about to write them (``encode``, through
    the server's WriteGate): a stream waiting for its turn holds references to shared,
    pre-encoded pieces, never a copy of the response. ``body``: a body shared by every
    stream (a whole type, joined once per snapshot), or b""; ``entries``: resources whose
    entries follow it (``delta_entry`` when ``delta``, else ``sotw_entry``).
    """

    type: ResourceType
    version: str
    nonce: str
    head: bytes
    body: bytes = b""
    entries: Sequence[Resource] = ()
    delta: bool = False
    resources: int = 0
    removed: int = 0

    def size(self) -> int:
        """The length of ``encode()``, without building it."""
        if self.delta:
            return len(self.head) + len(self.body) + sum(len(r.delta_entry) for r in self.entries)
        return len(self.head) + len(self.body) + sum(len(r.sotw_entry) for r in self.entries)

    def encode(self) -> bytes:
        """The serialized response: protobuf merges the concatenated pieces."""
        if not self.entries:
            return self.head + self.body
        if self.delta:
            return b"".join([self.head, self.body, *(r.delta_entry for r in self.entries)])
        return b"".join([self.head, self.body, *(r.sotw_entry for r in self.entries)])

    @property
    def data(self) -> bytes:
        return self.encode()


@dataclass(frozen=True, slots=True)
class Ack:
    """The client accepted the latest response of ``type`` on this stream (its ``nonce``).

    ``installed_at``: when the snapshot whose change caused that response was installed
    (``Snapshot.installed_at``, monotonic seconds); None when a request caused it (a new
    subscription) or the snapshot was never installed (tests). Its ACK ends the propagation.
    """

    type: ResourceType
    version: str
    nonce: str
    installed_at: float | None = None


@dataclass(frozen=True, slots=True)
class Nack:
    """The client rejected the latest response of ``type`` (``version``, sent as ``nonce``)."""

    type: ResourceType
    version: str
    nonce: str
    message: str


@dataclass(slots=True)
class Step:
    """What a machine made of one input: the responses to write, in order, and the client's
    answer to the latest response of the request's type (None: the input was a snapshot, a
    subscription, a stale nonce or an unknown type)."""

    responses: list[Outgoing] = field(default_factory=list)
    answer: Ack | Nack | None = None


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


_interned: dict[int, weakref.ref[frozenset[str]]] = {}
_EMPTY_NAMES: frozenset[str] = frozenset()


def intern_names(names: Iterable[str]) -> frozenset[str]:
    """One frozenset per distinct set of subscribed names, shared by every subscription that
    has it: the Envoys of one group each subscribe to the same 2,000 ClusterLoadAssignments
    by name, and 1,000 copies of that set would be 130 MB. Held weakly: a set no stream
    uses any more is forgotten. Two different sets with the same hash are simply not
    shared (the second is returned as it is)."""
    fs = names if isinstance(names, frozenset) else frozenset(names)
    if not fs:
        return _EMPTY_NAMES
    key = hash(fs)
    ref = _interned.get(key)
    if ref is not None:
        hit = ref()
        if hit is not None:
            return hit if hit == fs else fs
    _interned[key] = weakref.ref(fs, functools.partial(_forget, key))
    return fs


def _forget(key: int, dead: weakref.ref[frozenset[str]]) -> None:
    if _interned.get(key) is dead:
        del _interned[key]


class HeldVersions(MutableMapping[str, str]):
    """Name -> version of what a client holds of one type, kept small.

    While the client holds exactly a snapshot's resources of the type (a stream in sync),
    this is that snapshot's own mapping, shared by every such stream, plus the few names
    that differ since (``_over``: name -> version, None for a name it no longer holds);
    past ``MAX_OVERLAY`` differences it becomes a plain dict of its own. A subscription by
    name (an Envoy's EDS) sees the mapping through its names (``_names``, the interned set
    of ``intern_names``: shared too). Without a base it is a plain dict. A stream in sync
    thus keeps no table of 2,000 names.
    """

    __slots__ = ("_base", "_names", "_over")
    MAX_OVERLAY = 256

    def __init__(self, items: Mapping[str, str] | Iterable[tuple[str, str]] = ()) -> None:
        self._base: Mapping[str, Resource] | None = None
        self._names: frozenset[str] | None = None
        self._over: dict[str, str | None] = dict(items)

    @classmethod
    def of(cls, base: Mapping[str, Resource], names: frozenset[str] | None = None) -> HeldVersions:
        """Held exactly: the version of every resource of ``base`` (shared, not copied), or
        of those among ``names`` (a named subscription)."""
        held = cls()
        held._base = base
        held._names = names
        return held

    @property
    def base(self) -> Mapping[str, Resource] | None:
        return self._base

    @property
    def names(self) -> frozenset[str] | None:
        """The names through which the base is seen (None: all of it)."""
        return self._names

    def rebased(
        self,
        base: Mapping[str, Resource],
        names: frozenset[str],
        previous: Mapping[str, Resource] | None = None,
        removed: Iterable[str] = (),
    ) -> HeldVersions:
        """What this holds, as ``base`` seen through ``names`` plus what it holds that
        ``base`` lacks (a SotW client keeps a named resource the server no longer has).
        The caller knows that it holds ``base``'s version of every name of ``names`` that
        ``base`` has. When this is ``previous`` seen through the same names, ``removed``
        (the names ``base`` lost since ``previous``) says what may be missing, without a
        walk of every name."""
        if previous is not None and self._base is previous and self._names is names:
            over = self._over
            missing = {n: self[n] for n in removed if n in self}
            missing.update((n, v) for n, v in over.items() if v is not None and n not in base)
        else:
            missing = {n: v for n, v in self.items() if n not in base}
        held = HeldVersions.of(base, names)
        held._over.update(missing)
        held._flatten_if_big()
        return held

    def _in_base(self, name: str) -> bool:
        base = self._base
        if base is None or name not in base:
            return False
        return self._names is None or name in self._names

    def _base_names(self) -> Iterator[str]:
        base, names = self._base, self._names
        if base is None:
            return iter(())
        if names is None:
            return iter(base)
        if len(names) < len(base):
            return (n for n in names if n in base)
        return (n for n in base if n in names)

    def __getitem__(self, name: str) -> str:
        over = self._over
        if name in over:
            v = over[name]
            if v is None:
                raise KeyError(name)
            return v
        if self._in_base(name):
            return self._base[name].version  # type: ignore[index]
        raise KeyError(name)

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        if name in self._over:
            return self._over[name] is not None
        return self._in_base(name)

    def __setitem__(self, name: str, version: str) -> None:
        self._over[name] = version
        self._flatten_if_big()

    def __delitem__(self, name: str) -> None:
        if name not in self:
            raise KeyError(name)
        if self._in_base(name):
            self._over[name] = None
            self._flatten_if_big()
        else:
            del self._over[name]

    def __iter__(self) -> Iterator[str]:
        over = self._over
        yield from (n for n in self._base_names() if n not in over)
        yield from (n for n, v in over.items() if v is not None)

    def __len__(self) -> int:
        over = self._over
        if self._base is None:
            return len(over)
        names = self._names
        in_base = len(self._base) if names is None else sum(1 for _ in self._base_names())
        shadowed = sum(1 for n in over if self._in_base(n))
        return in_base - shadowed + sum(1 for v in over.values() if v is not None)

    def _flatten_if_big(self) -> None:
        if self._base is not None and len(self._over) > self.MAX_OVERLAY:
            items = {n: self[n] for n in self}
            self._base = None
            self._names = None
            self._over = dict(items)


@dataclass(slots=True)
class Subscription:
    """One stream's subscription to one type, in either variant: what the client asked for,
    what it holds, and what was sent last.

    Both variants keep ``wildcard``, ``names``, ``held`` (named resource -> the version the
    client holds: every resource in delta, as HeldVersions sharing the snapshot's mapping
    while in sync; named types in SotW), the latest ``nonce`` and
    ``sent_version``, ``last_sent`` (what a NACK of the latest response rejects) and
    ``cause`` (the install time of the snapshot whose change caused the latest response).
    ``claimed`` and ``sent`` are SotW's (a reconnect's claimed version; the full set a
    wildcard client holds), ``answered`` and ``synced`` delta's (the first wildcard answer;
    the type version a pure wildcard client holds exactly).
    """

    wildcard: bool
    names: frozenset[str] = _EMPTY_NAMES  # interned (intern_names): shared across streams
    # A plain dict (SotW), or HeldVersions (delta: shares the snapshot's mapping in sync).
    held: MutableMapping[str, str] = field(default_factory=dict)
    nonce: str = ""
    sent_version: str = ""  # the type version last sent (SotW: or the one a client claimed)
    # The latest response's resources until the client answers it (often the snapshot's own
    # mapping, or the response's own list of entries: never a copy).
    last_sent: Mapping[str, Resource] | Sequence[Resource] = ()
    cause: float | None = None
    status: TypeStatus = field(default_factory=TypeStatus)
    claimed: str = ""  # SotW, named types: the version a reconnecting client says it holds
    sent: Mapping[str, Resource] = field(default_factory=dict)  # SotW, full-state types
    answered: bool = False  # delta: the first wildcard request was answered
    # Delta: the type version of the snapshot whose resources this client holds exactly,
    # for every name it subscribes to (all of them for a wildcard), nothing rejected and
    # nothing else held, except the names in ``resend``: it gets the shared diff of two
    # snapshots (filtered by its names), not a scan of everything it subscribes to.
    synced: str = ""
    # Delta EDS: names whose ClusterLoadAssignment is owed again, unchanged, because their
    # cluster changed (a warming cluster waits for it, and Envoy does not ask again). None
    # when there are none: no empty set per subscription (thousands of streams x types).
    resend: set[str] | None = None

    def sent_out(
        self, nonce: str, version: str, resources: Mapping[str, Resource] | Sequence[Resource]
    ) -> None:
        """A response went out: ``resources`` as ``version``, with ``nonce``."""
        self.nonce = nonce
        self.sent_version = version
        self.last_sent = resources
        self.cause = None  # set by the machine when a snapshot change caused it
        self.status.sent_version = version
        self.status.responses += 1


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
        self.types: dict[ResourceType, Subscription] = {}

    def _answer(
        self, rtype: ResourceType, sub: Subscription, req: Any, acked_version: str
    ) -> Ack | Nack:
        """Judge ``req``, which answers the latest response of ``rtype`` (its nonce is
        checked by the caller): a NACK when it carries ``error_detail`` (the version is
        parked on this stream and the node's view records it), else an ACK of
        ``acked_version``."""
        nonce = str(req.response_nonce)
        cause, sub.cause = sub.cause, None  # one answer per response ends its propagation
        if req.HasField("error_detail"):
            message = nack_message(req.error_detail)
            version = sub.sent_version
            sub.status.nacks += 1
            sub.status.last_nack = message
            sub.status.nacked_version = version
            last = sub.last_sent
            sent = last.values() if isinstance(last, Mapping) else last
            self.parked.record(rtype, version, {r.name: r.version for r in sent})
            self.memory.record_nack(rtype, version, message)
            return Nack(rtype, version, nonce, message)
        sub.last_sent = ()  # accepted: nothing left for a NACK to reject
        sub.status.acks += 1
        sub.status.acked_version = acked_version
        return Ack(rtype, acked_version, nonce, cause)

    def _caused_by(self, snapshot: Snapshot, responses: list[Outgoing]) -> list[Outgoing]:
        """Mark ``responses`` as caused by a change to ``snapshot``: their ACKs observe the
        propagation from its install time."""
        for o in responses:
            self.types[o.type].cause = snapshot.installed_at
        return responses

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
