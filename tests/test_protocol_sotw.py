"""State-of-the-world ADS protocol rules, driven by a scripted client (no network).

Each test feeds DiscoveryRequest messages and Snapshots into a SotwStream the way
xdsplane.server.ads does, decodes what comes out and checks it against the rules in
shared/design/envoy-xds-facts.md ("Protocol").
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest
from envoy.service.discovery.v3 import discovery_pb2
from google.rpc import status_pb2
from helpers_snapshots import (
    CDS,
    EDS,
    LDS,
    RDS,
    SDS,
    cluster,
    endpoints,
    expected_sotw,
    full,
    listener,
    route,
    secret,
    snap,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from xdsplane.server.sotw import SotwStream
from xdsplane.server.state import Ack, Nack, Outgoing, Subscription
from xdsplane.snapshot import Snapshot, versions_hash
from xdsplane.types import PUSH_ORDER, ResourceType, resource_name

DiscoveryRequest = discovery_pb2.DiscoveryRequest
DiscoveryResponse = discovery_pb2.DiscoveryResponse


def names_of(resp: DiscoveryResponse) -> list[str]:
    rtype = ResourceType(resp.type_url)
    out = []
    for packed in resp.resources:
        assert packed.type_url == rtype.value
        msg = rtype.message_class()
        assert packed.Unpack(msg)
        out.append(resource_name(msg))
    return out


class Client:
    """The Envoy side of one SotW stream: remembers nonces and accepted versions per type."""

    def __init__(self, stream: SotwStream | None = None, node: str = "edge-1") -> None:
        self.stream = stream if stream is not None else SotwStream()
        self.node = node
        self.first = True
        self.nonce: dict[ResourceType, str] = {}
        self.version: dict[ResourceType, str] = {}  # the last version accepted
        self.names: dict[ResourceType, tuple[str, ...]] = {}
        self.log: list[DiscoveryResponse] = []
        self.answer: Ack | Nack | None = None

    def _decode(self, outs: list[Outgoing]) -> list[DiscoveryResponse]:
        got = []
        for o in outs:
            resp = DiscoveryResponse.FromString(o.data)
            assert resp.version_info == o.version
            assert resp.nonce == o.nonce
            assert resp.type_url == o.type.value
            assert len(resp.resources) == o.resources
            self.nonce[o.type] = resp.nonce
            got.append(resp)
        self.log.extend(got)
        return got

    def request(
        self,
        rtype: ResourceType,
        names: Iterable[str] = (),
        *,
        version: str | None = None,
        nonce: str | None = None,
        error: str | None = None,
    ) -> list[DiscoveryResponse]:
        names = tuple(names)
        self.names[rtype] = names
        req = DiscoveryRequest(
            type_url=rtype.value,
            resource_names=names,
            version_info=self.version.get(rtype, "") if version is None else version,
            response_nonce=self.nonce.get(rtype, "") if nonce is None else nonce,
        )
        if self.first:
            req.node.id = self.node
            req.node.cluster = "edge"
            self.first = False
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        step = self.stream.on_request(req)
        self.answer = step.answer  # the machine's judgement of this request (ACK, NACK, None)
        return self._decode(step.responses)

    def ack(self, resp: DiscoveryResponse) -> list[DiscoveryResponse]:
        rtype = ResourceType(resp.type_url)
        self.version[rtype] = resp.version_info
        return self.request(rtype, self.names.get(rtype, ()), nonce=resp.nonce)

    def nack(self, resp: DiscoveryResponse, message: str = "bad") -> list[DiscoveryResponse]:
        rtype = ResourceType(resp.type_url)
        return self.request(rtype, self.names.get(rtype, ()), nonce=resp.nonce, error=message)

    def push(self, snapshot: Snapshot) -> list[DiscoveryResponse]:
        return self._decode(self.stream.on_snapshot(snapshot).responses)

    def ack_all(self, responses: Iterable[DiscoveryResponse]) -> list[DiscoveryResponse]:
        """ACK the latest response of each type (Envoy ACKs older nonces too: stale)."""
        out: list[DiscoveryResponse] = []
        for resp in responses:
            out.extend(self.ack(resp))
        return out


def types_of(responses: Iterable[DiscoveryResponse]) -> list[str]:
    return [ResourceType(r.type_url).short for r in responses]


def subscribe_all(c: Client, snapshot: Snapshot) -> None:
    """Subscribe the way Envoy does (CDS, LDS wildcard, then the named types) and ACK."""
    for rtype, names in (
        (CDS, ()),
        (EDS, tuple(snapshot.of(EDS))),
        (LDS, ()),
        (RDS, tuple(snapshot.of(RDS))),
        (SDS, tuple(snapshot.of(SDS))),
    ):
        if not rtype.wildcard and not names:
            continue
        got = c.request(rtype, names)
        assert len(got) == 1, rtype.short
        assert c.ack(got[0]) == []


# -- first load ------------------------------------------------------------------------------


def test_nothing_is_sent_before_a_snapshot_then_held_requests_are_answered() -> None:
    c = Client()
    assert c.request(CDS) == []
    assert c.request(LDS, nonce="") == []
    assert c.request(RDS, ["routes"]) == []
    got = c.push(full())
    assert types_of(got) == ["CDS", "LDS", "RDS"]
    assert names_of(got[0]) == ["backend"]
    assert names_of(got[1]) == ["http"]
    assert names_of(got[2]) == ["routes"]
    # answered exactly once: ACKs get nothing more
    assert c.ack_all(got) == []
    assert c.push(full()) == []


def test_no_empty_cds_or_lds_before_the_first_load() -> None:
    c = Client()
    for _ in range(3):
        assert c.request(CDS) == []
        assert c.request(LDS) == []
    # an empty snapshot that is actually loaded is served (it is the configured state)
    got = c.push(snap())
    assert types_of(got) == ["CDS", "LDS"]
    assert [len(r.resources) for r in got] == [0, 0]


def test_full_state_cds_and_lds() -> None:
    s = snap(
        cluster("a"),
        cluster("b"),
        cluster("c"),
        listener("l1", port=1),
        listener("l2", port=2),
        route("routes", "a"),
    )
    c = Client()
    c.push(s)
    (cds,) = c.request(CDS)
    assert names_of(cds) == ["a", "b", "c"]
    assert cds.version_info == s.versions[CDS]
    (lds,) = c.request(LDS)
    assert names_of(lds) == ["l1", "l2"]
    assert lds.version_info == s.versions[LDS]
    # "*" is the explicit wildcard
    c2 = Client()
    c2.push(s)
    (cds2,) = c2.request(CDS, ["*"])
    assert names_of(cds2) == ["a", "b", "c"]


def test_unknown_type_is_ignored() -> None:
    c = Client()
    c.push(full())
    req = DiscoveryRequest(type_url="type.googleapis.com/envoy.service.runtime.v3.Runtime")
    assert c.stream.on_request(req).responses == []
    assert "type.googleapis.com/envoy.service.runtime.v3.Runtime" in c.stream.ignored_types


# -- ACK, NACK, stale ------------------------------------------------------------------------


def test_ack_gets_no_reply() -> None:
    c = Client()
    c.push(full())
    (cds,) = c.request(CDS)
    assert c.ack(cds) == []
    # the same ACK repeated (Envoy re-sends on some updates) is still nothing
    assert c.ack(cds) == []
    st = c.stream.types[CDS].status
    assert st.acked_version == cds.version_info
    assert st.responses == 1
    (rds,) = c.request(RDS, ["routes"])
    assert c.ack(rds) == []
    assert c.ack(rds) == []


@pytest.mark.parametrize("rtype", [CDS, LDS, RDS, EDS, SDS])
def test_nack_is_recorded_not_answered_and_not_resent_until_the_snapshot_changes(
    rtype: ResourceType,
) -> None:
    s1 = full(tag=1)
    c = Client()
    c.push(s1)
    names = () if rtype.wildcard else tuple(s1.of(rtype))
    (first,) = c.request(rtype, names)
    assert c.ack(first) == []
    # The next version of this type is rejected.
    bumped = {
        CDS: lambda: full(tag=2),
        LDS: lambda: snap(*_without(full(), LDS), listener("http", "routes", port=10001)),
        RDS: lambda: full(route_prefix="/v2"),
        EDS: lambda: snap(*_without(full(), EDS), endpoints("backend", port=9)),
        SDS: lambda: snap(*_without(full(), SDS), secret("ca", "two")),
    }[rtype]()
    got = c.push(bumped)
    assert [ResourceType(r.type_url) for r in got] == [rtype]
    bad = got[0]
    assert bad.version_info != first.version_info
    assert c.nack(bad, "rejected: field x") == []
    st = c.stream.types[rtype].status
    assert st.nacks == 1
    assert st.last_nack == "rejected: field x"
    assert st.nacked_version == bad.version_info
    assert st.acked_version == first.version_info
    # Envoy keeps asking with the old version: never answered with the NACKed one again.
    assert c.request(rtype, names) == []
    assert c.request(rtype, names, version=first.version_info) == []
    # The same snapshot again, or a snapshot that changes only another type: still nothing.
    assert c.push(bumped) == []
    other = snap(*bumped.resources[rtype].values(), *_other_types_changed(bumped, rtype))
    assert rtype not in [ResourceType(r.type_url) for r in c.push(other)]
    # A real change to this type is sent.
    fixed = snap(*_without(other, rtype), *_variant(rtype))
    got = [r for r in c.push(fixed) if ResourceType(r.type_url) is rtype]
    assert len(got) == 1
    assert got[0].version_info not in (bad.version_info, "")
    assert c.ack(got[0]) == []
    assert c.stream.types[rtype].status.acked_version == got[0].version_info


def _without(s: Snapshot, rtype: ResourceType) -> list:
    return [r for t in PUSH_ORDER if t is not rtype for r in s.of(t).values()]


def _other_types_changed(s: Snapshot, rtype: ResourceType) -> list:
    """Everything but ``rtype``, with one resource of another type changed."""
    rest = _without(s, rtype)
    if rtype is SDS:
        return [r for r in rest if r.type is not CDS] + [cluster("backend", tag=7)]
    return [r for r in rest if r.type is not SDS] + [secret("ca", "other")]


def _variant(rtype: ResourceType) -> list:
    return {
        CDS: [cluster("backend", tag=3)],
        LDS: [listener("http", "routes", port=10002)],
        RDS: [route("routes", "backend", "/v3")],
        EDS: [endpoints("backend", port=10)],
        SDS: [secret("ca", "three")],
    }[rtype]


def test_nack_of_the_first_response_parks_the_type() -> None:
    c = Client()
    c.push(full())
    (cds,) = c.request(CDS)
    assert c.nack(cds, "no") == []
    assert c.stream.types[CDS].status.acked_version == ""
    assert c.request(CDS) == []
    assert c.request(CDS, version="") == []


def test_nack_detected_by_error_detail_not_by_version() -> None:
    """A NACK carries the previous version; an ACK-looking version must not hide it."""
    c = Client()
    c.push(full())
    (cds,) = c.request(CDS)
    # error_detail present although version_info equals the version just sent
    assert c.request(CDS, version=cds.version_info, nonce=cds.nonce, error="boom") == []
    st = c.stream.types[CDS].status
    assert (st.nacks, st.acks, st.last_nack) == (1, 0, "boom")


def test_stale_nonce_is_ignored() -> None:
    c = Client()
    c.push(full(tag=1))
    (old,) = c.request(CDS)
    (new,) = c.push(full(tag=2))[:1]
    assert ResourceType(new.type_url) is CDS
    assert new.nonce != old.nonce
    # A NACK and an ACK of the older response arrive late: both are stale.
    assert c.request(CDS, nonce=old.nonce, error="late nack") == []
    assert c.request(CDS, nonce=old.nonce, version=old.version_info) == []
    st = c.stream.types[CDS].status
    assert (st.nacks, st.last_nack, st.acks) == (0, "", 0)
    assert c.stream.stale == 2
    # Unknown nonces are stale too.
    assert c.request(CDS, nonce="no-such-nonce") == []
    assert c.stream.stale == 3
    # The current nonce is honoured.
    assert c.ack(new) == []
    assert c.stream.types[CDS].status.acked_version == new.version_info


def test_the_machine_returns_the_acks_and_nacks_it_judged() -> None:
    """ACKs and NACKs come out of the machine as events, with its responses: ads.py counts
    and logs them from these (stale nonces are neither)."""
    c = Client()
    s1 = snap(cluster("a"))
    s1.mark_installed(100.0)
    c.push(s1)
    (first,) = c.request(CDS)
    assert c.answer is None  # a subscription, not an answer
    assert c.ack(first) == []
    # a response caused by a request (a new subscription) ends no propagation
    assert c.answer == Ack(CDS, first.version_info, first.nonce, None)
    s2 = snap(cluster("a", 2))
    s2.mark_installed(200.0)
    pushed = c.stream.on_snapshot(s2)
    assert pushed.answer is None
    (second,) = c._decode(pushed.responses)
    assert c.request(CDS, nonce=first.nonce, error="late") == []
    assert c.answer is None  # stale: no NACK
    assert c.nack(second, "bad cluster") == []
    assert c.answer == Nack(CDS, second.version_info, second.nonce, "bad cluster")
    s3 = snap(cluster("a", 3))
    s3.mark_installed(300.0)
    (third,) = c.push(s3)
    assert c.ack(third) == []
    # its response was caused by the change to s3: the ACK carries s3's install time
    assert c.answer == Ack(CDS, third.version_info, third.nonce, 300.0)
    assert c.ack(third) == []
    assert c.answer == Ack(CDS, third.version_info, third.nonce, None)  # ended once
    assert type(c.stream.types[CDS]) is Subscription


def test_stale_request_does_not_change_the_subscription() -> None:
    s = snap(route("a"), route("b"), cluster("backend"))
    c = Client()
    c.push(s)
    (first,) = c.request(RDS, ["a"])
    assert c.request(RDS, ["a", "b"], nonce="stale") == []
    assert c.stream.types[RDS].names == frozenset({"a"})
    (added,) = c.request(RDS, ["a", "b"], nonce=first.nonce)
    # Named types are incremental in SotW: only the newly subscribed "b" goes out, and the
    # version covers everything the client then holds.
    assert names_of(added) == ["b"]
    assert added.version_info == versions_hash(
        (r.name, r.version) for r in (s.of(RDS)["a"], s.of(RDS)["b"])
    )


def test_nonces_are_per_stream_and_never_repeat_within_it() -> None:
    c = Client()
    c.push(full())
    subscribe_all(c, full())
    c.push(full(tag=2, route_prefix="/x"))
    nonces = [r.nonce for r in c.log]
    assert len(nonces) == len(set(nonces))
    assert all(nonces)


# -- names -----------------------------------------------------------------------------------


def test_newly_subscribed_names_are_answered_at_an_unchanged_snapshot() -> None:
    s = snap(cluster("a"), cluster("b"), endpoints("a"), endpoints("b", 9))
    c = Client()
    c.push(s)
    (cds,) = c.request(CDS)
    (eds,) = c.request(EDS, ["a"])
    assert names_of(eds) == ["a"]
    assert c.ack(eds) == []
    (eds2,) = c.request(EDS, ["a", "b"])
    assert names_of(eds2) == ["b"]  # only the new name: EDS is incremental in SotW
    assert eds2.version_info != eds.version_info
    assert c.ack(eds2) == []
    # unsubscribing needs no answer, and re-subscribing is answered again
    assert c.request(EDS, ["a"]) == []
    (eds3,) = c.request(EDS, ["a", "b"])
    assert names_of(eds3) == ["b"]  # the client forgot "b" when it unsubscribed
    assert c.ack(cds) == []


def test_names_that_do_not_exist_are_skipped_not_stalled() -> None:
    s = snap(route("a"), cluster("backend"), secret("ca"))
    c = Client()
    c.push(s)
    (rds,) = c.request(RDS, ["a", "gone"])
    assert names_of(rds) == ["a"]
    assert c.ack(rds) == []
    (sds,) = c.request(SDS, ["old-secret", "ca"])
    assert names_of(sds) == ["ca"]
    assert c.ack(sds) == []
    # a subscription to nothing that exists gets nothing, and is answered when it appears
    assert c.request(EDS, ["backend"]) == []
    got = c.push(snap(route("a"), cluster("backend"), secret("ca"), endpoints("backend")))
    assert types_of(got) == ["EDS"]
    assert names_of(got[0]) == ["backend"]
    # a name appearing later is sent, with what was sent before
    got = c.push(
        snap(route("a"), route("gone"), cluster("backend"), secret("ca"), endpoints("backend"))
    )
    assert types_of(got) == ["RDS"]
    assert names_of(got[0]) == ["gone"]  # "a" is unchanged and already held


def test_named_types_only_push_changes_to_what_the_stream_uses() -> None:
    s1 = snap(route("a"), route("b"), cluster("backend"))
    c = Client()
    c.push(s1)
    (rds,) = c.request(RDS, ["a"])
    assert c.ack(rds) == []
    s2 = snap(route("a"), route("b", prefix="/b2"), cluster("backend"))
    assert s2.versions[RDS] != s1.versions[RDS]
    assert c.push(s2) == []
    s3 = snap(route("a", prefix="/a2"), route("b", prefix="/b2"), cluster("backend"))
    (rds3,) = c.push(s3)
    assert names_of(rds3) == ["a"]


def test_named_version_is_the_hash_of_exactly_what_was_sent() -> None:
    s = snap(route("a"), route("b"), route("c"), cluster("backend"))
    c = Client()
    c.push(s)
    (rds,) = c.request(RDS, ["c", "a"])
    assert rds.version_info == versions_hash((n, s.of(RDS)[n].version) for n in ("a", "c"))


# -- reconnect -------------------------------------------------------------------------------


def _served_versions(s: Snapshot) -> dict[ResourceType, str]:
    c = Client()
    c.push(s)
    subscribe_all(c, s)
    return {ResourceType(r.type_url): r.version_info for r in c.log}


def test_reconnect_with_the_current_version_gets_nothing() -> None:
    s = full()
    held = _served_versions(s)
    c = Client()
    c.push(s)  # ads.py hands the stream its snapshot before the first request
    c.version = dict(held)
    assert c.request(CDS) == []
    assert c.request(LDS) == []
    assert c.request(EDS, ["backend"]) == []
    assert c.request(RDS, ["routes"]) == []
    assert c.request(SDS, ["ca"]) == []
    assert c.log == []
    # ... and the next change is sent as usual
    got = c.push(full(tag=2))
    # the changed EDS cluster is a new cluster in Envoy: its endpoints go out again
    assert types_of(got) == ["CDS", "EDS"]
    assert c.ack(got[0]) == []


def test_reconnect_before_the_snapshot_is_known_gets_nothing_either() -> None:
    s = full()
    held = _served_versions(s)
    c = Client()
    c.version = dict(held)
    assert c.request(CDS) == []
    assert c.request(RDS, ["routes"]) == []
    assert c.push(s) == []


def test_reconnect_with_an_old_version_gets_the_new_one() -> None:
    old = _served_versions(full(tag=1))
    s2 = full(tag=2, route_prefix="/new")
    c = Client()
    c.push(s2)
    c.version = dict(old)
    (cds,) = c.request(CDS)
    assert cds.version_info == s2.versions[CDS]
    assert c.request(EDS, ["backend"]) == []  # endpoints did not change
    assert c.request(LDS) == []
    (rds,) = c.request(RDS, ["routes"])
    assert rds.version_info != old[RDS]
    assert names_of(rds) == ["routes"]


def test_reconnect_with_more_names_than_before_gets_them() -> None:
    s = snap(route("a"), route("b"), cluster("backend"))
    c0 = Client()
    c0.push(s)
    (only_a,) = c0.request(RDS, ["a"])
    c = Client()
    c.push(s)
    c.version[RDS] = only_a.version_info
    (both,) = c.request(RDS, ["a", "b"])
    assert names_of(both) == ["a", "b"]


# -- make-before-break -----------------------------------------------------------------------


def test_snapshot_change_goes_out_in_make_before_break_order() -> None:
    s1 = full(tag=1)
    c = Client()
    c.push(s1)
    # subscribe in an order unlike the push order
    for rtype, names in ((RDS, ["routes"]), (LDS, []), (EDS, ["backend"]), (SDS, ["ca"])):
        (r,) = c.request(rtype, names)
        c.ack(r)
    (r,) = c.request(CDS)
    c.ack(r)
    s2 = snap(
        secret("ca", "two"),
        cluster("backend", 2),
        endpoints("backend", 9),
        listener("http", "routes", port=10001),
        route("routes", "backend", "/v2"),
    )
    got = c.push(s2)
    assert types_of(got) == ["SDS", "CDS", "EDS", "LDS", "RDS"]
    for resp in got:
        assert resp.version_info == s2.versions[ResourceType(resp.type_url)]


def test_removal_from_cds_and_lds_is_two_phase() -> None:
    s1 = snap(
        cluster("a"),
        cluster("b"),
        endpoints("a"),
        endpoints("b"),
        listener("l1", "r1", port=1),
        listener("l2", "r2", port=2),
        route("r1", "a"),
        route("r2", "b"),
    )
    c = Client()
    c.push(s1)
    subscribe_all(c, s1)
    s2 = snap(
        cluster("a"),
        cluster("c"),
        endpoints("a"),
        endpoints("c"),
        listener("l1", "r1", port=1),
        listener("l3", "r3", port=3),
        route("r1", "a"),
        route("r3", "c"),
    )
    got = c.push(s2)
    assert types_of(got) == ["CDS", "LDS", "LDS", "CDS"]
    cds1, lds1, lds2, cds2 = got
    # first the new set plus what goes away ...
    assert names_of(cds1) == ["a", "b", "c"]
    assert names_of(lds1) == ["l1", "l2", "l3"]
    # ... then, after everything else, the final sets (listeners removed before clusters)
    assert names_of(lds2) == ["l1", "l3"]
    assert names_of(cds2) == ["a", "c"]
    assert cds2.version_info == s2.versions[CDS]
    assert lds2.version_info == s2.versions[LDS]
    assert cds1.version_info not in (cds2.version_info, s1.versions[CDS])
    # Envoy then asks for the new names; EDS and RDS for them are answered
    (eds,) = c.request(EDS, ["a", "c"], nonce=c.nonce.get(EDS, ""))
    assert names_of(eds) == ["c"]  # "a" is held already
    (rds,) = c.request(RDS, ["r1", "r3"], nonce=c.nonce.get(RDS, ""))
    assert names_of(rds) == ["r3"]  # "r1" is held already
    # the intermediate responses' ACKs are stale; the final ones are ACKed
    assert c.request(CDS, nonce=cds1.nonce, version=cds1.version_info) == []
    assert c.ack(cds2) == []
    assert c.ack(lds2) == []
    assert c.stream.types[CDS].status.acked_version == s2.versions[CDS]


def test_two_phase_removal_sits_around_the_other_types() -> None:
    s1 = snap(secret("ca"), cluster("a"), cluster("b"), endpoints("a"), route("routes", "a"))
    c = Client()
    c.push(s1)
    subscribe_all(c, s1)
    s2 = snap(secret("ca", "2"), cluster("a", 5), endpoints("a", 1), route("routes", "a", "/x"))
    got = c.push(s2)
    assert types_of(got) == ["SDS", "CDS", "EDS", "RDS", "CDS"]
    assert names_of(got[1]) == ["a", "b"]
    assert names_of(got[-1]) == ["a"]


def test_removal_alone_needs_no_intermediate_response() -> None:
    """The new set plus the removed ones is what the client holds: nothing to send first."""
    s1 = snap(cluster("a"), cluster("b"))
    c = Client()
    c.push(s1)
    (cds,) = c.request(CDS)
    c.ack(cds)
    s2 = snap(cluster("a"))
    got = c.push(s2)
    assert [names_of(r) for r in got] == [["a"]]
    assert got[-1].version_info == s2.versions[CDS]
    # removing everything is a real (empty) full-state response
    got = c.push(snap())
    assert [names_of(r) for r in got] == [[]]
    assert got[0].version_info == snap().versions[CDS]


def test_removal_with_other_changes_goes_last() -> None:
    s1 = snap(cluster("a"), cluster("b"), listener("l", "r"), route("r", "b"))
    c = Client()
    c.push(s1)
    subscribe_all(c, s1)
    s2 = snap(cluster("a"), listener("l", "r"), route("r", "a"))
    got = c.push(s2)
    assert types_of(got) == ["RDS", "CDS"]
    assert names_of(got[-1]) == ["a"]


def test_removal_after_reconnect_is_two_phase() -> None:
    """A stream that reconnected holding the current version knows what the client holds."""
    s1 = snap(cluster("a"), cluster("b"), listener("l1", port=1), listener("l2", port=2))
    held = _served_versions(s1)
    c = Client()
    c.push(s1)
    c.version = dict(held)
    assert c.request(CDS) == []
    assert c.request(LDS) == []
    s2 = snap(cluster("a"), cluster("c"), listener("l1", port=1), listener("l3", port=3))
    got = c.push(s2)
    assert types_of(got) == ["CDS", "LDS", "LDS", "CDS"]
    assert [names_of(r) for r in got] == [
        ["a", "b", "c"],
        ["l1", "l2", "l3"],
        ["l1", "l3"],
        ["a", "c"],
    ]
    # a removal alone after a reconnect: listeners still go before clusters
    c = Client()
    c.push(s1)
    c.version = dict(held)
    assert c.request(CDS) == []
    assert c.request(LDS) == []
    got = c.push(snap(cluster("a"), listener("l1", port=1)))
    assert types_of(got) == ["LDS", "CDS"]


# -- versions and encoding ------------------------------------------------------------------


def test_versions_are_content_hashes() -> None:
    a = full()
    b = full()  # built again from scratch: different objects, same content
    assert a is not b
    assert dict(a.versions) == dict(b.versions)
    assert a.digest == b.digest
    for rtype in PUSH_ORDER:
        for name, r in a.of(rtype).items():
            assert b.of(rtype)[name].version == r.version
            assert b.of(rtype)[name] is not r
    # two independent streams are told the same versions
    assert _served_versions(a) == _served_versions(b)
    # a change moves only the version of its own type
    c = full(tag=2)
    moved = {t for t in PUSH_ORDER if a.versions[t] != c.versions[t]}
    assert moved == {CDS}
    assert a.digest != c.digest


def test_snapshot_versions_do_not_depend_on_resource_order() -> None:
    rs = [cluster("a"), cluster("b"), cluster("c"), route("r"), secret("s"), endpoints("a")]
    fwd = Snapshot.build(rs)
    back = Snapshot.build(list(reversed(rs)))
    assert dict(fwd.versions) == dict(back.versions)
    assert fwd.digest == back.digest
    assert list(fwd.of(CDS)) == list(back.of(CDS)) == ["a", "b", "c"]


def test_resource_version_is_the_deterministic_serialization_hash() -> None:
    from xdsplane.snapshot import digest

    r = cluster("a")
    assert r.version == digest(r.message.SerializeToString(deterministic=True))


def test_empty_types_have_a_version() -> None:
    s = snap()
    assert all(s.versions[t] for t in PUSH_ORDER)
    assert len(set(s.versions.values())) == 1  # the hash of nothing


@pytest.mark.parametrize("count", [0, 1, 3])
def test_joined_bytes_parse_like_a_protobuf_built_response(count: int) -> None:
    clusters = [cluster(f"c{i}", tag=i + 1) for i in range(count)]
    s = snap(*clusters)
    c = Client()
    c.push(s)
    outs = c.stream.on_request(DiscoveryRequest(type_url=CDS.value)).responses
    (o,) = outs
    parsed = DiscoveryResponse.FromString(o.data)
    expected = expected_sotw(CDS, s.versions[CDS], o.nonce, clusters)
    assert parsed == expected
    # and the bytes round-trip through a canonical serialization unchanged
    assert parsed.SerializeToString(deterministic=True) == expected.SerializeToString(
        deterministic=True
    )


def test_joined_bytes_parse_like_protobuf_for_every_type() -> None:
    s = full()
    c = Client()
    c.push(s)
    for rtype in PUSH_ORDER:
        names = [] if rtype.wildcard else list(s.of(rtype))
        outs = c.stream.on_request(
            DiscoveryRequest(type_url=rtype.value, resource_names=names)
        ).responses
        (o,) = outs
        expected = expected_sotw(rtype, o.version, o.nonce, s.of(rtype).values())
        assert DiscoveryResponse.FromString(o.data) == expected


def test_a_revert_after_a_nack_is_sent() -> None:
    """Going back to the accepted content is a change too: the client must hear of it."""
    s1, s2 = full(tag=1), full(tag=2)
    c = Client()
    c.push(s1)
    (cds,) = c.request(CDS)
    c.ack(cds)
    (bad,) = c.push(s2)
    assert c.nack(bad) == []
    (back,) = c.push(s1)
    assert back.version_info == cds.version_info == s1.versions[CDS]
    assert c.ack(back) == []


# -- a random walk through snapshots ---------------------------------------------------------

UNIVERSE_CLUSTERS = ["a", "b", "c"]


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    resources = []
    for name in UNIVERSE_CLUSTERS:
        tag = draw(st.integers(0, 2))
        if tag:
            resources.append(cluster(name, tag))
            resources.append(endpoints(name, 8000 + draw(st.integers(0, 1))))
    for i, name in enumerate(["l1", "l2"]):
        if draw(st.booleans()):
            resources.append(listener(name, f"r-{name}", port=10000 + i))
    for name in ["r-l1", "r-l2"]:
        if draw(st.booleans()):
            resources.append(route(name, "a", draw(st.sampled_from(["/", "/x"]))))
    return snap(*resources)


def _content(resp: DiscoveryResponse) -> dict[str, str]:
    from xdsplane.snapshot import digest

    return dict(zip(names_of(resp), (digest(a.value) for a in resp.resources), strict=True))


@settings(max_examples=150, deadline=None)
@given(st.lists(snapshots(), min_size=1, max_size=6), st.booleans())
def test_random_walk_client_always_converges_and_acks_get_nothing(
    walk: list[Snapshot], reconnect_midway: bool
) -> None:
    eds_names = ("a", "c")
    rds_names = ("r-l1",)
    c = Client()
    view: dict[ResourceType, dict[str, str]] = {t: {} for t in PUSH_ORDER}

    def apply(responses: list[DiscoveryResponse]) -> None:
        pending = list(responses)
        while pending:
            resp = pending.pop(0)
            rtype = ResourceType(resp.type_url)
            if rtype.wildcard:
                view[rtype] = _content(resp)  # full state: what is left out is deleted
            else:
                view[rtype].update(_content(resp))
            if resp.nonce == c.nonce[rtype]:
                assert c.ack(resp) == [], "an ACK was answered"
            else:  # an older response of the same type: its ACK is stale, and ignored
                assert c.request(rtype, c.names[rtype], nonce=resp.nonce) == []

    def subscribe() -> None:
        apply(c.request(CDS))
        apply(c.request(LDS))
        apply(c.request(EDS, eds_names))
        apply(c.request(RDS, rds_names))

    def check(s: Snapshot) -> None:
        assert view[CDS] == {n: r.version for n, r in s.of(CDS).items()}
        assert view[LDS] == {n: r.version for n, r in s.of(LDS).items()}
        for rtype, names in ((EDS, eds_names), (RDS, rds_names)):
            for n in names:
                if n in s.of(rtype):
                    assert view[rtype][n] == s.of(rtype)[n].version

    c.push(walk[0])
    subscribe()
    check(walk[0])
    for i, s in enumerate(walk[1:], 1):
        if reconnect_midway and i == len(walk) // 2:
            # a new stream to a server that already has ``s``: the client says what it holds
            old = c
            c = Client()
            c.version = dict(old.version)
            c.push(s)
            subscribe()
        else:
            apply(c.push(s))
        check(s)
        # once converged, the same snapshot again and a repeated ACK bring nothing
        assert c.push(s) == []


# -- a NACK parks the version for the stream that sent it only --------------------------------


@pytest.mark.parametrize("rtype", [CDS, LDS, RDS, EDS, SDS])
def test_a_nack_on_one_stream_does_not_freeze_another_stream_of_the_same_node(
    rtype: ResourceType,
) -> None:
    """A process that claims a node's id and NACKs (issue 11): the node's other streams, and
    its next one, are still sent the current version; the NACK stays in the node's view."""
    from xdsplane.server.state import NodeMemory

    node = NodeMemory()  # what ads.py gives every stream of one node id (registry.memory)
    current = full(tag=2)
    names = () if rtype.wildcard else tuple(current.of(rtype))
    attacker = Client(SotwStream(node))
    attacker.push(current)
    (got,) = attacker.request(rtype, names)
    assert attacker.nack(got, "rejected on purpose") == []
    assert attacker.request(rtype, names) == []  # parked for the stream that NACKed it
    assert node.as_dict()[rtype.short]["message"] == "rejected on purpose"

    for late in (False, True):  # a stream opened before the NACK's snapshot, and after it
        envoy = Client(SotwStream(node))
        if late:
            envoy.push(current)
            (fresh,) = envoy.request(rtype, names)
        else:
            envoy.push(snap(*_without(current, rtype), *_variant(rtype)))
            envoy.ack_all(envoy.request(rtype, names))
            (fresh,) = envoy.push(current)
        assert fresh.version_info == got.version_info
        assert names_of(fresh) == names_of(got)
        # If it NACKs too, it is parked for that stream as well.
        assert envoy.nack(fresh) == []
        assert envoy.request(rtype, names) == []


