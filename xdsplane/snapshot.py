"""Immutable snapshots: per resource type, name -> resource with its bytes and version.

Each resource is serialized once (deterministically) when it is built; its version is a
hash of those bytes, so the same content has the same version on every replica and after
every restart. The pre-encoded response fragments are shared by every stream: a response is
assembled by joining bytes, never by re-marshalling messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Iterable, Mapping
from dataclasses import InitVar, dataclass, field
from fnmatch import fnmatchcase
from typing import Any, cast

from xdsplane.config.errors import ConfigError
from xdsplane.types import PUSH_ORDER, ResourceType, eds_name, resource_name


def digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=8).hexdigest()


def versions_hash(items: Iterable[tuple[str, str]]) -> str:
    """A version for a set of (name, version) pairs, independent of their order."""
    return lines_hash([f"{name}\0{version}\n" for name, version in sorted(items)])


def lines_hash(lines: list[str]) -> str:
    """``versions_hash`` of pairs given as their sorted "name\\0version\\n" lines (kept up
    to date by a caller that re-versions a type from what changed: pipeline/incremental)."""
    # One update of the joined text: the same hash as one update per piece, 5x faster.
    return hashlib.blake2b("".join(lines).encode(), digest_size=8).hexdigest()


@dataclass(frozen=True, slots=True, eq=False)
class Resource:
    """One Envoy resource, encoded once.

    ``sotw_entry`` is a serialized ``DiscoveryResponse`` holding only this resource and
    ``delta_entry`` a serialized ``DeltaDiscoveryResponse`` holding only this resource:
    protobuf merges concatenated messages, so a response is its header's bytes followed by
    the entries of the resources it carries.

    Only the bytes are kept. ``message`` decodes the resource again on each use (well under
    a microsecond for a cluster): the decoded messages of a 4,600-resource snapshot held
    13 MB of the server's memory, for the few readers (references, checks, render, diff)
    that look inside a resource, mostly during a reload.
    """

    type: ResourceType
    name: str
    version: str
    source: str
    size: int
    sotw_entry: bytes
    delta_entry: bytes

    @property
    def payload(self) -> bytes:
        """The serialized message (deterministic): it ends the SotW entry."""
        return self.sotw_entry[len(self.sotw_entry) - self.size :] if self.size else b""

    @property
    def message(self) -> Any:
        """The resource's message, decoded from ``payload``: a new object on each use, so a
        reader may change its copy without changing what is served."""
        return self.type.message_class.FromString(self.payload)


def make_resource(rtype: ResourceType, message: Any, source: str = "") -> Resource:
    payload = message.SerializeToString(deterministic=True)
    return from_payload(rtype, resource_name(message), payload, source)


def from_payload(rtype: ResourceType, name: str, payload: bytes, source: str = "") -> Resource:
    """A Resource from its serialized message (``payload``, deterministic).

    The response entries are encoded here, field by field, as protobuf encodes them
    (``tests/test_incremental.py`` compares them): building three messages per resource
    to serialize them cost more than the rest of a cold start from the disk cache.
    """
    version = digest(payload)
    url = _URLS.get(rtype)
    if url is None:
        url = _URLS[rtype] = _ld(b"\x0a", rtype.value.encode())  # Any.type_url (1)
    packed = url + _ld(b"\x12", payload) if payload else url  # Any.value (2)
    sotw = _ld(b"\x12", packed)  # DiscoveryResponse.resources (2)
    entry = b"\x0a\x10" + version.encode() + _ld(b"\x12", packed)  # version (1), resource (2)
    if name:
        entry += _ld(b"\x1a", name.encode())  # Resource.name (3)
    delta = _ld(b"\x12", entry)  # DeltaDiscoveryResponse.resources (2)
    return Resource(rtype, name, version, source, len(payload), sotw, delta)


_URLS: dict[ResourceType, bytes] = {}

_EDS_NAMES: dict[tuple[str, str], str | None] = {}  # (name, version) -> eds_name
_EDS_NAMES_MAX = 16_384


def cluster_eds_name(cluster: Resource) -> str | None:
    """``types.eds_name`` of a cluster resource, remembered by its content (name and
    version): every stream looks at an edit's changed clusters, and a change to all 2,000
    clusters seen by 1,000 streams would otherwise decode two million messages."""
    key = (cluster.name, cluster.version)
    try:
        return _EDS_NAMES[key]
    except KeyError:
        pass
    if len(_EDS_NAMES) >= _EDS_NAMES_MAX:
        _EDS_NAMES.clear()
    found = _EDS_NAMES[key] = eds_name(cluster.message)
    return found


def _ld(tag: bytes, data: bytes) -> bytes:
    """A length-delimited field: its tag byte, the length as a varint, the bytes."""
    n = len(data)
    if n < 0x80:
        return tag + _SHORT_LENGTHS[n] + data
    if n < 0x4000:
        return tag + bytes(((n & 0x7F) | 0x80, n >> 7)) + data
    out = bytearray(tag)
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out) + data


_SHORT_LENGTHS = [bytes((n,)) for n in range(0x80)]


def _same(a: Mapping[str, Resource], b: Mapping[str, Resource]) -> bool:
    """The same resources (the very objects: unchanged files are not rebuilt)."""
    return len(a) == len(b) and all(b.get(n) is r for n, r in a.items())


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """The resources one group of nodes is served. What it serves never changes after it is
    built; ``installed_at`` is set once, when a cache first serves it (``mark_installed``)."""

    resources: Mapping[ResourceType, Mapping[str, Resource]]
    versions: Mapping[ResourceType, str] = field(init=False)
    digest: str = field(init=False)
    # When a cache first served it (time.monotonic()); None until then. A stream's ACK of a
    # response this snapshot's change caused observes the propagation from here.
    installed_at: float | None = field(default=None, init=False, compare=False)
    previous: InitVar[Snapshot | None] = None
    # The types that may differ from ``previous`` (None: any); the others are shared.
    changed: InitVar[Collection[ResourceType] | None] = None
    # Versions of changed types the caller computed (``lines_hash``), not computed again.
    known: InitVar[Mapping[ResourceType, str] | None] = None
    _memo: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(
        self,
        previous: Snapshot | None,
        changed: Collection[ResourceType] | None,
        known: Mapping[ResourceType, str] | None,
    ) -> None:
        resources = dict(self.resources)
        versions = {}
        for t in PUSH_ORDER:
            named = resources.get(t, {})
            before = previous.resources.get(t) if previous is not None else None
            if before is not None and changed is not None and t not in changed:
                resources[t] = before
                versions[t] = previous.versions[t]  # type: ignore[union-attr]
            elif known is not None and t in known:
                versions[t] = known[t]
            elif before is not None and _same(before, named):
                # Nothing of this type changed: share the mapping and its version.
                resources[t] = before
                versions[t] = previous.versions[t]  # type: ignore[union-attr]
            else:
                versions[t] = versions_hash((n, r.version) for n, r in named.items())
        object.__setattr__(self, "resources", resources)
        object.__setattr__(self, "versions", versions)
        object.__setattr__(self, "digest", versions_hash((t.value, v) for t, v in versions.items()))

    @classmethod
    def build(cls, resources: Iterable[Resource], previous: Snapshot | None = None) -> Snapshot:
        """A snapshot of ``resources``; types unchanged since ``previous`` are shared with it."""
        by_type: dict[ResourceType, dict[str, Resource]] = {t: {} for t in PUSH_ORDER}
        for r in resources:
            by_type[r.type][r.name] = r
        return cls({t: dict(sorted(v.items())) for t, v in by_type.items()}, previous)

    def diff(
        self, previous: Snapshot, rtype: ResourceType
    ) -> tuple[tuple[Resource, ...], tuple[str, ...]]:
        """What of ``rtype`` changed since ``previous``: (new or changed, removed names).

        Computed once per pair and shared by every stream that held ``previous`` exactly.
        """
        key = ("diff", rtype, previous.versions[rtype])
        hit = self._memo.get(key)
        if hit is None:
            now, before = self.of(rtype), previous.of(rtype)
            changed = tuple(
                r for n, r in now.items() if (b := before.get(n)) is None or b.version != r.version
            )
            removed = tuple(n for n in before if n not in now)
            hit = (changed, removed)
            if len(self._memo) > 64:
                # Old diffs go; the shared bodies stay (streams may be sending them).
                for k in [k for k in self._memo if k[0] == "diff"]:
                    del self._memo[k]
            self._memo[key] = hit
        return hit

    def named_version(self, rtype: ResourceType, names: frozenset[str]) -> str:
        """The SotW ``version_info`` of a subscription to ``names`` of ``rtype``: the hash of
        the names and versions of those that exist. Computed once per name set and shared
        by every stream subscribed to the same names (Envoys of one group ask for the same
        ClusterLoadAssignments)."""
        memo: dict[tuple[ResourceType, frozenset[str]], str] = self._memo.setdefault("named", {})
        key = (rtype, names)
        hit = memo.get(key)
        if hit is None:
            available = self.of(rtype)
            hit = versions_hash((n, available[n].version) for n in names if n in available)
            if len(memo) >= 256:
                memo.clear()
            memo[key] = hit
        return hit

    def sotw_body(self, rtype: ResourceType) -> bytes:
        """Every resource of ``rtype`` as the body of a state-of-the-world response, in name
        order; joined once and shared by every stream."""
        key = ("sotw", rtype)
        body = self._memo.get(key)
        if body is None:
            named = self.of(rtype)
            body = b"".join(named[n].sotw_entry for n in sorted(named))
            self._memo[key] = body
        return cast(bytes, body)  # the shared object itself: never copied per stream

    def delta_body(self, rtype: ResourceType) -> bytes:
        """Every resource of ``rtype`` as the body of a delta response, in name order: what
        a client holding none of them is sent first; joined once and shared, like
        ``sotw_body``."""
        key = ("delta", rtype)
        body = self._memo.get(key)
        if body is None:
            named = self.of(rtype)
            body = b"".join(named[n].delta_entry for n in sorted(named))
            self._memo[key] = body
        return cast(bytes, body)

    def of(self, rtype: ResourceType) -> Mapping[str, Resource]:
        return self.resources.get(rtype, {})

    def mark_installed(self, at: float) -> None:
        """Record ``at`` (monotonic seconds) as the install time, unless one is set: a
        snapshot that stays served across reloads keeps the time it was first served."""
        if self.installed_at is None:
            object.__setattr__(self, "installed_at", at)

    def count(self) -> int:
        return sum(len(v) for v in self.resources.values())

    def size(self) -> int:
        return sum(r.size for v in self.resources.values() for r in v.values())


@dataclass(frozen=True, slots=True)
class NodeGroup:
    """Nodes selected by globs on their id or cluster; ``None`` selects every node.

    ``cluster`` None: the node id alone selects (over mTLS, a cluster the client certificate
    does not prove is never used: xds_identity)."""

    name: str
    globs: tuple[str, ...] | None
    snapshot: Snapshot
    # The merged policy the snapshot was translated from (policy.merge.GroupPolicy), for the
    # access matrix (policy/matrix.py) of `routes`, /status and `diff --fail-on-weaken`.
    policy: Any = field(default=None, compare=False)

    def matches(self, node_id: str, cluster: str | None) -> bool:
        if self.globs is None:
            return True
        return any(
            fnmatchcase(node_id, g) or (cluster is not None and fnmatchcase(cluster, g))
            for g in self.globs
        )


@dataclass(frozen=True, slots=True)
class SnapshotSet:
    """Everything a folder serves: node groups in the order they are matched.

    ``certificates`` summarizes the certificates served (for /status and expiry warnings);
    ``warnings`` are what loaded but deserves a word (ConfigErrors: legacy TLS allowed).
    """

    groups: tuple[NodeGroup, ...]
    certificates: tuple[Any, ...] = ()
    warnings: tuple[ConfigError, ...] = ()

    def group_for(self, node_id: str, cluster: str | None) -> NodeGroup | None:
        """The first group selecting the node; groups with globs come before the catch-all.
        ``cluster`` None: by the node id alone."""
        for g in self.groups:
            if g.matches(node_id, cluster):
                return g
        return None

    def group(self, name: str) -> Snapshot | None:
        for g in self.groups:
            if g.name == name:
                return g.snapshot
        return None
