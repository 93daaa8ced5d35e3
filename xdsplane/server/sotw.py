"""State-of-the-world ADS, one stream at a time: requests and snapshots in, responses out.

No I/O here: the grpc wiring (ads.py) feeds requests and snapshot changes in and writes
what comes out, so every protocol rule can be tested by a scripted client.

Rules (see shared/design/envoy-xds-facts.md):
- a response is sent for a type only when the version of what the client would get differs
  from the version last sent on this stream, or when it subscribes to a name it was not sent;
  ACKs therefore get no reply, and a NACKed version is never sent again on that stream (the
  type is parked until the snapshot changes; a new stream is sent the current version);
- a request whose response_nonce is not the latest sent for its type is stale and ignored;
- nothing is sent before a snapshot exists for the node (never an empty LDS/CDS);
- for named subscriptions (RDS, EDS, SDS, ECDS) the version is a hash of exactly the resources
  sent, so a change elsewhere in the type pushes nothing to a stream that does not use it;
- on a snapshot change, types go out in make-before-break order, and a full-state type
  (CDS, LDS) that loses resources first gets the new set plus the old ones, and the final set
  only after the other types: nothing is removed while something may still point at it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from envoy.service.discovery.v3 import discovery_pb2

from xdsplane.server.state import (
    Ack,
    HeldVersions,
    Outgoing,
    Step,
    StreamBase,
    Subscription,
    intern_names,
)
from xdsplane.snapshot import Resource, Snapshot, cluster_eds_name, versions_hash
from xdsplane.types import PUSH_ORDER, ResourceType


def _head(rtype: ResourceType, version: str, nonce: str) -> bytes:
    head: bytes = discovery_pb2.DiscoveryResponse(
        version_info=version, type_url=rtype.value, nonce=nonce
    ).SerializeToString()
    return head


class SotwStream(StreamBase):
    """The protocol state of one StreamAggregatedResources stream."""

    # -- inputs ---------------------------------------------------------------------------

    def on_request(self, req: Any) -> Step:
        rtype = self._served_type(req.type_url)
        if rtype is None:
            return Step()
        names = set(req.resource_names)
        answer = None
        st = self.types.get(rtype)
        if st is None:
            st = Subscription(wildcard=rtype.wildcard and (not names or "*" in names))
            if req.version_info:
                # Reconnect: the client holds this version already; do not send it again.
                st.sent_version = st.claimed = req.version_info
                st.status.acked_version = req.version_info
            self.types[rtype] = st
        else:
            if req.response_nonce != st.nonce:
                self.stale += 1
                return Step()
            answer = self._answer(rtype, st, req, req.version_info)
            if rtype.wildcard and (not names or "*" in names):
                st.wildcard = True
            elif names:
                st.wildcard = False
        names.discard("*")
        if (
            isinstance(answer, Ack)
            and not st.wildcard
            and not rtype.wildcard
            and self.snapshot is not None
            and st.synced == self.snapshot.versions[rtype]
            and not st.resend
            and names == st.names
        ):
            # An ACK of a named subscription in sync (it repeats every name, thousands for an
            # Envoy's EDS): it holds every subscribed resource that exists and is owed
            # nothing (a cluster sent outside a snapshot push may owe its CLA: the walk
            # below sends it); nothing to send.
            return Step(answer=answer)
        st.synced = ""
        if names != st.names:
            st.names = intern_names(names)
        held = st.held
        if not st.wildcard and not (isinstance(held, HeldVersions) and held.names is st.names):
            # The client forgets what it unsubscribed from.
            st.held = {n: v for n, v in held.items() if n in st.names}
        return Step(self._respond(rtype, st, self.snapshot), answer)

    def on_snapshot(self, snapshot: Snapshot) -> Step:
        previous, self.snapshot = self.snapshot, snapshot
        if previous is not None and previous.digest == snapshot.digest:
            return Step()
        out: list[Outgoing] = []
        finish: list[ResourceType] = []
        for rtype in PUSH_ORDER:
            st = self.types.get(rtype)
            if st is None:
                continue
            if not st.wildcard:
                removed: set[str] = set()
            elif previous is not None and st.sent is previous.of(rtype):
                # It holds the previous snapshot's type (the usual case): the shared diff.
                removed = set(snapshot.diff(previous, rtype)[1])
            else:
                removed = set(st.sent) - set(snapshot.of(rtype))
            if removed:
                keep = dict(snapshot.of(rtype))
                keep.update({n: st.sent[n] for n in removed})
                out.extend(self._send(rtype, st, keep))
                finish.append(rtype)
            elif st.synced and previous is not None and st.synced == previous.versions[rtype]:
                out.extend(self._respond_diff(rtype, st, snapshot, previous))
            else:
                out.extend(self._respond(rtype, st, snapshot))
        for rtype in reversed(finish):
            out.extend(self._respond(rtype, self.types[rtype], snapshot))
        return Step(self._caused_by(snapshot, out))

    # -- outputs --------------------------------------------------------------------------

    def _refresh_endpoints(self, clusters: Iterable[Resource]) -> None:
        """A changed EDS cluster is a new cluster in Envoy, warming until it gets its
        ClusterLoadAssignment: forget that the client holds it, so it goes out again (Envoy's
        request for it looks like an ACK of what it has)."""
        eds = self.types.get(ResourceType.ENDPOINT)
        if eds is None:
            return
        for c in clusters:
            name = cluster_eds_name(c)
            if name is not None and eds.held.pop(name, None) is not None:
                if eds.resend is None:
                    eds.resend = set()
                eds.resend.add(name)  # owed, for a stream on the diff path (_respond_diff)

    def _respond_diff(
        self, rtype: ResourceType, st: Subscription, snapshot: Snapshot, previous: Snapshot
    ) -> list[Outgoing]:
        """A named subscription in sync with ``previous`` (``synced``: it holds every
        subscribed resource of it that exists, nothing rejected): what ``_respond`` would
        send, from what changed between the two snapshots (shared by every stream) and what
        is owed again (``resend``), without walking every subscribed name."""
        available = snapshot.of(rtype)
        names = st.names
        changed_all, removed = snapshot.diff(previous, rtype)
        wanted = {r.name: r for r in changed_all if r.name in names}
        for n in st.resend or ():
            if n in names and n in available:
                wanted[n] = available[n]
        st.resend = None
        candidates = {n: wanted[n] for n in sorted(wanted)}
        return self._send_named(rtype, st, snapshot, candidates, previous.of(rtype), removed)

    def _respond(
        self, rtype: ResourceType, st: Subscription, snapshot: Snapshot | None
    ) -> list[Outgoing]:
        if snapshot is None:
            return []
        available = snapshot.of(rtype)
        if st.wildcard:
            return self._send(rtype, st, available, snapshot.versions[rtype])
        chosen = {n: available[n] for n in sorted(st.names) if n in available}
        if rtype.wildcard:
            return self._respond_full_state(rtype, st, chosen)
        st.resend = None  # a walk sends whatever it does not hold
        if not chosen:
            st.synced = "" if st.claimed else snapshot.versions[rtype]
            return []
        if st.claimed:
            if snapshot.named_version(rtype, st.names) == st.claimed:
                st.held = {n: r.version for n, r in chosen.items()}
            st.claimed = ""
        return self._send_named(rtype, st, snapshot, chosen)

    def _send_named(
        self,
        rtype: ResourceType,
        st: Subscription,
        snapshot: Snapshot,
        candidates: Mapping[str, Resource],
        previous: Mapping[str, Resource] | None = None,
        removed: Iterable[str] = (),
    ) -> list[Outgoing]:
        """Of ``candidates`` (subscribed resources, in name order), send those whose version
        the client does not hold and did not reject. The subscription is in sync from here
        unless something was rejected: the next snapshot change and ACKs need not walk its
        names (``_respond_diff``, ``on_request``). Only what changed goes out (an omitted
        name is not a removal for named types); the version is the hash of everything the
        client then holds of its subscription (once per name set and snapshot, shared by
        the streams asking for the same names)."""
        changed: dict[str, Resource] = {}
        rejected = False
        for n, r in candidates.items():
            if st.held.get(n) != r.version:
                if self.parked.rejected(rtype, n, r.version):
                    rejected = True
                else:
                    changed[n] = r
        if not changed:
            out = []
        else:
            out = self._send(rtype, st, changed, snapshot.named_version(rtype, st.names))
        st.synced = "" if rejected else snapshot.versions[rtype]
        if not rejected:
            # It holds every subscribed resource of the snapshot: keep that as the snapshot's
            # own mapping seen through the interned names, not a table of the stream's own
            # (``previous`` and ``removed``: the diff path's, to find what it still holds
            # that the snapshot lost without a walk).
            held = st.held
            if not isinstance(held, HeldVersions):
                held = HeldVersions(held)
            st.held = held.rebased(snapshot.of(rtype), st.names, previous, removed)
        return out

    def _respond_full_state(
        self, rtype: ResourceType, st: Subscription, chosen: dict[str, Resource]
    ) -> list[Outgoing]:
        """LDS or CDS asked for by name (gRPC's client): each response carries every
        subscribed resource that exists, since a name left out is a deletion there, and a
        name that does not exist is answered by a response without it (so the client need
        not wait out its does-not-exist timer). Sent when that set or a version differs
        from what the client holds; a set this stream NACKed is not sent again."""
        version = versions_hash((n, r.version) for n, r in chosen.items())
        if st.claimed:
            if version == st.claimed:
                st.held = {n: r.version for n, r in chosen.items()}
            st.claimed = ""
        holds = {n: r.version for n, r in chosen.items()}
        if st.status.responses and st.held == holds and st.sent_version:
            return []
        if not st.status.responses and st.sent_version == version:
            return []  # a reconnect that claimed exactly this
        if self.parked.parked.get(rtype) == version:
            return []
        return self._send(rtype, st, chosen, version)

    def _send(
        self,
        rtype: ResourceType,
        st: Subscription,
        resources: Mapping[str, Resource],
        version: str | None = None,
    ) -> list[Outgoing]:
        if version is None:
            version = versions_hash((n, r.version) for n, r in resources.items())
        if st.wildcard and (version == st.sent_version or version == self.parked.parked.get(rtype)):
            # The client holds exactly these (the version is their hash), for instance after
            # a reconnect that claimed the current version: remember them, so that a later
            # removal is two-phase for this stream too. Or this stream rejected this version.
            if version == st.sent_version:
                st.sent = resources
            return []
        if rtype is ResourceType.CLUSTER:
            self._refresh_endpoints(
                r
                for n, r in resources.items()
                if n not in st.sent or st.sent[n].version != r.version
            )
        nonce = self._nonces.next()
        snapshot = self.snapshot
        # Nothing is joined here: the stream encodes the response when its turn to write
        # comes (Outgoing.encode, ads.WriteGate), so streams waiting hold no copy of it.
        body, entries = b"", list[Resource]()
        if snapshot is not None and resources is snapshot.of(rtype):
            body = snapshot.sotw_body(rtype)  # the whole type: joined once, shared
        else:
            entries = [resources[n] for n in sorted(resources)]
        # The snapshot's mapping, or the response's own list of entries: no per-stream copy.
        st.sent_out(nonce, version, entries or resources)
        if st.wildcard:
            st.sent = resources
        elif rtype.wildcard:
            st.held = {n: r.version for n, r in resources.items()}
        else:
            st.held.update((n, r.version) for n, r in resources.items())
        head = _head(rtype, version, nonce)
        return [Outgoing(rtype, version, nonce, head, body, entries, resources=len(resources))]