# -- a named subscription in sync: pushes and ACKs without a walk of its names ---------------


def _forced_walk(c: Client) -> None:
    """Make every subscription of ``c``'s stream take the walk of all its names (the path
    of before): what the diff path must match."""
    for sub in c.stream.types.values():
        sub.synced = ""


@settings(max_examples=150, deadline=None)
@given(st.lists(snapshots(), min_size=2, max_size=6), st.data())
def test_named_subscriptions_on_the_diff_path_send_what_a_walk_sends(
    walk: list[Snapshot], data: st.DataObject
) -> None:
    """Differential: a stream walked before every push and request against one on the
    diff path; the same responses (type, version_info, resources), with named EDS/RDS
    subscriptions that change midway, ACKs, stale ACKs and NACKs."""
    fast, slow = Client(), Client()

    def content(got: list[DiscoveryResponse]) -> list[object]:
        return [(r.type_url, r.version_info, sorted(_content(r).items())) for r in got]

    def both(f: Callable[[Client], list[DiscoveryResponse]]) -> list[DiscoveryResponse]:
        _forced_walk(slow)
        a, b = f(fast), f(slow)
        assert content(a) == content(b)
        return a

    def answer(got: list[DiscoveryResponse]) -> None:
        for resp in got:
            if data.draw(st.integers(0, 5)) == 0:
                more = both(lambda cl, r=resp: cl.nack(r))  # type: ignore[misc]
            else:
                more = both(lambda cl, r=resp: cl.ack(r))  # type: ignore[misc]
            answer(more)

    eds = data.draw(st.lists(st.sampled_from(["a", "b", "c", "zz"]), unique=True, min_size=1))
    for cl in (fast, slow):
        cl.push(walk[0])
    for rtype, names in ((CDS, ()), (EDS, tuple(eds)), (RDS, ("r-l1",))):
        answer(both(lambda cl, t=rtype, n=names: cl.request(t, n)))  # type: ignore[misc]
    for s in walk[1:]:
        answer(both(lambda cl, s=s: cl.push(s)))  # type: ignore[misc]
        if data.draw(st.booleans()):
            eds = data.draw(st.lists(st.sampled_from(["a", "b", "c"]), unique=True, min_size=1))
            answer(both(lambda cl, n=tuple(eds): cl.request(EDS, n)))  # type: ignore[misc]


