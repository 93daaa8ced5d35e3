"""Incremental (delta) ADS, one stream at a time: requests and snapshots in, responses out.

No I/O here, like sotw.py. Per type the stream remembers which names the client subscribed
to (or that it is a wildcard subscriber) and which version of each resource it holds:
``initial_resource_versions`` on a reconnect, then every version sent. A response carries
only resources whose version differs from what the client holds, and ``removed_resources``
for what it holds that no longer exists.

- The first wildcard request of a type is answered even when there is nothing to send
  (Envoy's initialization waits for it), but only once a snapshot exists.
- A NACKed version is not sent again on that stream: the client is taken to hold what was
  sent, so the same resource goes out again only when it changes (a new stream is sent the
  current version).
- Make-before-break: on a snapshot change, additions and updates go out type by type in
  push order, then removals in the reverse order.
- Secrets and filter configurations (ECDS) are never removed by the server: a draining
  listener may still use an old one, and Envoy unsubscribes from those it no longer needs.
- ``system_version_info`` is for debugging only: the type's snapshot version.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from xdsplane.server.state import (
    HeldVersions,
    Outgoing,
    Step,
    StreamBase,
    Subscription,
    intern_names,
)
from xdsplane.snapshot import Resource, Snapshot, cluster_eds_name
from xdsplane.types import PUSH_ORDER, ResourceType


def _head(rtype: ResourceType, version: str, nonce: str, removed: list[str]) -> bytes:
    head: bytes = discovery_pb2.DeltaDiscoveryResponse(
        system_version_info=version, type_url=rtype.value, nonce=nonce, removed_resources=removed
    ).SerializeToString()
    return head


class DeltaStream(StreamBase):
    """The protocol state of one DeltaAggregatedResources stream."""

    def on_request(self, req: Any) -> Step:
        rtype = self._served_type(req.type_url)
        if rtype is None:
            return Step()
        subscribe = set(req.resource_names_subscribe)
        unsubscribe = set(req.resource_names_unsubscribe)
        answer = None
        st = self.types.get(rtype)
        if st is None:
            st = Subscription(wildcard=not subscribe or "*" in subscribe)
            st.held = HeldVersions(req.initial_resource_versions)
            # A reconnecting client (it names what it holds) is not initializing: it needs no
            # empty answer, and Envoy would count one as an update.
            st.answered = bool(st.held)
            self.types[rtype] = st
        elif req.response_nonce:
            if req.response_nonce == st.nonce:
                answer = self._answer(rtype, st, req, st.sent_version)
            else:
                self.stale += 1
            # Subscription changes count even on a stale nonce: they are deltas.
            if not subscribe and not unsubscribe:
                # A plain ACK or NACK: nothing can have changed for this client that a
                # snapshot push did not already send (and a rejected version is not resent).
                return Step(answer=answer)
        st.synced = ""
        if "*" in subscribe:
            st.wildcard = True
        if "*" in unsubscribe:
            st.wildcard = False
        if subscribe - st.names - {"*"} or unsubscribe & st.names:
            st.names = intern_names((st.names | subscribe) - {"*"} - unsubscribe)
        for name in unsubscribe:
            st.held.pop(name, None)
        return Step(self._respond(rtype, st, self.snapshot, removals=True), answer)

    def on_snapshot(self, snapshot: Snapshot) -> Step:
        previous, self.snapshot = self.snapshot, snapshot
        if previous is not None and previous.digest == snapshot.digest:
            return Step()
        out: list[Outgoing] = []
        removals: dict[ResourceType, tuple[str, ...]] = {}
        for rtype in PUSH_ORDER:
            st = self.types.get(rtype)
            if st is None:
                continue
            if previous is not None and st.synced and st.synced == previous.versions[rtype]:
                changed, removed = snapshot.diff(previous, rtype)
                if not st.wildcard:  # a named subscription: only its names
                    names = st.names
                    changed = tuple(r for r in changed if r.name in names)
                if st.resend:
                    changed = self._with_resent(rtype, st, snapshot, changed)
                kept = [r for r in changed if not self.parked.rejected(rtype, r.name, r.version)]
                removals[rtype] = removed if not rtype.kept else ()
                if len(kept) != len(changed):
                    st.synced = ""
                out.extend(self._emit(rtype, st, snapshot, kept, []))
            else:
                out.extend(self._respond(rtype, st, snapshot, removals=False))
        for rtype in reversed(PUSH_ORDER):
            st = self.types.get(rtype)
            if st is None:
                continue
            if rtype in removals:
                gone = [n for n in removals[rtype] if n in st.held]
                out.extend(self._emit(rtype, st, snapshot, [], gone))
                if st.synced:
                    st.synced = snapshot.versions[rtype]
                    self._share_held(st, snapshot.of(rtype))
            else:
                out.extend(self._respond(rtype, st, snapshot, removals=True))
        return Step(self._caused_by(snapshot, out))

    def _refresh_endpoints(self, clusters: Iterable[Resource]) -> None:
        """A changed EDS cluster warms until it gets its ClusterLoadAssignment, and Envoy
        does not ask again for one it holds: send it again with the cluster (the next EDS
        response of this stream carries it: ``resend``)."""
        eds = self.types.get(ResourceType.ENDPOINT)
        if eds is None:
            return
        for c in clusters:
            name = cluster_eds_name(c)
            if name is not None and eds.held.pop(name, None) is not None:
                if eds.resend is None:
                    eds.resend = set()
                eds.resend.add(name)

    @staticmethod
    def _with_resent(
        rtype: ResourceType, st: Subscription, snapshot: Snapshot, changed: tuple[Resource, ...]
    ) -> tuple[Resource, ...]:
        """``changed`` plus the subscribed resources owed again (``resend``), in name order
        (what a scan would send), each once."""
        available = snapshot.of(rtype)
        owed = {
            n: available[n]
            for n in st.resend or ()
            if n in available and (st.wildcard or n in st.names)
        }
        st.resend = None
        if not owed:
            return changed
        merged = {r.name: r for r in changed}
        merged.update(owed)
        return tuple(merged[n] for n in sorted(merged))

    def _respond(
        self, rtype: ResourceType, st: Subscription, snapshot: Snapshot | None, removals: bool
    ) -> list[Outgoing]:
        if snapshot is None:
            return []
        available = snapshot.of(rtype)
        st.resend = None  # a scan sends whatever it does not hold
        if st.wildcard and not st.names and not st.held and rtype not in self.parked.nacked:
            # A new wildcard client that holds nothing: the whole type, whose body is joined
            # once per snapshot and shared by every such stream.
            out = self._emit(rtype, st, snapshot, [], [], everything=available)
            st.synced = snapshot.versions[rtype] if removals and not rtype.kept else ""
            return out
        wanted = set(available) if st.wildcard else set()
        wanted |= st.names
        changed = [
            available[n]
            for n in sorted(wanted)
            if n in available
            and st.held.get(n) != available[n].version
            and not self.parked.rejected(rtype, n, available[n].version)
        ]
        removed: list[str] = []
        if removals and not rtype.kept:
            removed = sorted(n for n in st.held if n not in available)
        rejected = sum(
            1
            for n in wanted
            if n in available
            and st.held.get(n) != available[n].version
            and self.parked.rejected(rtype, n, available[n].version)
        )
        out = self._emit(rtype, st, snapshot, changed, removed)
        # After a full pass with removals, the client holds exactly the type's resources
        # of every name it subscribes to.
        exact = removals and not rejected
        st.synced = snapshot.versions[rtype] if exact and not rtype.kept else ""
        if st.synced:
            self._share_held(st, available)
        return out

    @staticmethod
    def _share_held(st: Subscription, available: Mapping[str, Resource]) -> None:
        """In sync, the client holds exactly ``available``'s resources of every name it
        subscribes to: keep that as the snapshot's own mapping, seen through the (interned)
        names of a named subscription, instead of a table of the stream's own. (A client
        may hold names it never subscribed to, from ``initial_resource_versions``: then it
        keeps its own table.)"""
        if not st.wildcard:
            held = st.held
            if (isinstance(held, HeldVersions) and held.names is st.names) or all(
                n in st.names for n in held
            ):
                st.held = HeldVersions.of(available, st.names)
        elif not st.names:
            st.held = HeldVersions.of(available)

    def _emit(
        self,
        rtype: ResourceType,
        st: Subscription,
        snapshot: Snapshot,
        changed: list[Resource],
        removed: list[str],
        everything: Mapping[str, Resource] | None = None,
    ) -> list[Outgoing]:
        """One response of ``changed`` and ``removed``; ``everything``: instead of
        ``changed``, every resource of the type to a client that holds none of them."""
        first_wildcard = st.wildcard and not st.answered
        if not changed and not removed and not everything and not first_wildcard:
            return []
        if rtype is ResourceType.CLUSTER:
            self._refresh_endpoints(r for r in changed if r.name in st.held)
        nonce = self._nonces.next()
        version = snapshot.versions[rtype]
        head = _head(rtype, version, nonce, removed)
        # Nothing is joined here: the stream encodes the response when its turn to write
        # comes (Outgoing.encode, ads.WriteGate), so streams waiting hold no copy of it.
        if everything:
            st.held = HeldVersions.of(everything)
            st.sent_out(nonce, version, everything)  # the snapshot's mapping, not a copy
            body = snapshot.delta_body(rtype)
            out = Outgoing(rtype, version, nonce, head, body, (), True, len(everything))
        else:
            for r in changed:
                st.held[r.name] = r.version
            for name in removed:
                del st.held[name]
            st.sent_out(nonce, version, changed)  # the response's own list, not a copy
            out = Outgoing(
                rtype, version, nonce, head, b"", changed, True, len(changed), len(removed)
            )
        st.answered = True
        return [out]