class _NoWalk(frozenset[str]):
    """A subscription's names that may be asked about (``in``) but not walked."""

    walked = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        _NoWalk.walked += 1
        return super().__iter__()


def test_a_named_subscription_in_sync_is_not_walked_on_pushes_and_acks() -> None:
    """An Envoy asks for thousands of ClusterLoadAssignments by name and repeats every name
    in each ACK: a push changing one of them, a cluster change (its CLA goes again), and
    their ACKs must not walk the subscription. Two such Envoys share one set of names
    (interned), whose version is hashed once per snapshot for both: the only walks."""
    names = [f"c{i:03d}" for i in range(200)]
    s1 = snap(*[cluster(n) for n in names], *[endpoints(n) for n in names])
    clients = [Client(), Client()]
    for c in clients:
        c.push(s1)
        for rtype, subs in ((CDS, ()), (EDS, names)):
            for resp in c.request(rtype, subs):
                assert c.ack(resp) == []
        assert c.stream.types[EDS].synced == s1.versions[EDS]
    first, second = (c.stream.types[EDS] for c in clients)
    assert first.names is second.names  # interned: one set for both streams
    shared = _NoWalk(first.names)
    first.names = second.names = shared
    _NoWalk.walked = 0
    s2 = snap(
        *s1.of(CDS).values(), *[endpoints(n, 7) if n == "c050" else s1.of(EDS)[n] for n in names]
    )
    s3 = snap(*[cluster(n, 9 if n == "c120" else 1) for n in names], *s2.of(EDS).values())
    for c in clients:
        (got,) = c.push(s2)
        assert names_of(got) == ["c050"]
        assert got.version_info == versions_hash((n, s2.of(EDS)[n].version) for n in names)
        cds, again = c.push(s3)
        assert names_of(again) == ["c120"]  # unchanged, owed with its changed cluster
        assert c.ack(cds) == []
        assert c.ack(again) == []  # every name repeated: compared in C, not walked
    assert _NoWalk.walked == 2  # the version of the name set, once per snapshot
    for c in clients:
        assert c.stream.types[EDS].held == {n: s3.of(EDS)[n].version for n in names}
