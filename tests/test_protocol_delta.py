"""Incremental (delta) ADS protocol rules, driven by a scripted client (no network)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

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
    full,
    listener,
    route,
    secret,
    snap,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from xdsplane.server.delta import DeltaStream
from xdsplane.server.state import Ack, Nack, Outgoing, Subscription
from xdsplane.snapshot import Resource, Snapshot
from xdsplane.types import PUSH_ORDER, ResourceType, resource_name

DeltaRequest = discovery_pb2.DeltaDiscoveryRequest
DeltaResponse = discovery_pb2.DeltaDiscoveryResponse


def added(resp: DeltaResponse) -> dict[str, str]:
    """name -> version of the resources in a response, checking each one's envelope."""
    rtype = ResourceType(resp.type_url)
    out = {}
    for r in resp.resources:
        msg = rtype.message_class()
        assert r.resource.Unpack(msg)
        assert resource_name(msg) == r.name
        assert r.version
        out[r.name] = r.version
    return out


def short(responses: Iterable[DeltaResponse]) -> list[str]:
    return [ResourceType(r.type_url).short for r in responses]


class Client:
    """The Envoy side of one delta stream: what it holds per type, the latest nonces."""

    def __init__(self, stream: DeltaStream | None = None) -> None:
        self.stream = stream if stream is not None else DeltaStream()
        self.first = True
        self.nonce: dict[ResourceType, str] = {}
        self.held: dict[ResourceType, dict[str, str]] = {t: {} for t in PUSH_ORDER}
        self.log: list[DeltaResponse] = []
        self.answer: Ack | Nack | None = None

    def _decode(self, outs: list[Outgoing]) -> list[DeltaResponse]:
        got = []
        for o in outs:
            resp = DeltaResponse.FromString(o.data)
            assert resp.nonce == o.nonce
            assert resp.system_version_info == o.version
            assert resp.type_url == o.type.value
            assert (len(resp.resources), len(resp.removed_resources)) == (o.resources, o.removed)
            self.nonce[o.type] = resp.nonce
            held = self.held[o.type]
            held.update(added(resp))
            for name in resp.removed_resources:
                held.pop(name, None)
            got.append(resp)
        self.log.extend(got)
        return got

    def request(
        self,
        rtype: ResourceType,
        subscribe: Iterable[str] = (),
        unsubscribe: Iterable[str] = (),
        *,
        nonce: str | None = None,
        initial: Mapping[str, str] | None = None,
        error: str | None = None,
    ) -> list[DeltaResponse]:
        req = DeltaRequest(
            type_url=rtype.value,
            resource_names_subscribe=list(subscribe),
            resource_names_unsubscribe=list(unsubscribe),
            response_nonce=self.nonce.get(rtype, "") if nonce is None else nonce,
            initial_resource_versions=dict(initial or {}),
        )
        if self.first:
            req.node.id = "edge-1"
            self.first = False
        if error is not None:
            req.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        step = self.stream.on_request(req)
        self.answer = step.answer  # the machine's judgement of this request (ACK, NACK, None)
        return self._decode(step.responses)

    def ack(self, resp: DeltaResponse) -> list[DeltaResponse]:
        return self.request(ResourceType(resp.type_url), nonce=resp.nonce)

    def nack(self, resp: DeltaResponse, message: str = "bad") -> list[DeltaResponse]:
        return self.request(ResourceType(resp.type_url), nonce=resp.nonce, error=message)

    def push(self, snapshot: Snapshot) -> list[DeltaResponse]:
        return self._decode(self.stream.on_snapshot(snapshot).responses)


def versions(s: Snapshot, rtype: ResourceType) -> dict[str, str]:
    return {n: r.version for n, r in s.of(rtype).items()}


# -- first load ------------------------------------------------------------------------------


def test_nothing_before_a_snapshot_then_held_requests_are_answered() -> None:
    c = Client()
    assert c.request(CDS) == []
    assert c.request(LDS) == []
    assert c.request(RDS, ["routes"]) == []
    s = full()
    got = c.push(s)
    assert short(got) == ["CDS", "LDS", "RDS"]
    assert added(got[0]) == versions(s, CDS)
    assert added(got[1]) == versions(s, LDS)
    assert added(got[2]) == versions(s, RDS)
    for resp in got:
        assert list(resp.removed_resources) == []
        assert c.ack(resp) == []


def test_first_wildcard_request_is_answered_even_when_empty_but_only_after_a_snapshot() -> None:
    c = Client()
    assert c.request(LDS) == []
    s = snap(cluster("a"))  # no listeners at all
    (lds,) = c.push(s)
    assert lds.type_url == LDS.value
    assert list(lds.resources) == [] and list(lds.removed_resources) == []
    assert lds.system_version_info == s.versions[LDS]
    assert c.ack(lds) == []
    # only once: a later unrelated change sends no empty LDS again
    assert short(c.push(snap(cluster("a", 2)))) == []
    # a request arriving after the snapshot is answered at once, also when empty
    c2 = Client()
    c2.push(s)
    (lds2,) = c2.request(LDS, ["*"])
    assert list(lds2.resources) == []
    assert c2.ack(lds2) == []


def test_named_subscription_to_nothing_gets_no_empty_answer() -> None:
    c = Client()
    c.push(snap(cluster("a")))
    assert c.request(EDS, ["a"]) == []
    got = c.push(snap(cluster("a"), endpoints("a")))
    assert short(got) == ["EDS"]
    assert list(added(got[0])) == ["a"]


def test_wildcard_cds_sends_every_resource_with_its_own_version() -> None:
    s = snap(cluster("a"), cluster("b", 2), cluster("c", 3))
    c = Client()
    c.push(s)
    (cds,) = c.request(CDS)
    assert added(cds) == versions(s, CDS)
    assert len(set(added(cds).values())) == 3
    assert cds.system_version_info == s.versions[CDS]


# -- ACK, NACK, stale ------------------------------------------------------------------------


def test_ack_gets_no_reply() -> None:
    c = Client()
    c.push(full())
    (cds,) = c.request(CDS)
    assert c.ack(cds) == []
    assert c.ack(cds) == []
    st = c.stream.types[CDS].status
    # the latest nonce may be ACKed again (it is not stale), and is still not answered
    assert st.acks == 2 and st.acked_version == full().versions[CDS]
    assert c.stream.stale == 0
    (rds,) = c.request(RDS, ["routes"])
    assert c.ack(rds) == []


@pytest.mark.parametrize("rtype", [CDS, LDS, EDS, RDS, SDS])
def test_nack_is_recorded_and_the_nacked_version_is_not_resent(rtype: ResourceType) -> None:
    s1 = full()
    c = Client()
    c.push(s1)
    (first,) = c.request(rtype, [] if rtype.wildcard else list(s1.of(rtype)))
    assert c.ack(first) == []
    bad_resource = {
        CDS: cluster("backend", 9),
        LDS: listener("http", "routes", port=1),
        EDS: endpoints("backend", 1),
        RDS: route("routes", "backend", "/bad"),
        SDS: secret("ca", "bad"),
    }[rtype]
    s2 = snap(*_replace(s1, bad_resource))
    (bad,) = c.push(s2)
    assert added(bad) == {bad_resource.name: bad_resource.version}
    assert c.nack(bad, "invalid thing") == []
    st = c.stream.types[rtype].status
    assert (st.nacks, st.last_nack, st.nacked_version) == (1, "invalid thing", s2.versions[rtype])
    # nothing is resent: not on another request, not on an unrelated snapshot change
    assert c.request(rtype) == []
    unrelated = secret("other") if rtype is not SDS else cluster("other")
    got = c.push(snap(*_replace(s2, unrelated)))
    assert rtype.value not in [r.type_url for r in got]
    # a change of the rejected resource is sent
    good_resource = {
        CDS: cluster("backend", 3),
        LDS: listener("http", "routes", port=2),
        EDS: endpoints("backend", 2),
        RDS: route("routes", "backend", "/good"),
        SDS: secret("ca", "good"),
    }[rtype]
    got = c.push(snap(*_replace(s2, unrelated, good_resource)))
    mine = [r for r in got if r.type_url == rtype.value]
    assert [added(r) for r in mine] == [{good_resource.name: good_resource.version}]


def _replace(s: Snapshot, *new: Resource) -> list[Resource]:
    keys = {(r.type, r.name) for r in new}
    kept = [r for t in PUSH_ORDER for r in s.of(t).values() if (t, r.name) not in keys]
    return [*kept, *new]


def test_stale_nonce_is_ignored_but_subscription_changes_count() -> None:
    s = snap(route("a"), route("b"), cluster("backend"))
    c = Client()
    c.push(s)
    assert len(c.request(RDS, ["a"])) == 1
    # a NACK with a stale nonce is not recorded
    assert c.request(RDS, nonce="stale", error="old news") == []
    st = c.stream.types[RDS].status
    assert (st.nacks, st.last_nack) == (0, "")
    assert c.stream.stale == 1
    # a subscription carried by a stale-nonce request is still a delta to apply
    (b,) = c.request(RDS, ["b"], nonce="stale")
    assert added(b) == {"b": s.of(RDS)["b"].version}
    assert c.ack(b) == []
    assert c.stream.types[RDS].status.acks == 1


def test_the_machine_returns_the_acks_and_nacks_it_judged() -> None:
    """As in SotW: ACKs and NACKs are events the machine returns; a stale nonce is neither,
    and only a response caused by a snapshot change carries its install time."""
    c = Client()
    s1 = snap(cluster("a"))
    s1.mark_installed(100.0)
    c.push(s1)
    (first,) = c.request(CDS)
    assert c.answer is None
    assert c.ack(first) == []
    assert c.answer == Ack(CDS, first.system_version_info, first.nonce, None)
    s2 = snap(cluster("a", 2))
    s2.mark_installed(200.0)
    (second,) = c.push(s2)
    assert c.request(CDS, nonce=first.nonce, error="late") == []
    assert c.answer is None
    assert c.nack(second, "bad cluster") == []
    assert c.answer == Nack(CDS, second.system_version_info, second.nonce, "bad cluster")
    s3 = snap(cluster("a", 3))
    s3.mark_installed(300.0)
    (third,) = c.push(s3)
    assert c.ack(third) == []
    assert c.answer == Ack(CDS, third.system_version_info, third.nonce, 300.0)
    assert type(c.stream.types[CDS]) is Subscription


# -- reconnect: initial_resource_versions ---------------------------------------------------


def test_initial_resource_versions_are_honoured() -> None:
    s = snap(cluster("a"), cluster("b", 2), cluster("c", 3))
    c = Client()
    c.push(s)
    held = {"a": s.of(CDS)["a"].version, "b": "stale-version", "gone": "whatever"}
    (cds,) = c.request(CDS, initial=held)
    # what matches is skipped, what differs or is new is sent, what no longer exists is removed
    assert added(cds) == {"b": s.of(CDS)["b"].version, "c": s.of(CDS)["c"].version}
    assert list(cds.removed_resources) == ["gone"]
    assert c.ack(cds) == []


def test_reconnect_holding_everything_gets_nothing() -> None:
    """A reconnecting client names what it holds: it is not initializing, so it gets no
    empty answer (Envoy would count one as update_success)."""
    s = full()
    c = Client()
    c.push(s)
    assert c.request(CDS, initial=versions(s, CDS)) == []
    assert c.request(LDS, ["*"], initial=versions(s, LDS)) == []
    # named types: nothing at all
    assert c.request(EDS, ["backend"], initial=versions(s, EDS)) == []
    assert c.request(RDS, ["routes"], initial=versions(s, RDS)) == []
    assert c.request(SDS, ["ca"], initial=versions(s, SDS)) == []


def test_reconnect_named_type_removes_what_no_longer_exists() -> None:
    s = snap(route("a"), cluster("backend"))
    c = Client()
    c.push(s)
    (rds,) = c.request(RDS, ["a", "old"], initial={"a": s.of(RDS)["a"].version, "old": "v-old"})
    assert added(rds) == {}
    assert list(rds.removed_resources) == ["old"]


def test_initial_resource_versions_only_count_on_the_first_request() -> None:
    s = snap(cluster("a"))
    c = Client()
    c.push(s)
    (cds,) = c.request(CDS)
    assert c.request(CDS, nonce=cds.nonce, initial={"zzz": "1"}) == []


# -- subscriptions ---------------------------------------------------------------------------


def test_subscribe_and_unsubscribe() -> None:
    s1 = snap(route("a"), route("b"), route("c"), cluster("backend"))
    c = Client()
    c.push(s1)
    (ab,) = c.request(RDS, ["a", "b"])
    assert set(added(ab)) == {"a", "b"}
    assert c.ack(ab) == []
    # adding a name sends only that one
    (only_c,) = c.request(RDS, ["c"])
    assert set(added(only_c)) == {"c"}
    c.ack(only_c)
    # unsubscribing needs no answer
    assert c.request(RDS, unsubscribe=["b"]) == []
    assert c.stream.types[RDS].names == {"a", "c"}
    # changes to an unsubscribed resource are not sent
    s2 = snap(route("a"), route("b", prefix="/b2"), route("c"), cluster("backend"))
    assert c.push(s2) == []
    # subscribing again sends it again (the client forgot it)
    (b,) = c.request(RDS, ["b"])
    assert added(b) == {"b": s2.of(RDS)["b"].version}
    # a removed subscribed resource is removed, an unsubscribed one is not mentioned
    c.request(RDS, unsubscribe=["c"], nonce=b.nonce)
    got = c.push(snap(route("a"), cluster("backend")))
    assert short(got) == ["RDS"]
    assert added(got[0]) == {}
    assert list(got[0].removed_resources) == ["b"]


def test_wildcard_unsubscribe() -> None:
    s = snap(cluster("a"), cluster("b"))
    c = Client()
    c.push(s)
    (cds,) = c.request(CDS)
    c.ack(cds)
    assert c.request(CDS, unsubscribe=["*"]) == []
    assert c.stream.types[CDS].wildcard is False
    assert c.push(snap(cluster("a", 2), cluster("b"), cluster("c"))) == []


# -- snapshot changes ------------------------------------------------------------------------


def test_only_changed_resources_are_sent_on_a_snapshot_change() -> None:
    s1 = snap(cluster("a"), cluster("b"), cluster("c"), endpoints("a"), endpoints("b"))
    c = Client()
    c.push(s1)
    for resp in [*c.request(CDS), *c.request(EDS, ["a", "b"])]:
        c.ack(resp)
    s2 = snap(cluster("a"), cluster("b", 2), cluster("c"), endpoints("a", 5), endpoints("b"))
    got = c.push(s2)
    assert short(got) == ["CDS", "EDS"]
    assert added(got[0]) == {"b": s2.of(CDS)["b"].version}
    # "a" changed; "b" is unchanged but its cluster changed, and Envoy's new cluster warms
    # until it gets its endpoints again
    assert added(got[1]) == {"a": s2.of(EDS)["a"].version, "b": s2.of(EDS)["b"].version}
    assert all(not r.removed_resources for r in got)
    assert got[0].system_version_info == s2.versions[CDS]
    # the same snapshot again: nothing
    assert c.push(s2) == []
    assert c.push(snap(*reversed(_replace(s2)))) == []


def test_removals_go_after_all_additions_in_reverse_order() -> None:
    s1 = snap(
        secret("ca"),
        cluster("a"),
        cluster("old"),
        endpoints("a"),
        endpoints("old"),
        listener("l", "r"),
        listener("l-old", "r-old", port=2),
        route("r", "old"),
        route("r-old", "old"),
    )
    c = Client()
    c.push(s1)
    for rtype, names in (
        (CDS, []),
        (EDS, ["a", "old"]),
        (LDS, []),
        (RDS, ["r", "r-old"]),
        (SDS, ["ca"]),
    ):
        for resp in c.request(rtype, names):
            c.ack(resp)
    s2 = snap(
        secret("ca", "2"),
        cluster("a"),
        cluster("new"),
        endpoints("a"),
        endpoints("new"),
        listener("l", "r"),
        route("r", "new"),
    )
    got = c.push(s2)
    # additions in push order (EDS "new" is not subscribed yet), then removals in reverse
    assert short(got) == ["SDS", "CDS", "RDS", "RDS", "LDS", "EDS", "CDS"]
    sds, cds_add, rds_add, rds_rm, lds_rm, eds_rm, cds_rm = got
    assert added(cds_add) == {"new": s2.of(CDS)["new"].version}
    assert added(rds_add) == {"r": s2.of(RDS)["r"].version}
    for resp in (sds, cds_add, rds_add):
        assert list(resp.removed_resources) == []
    for resp, gone in ((rds_rm, "r-old"), (lds_rm, "l-old"), (eds_rm, "old"), (cds_rm, "old")):
        assert added(resp) == {}
        assert list(resp.removed_resources) == [gone]


def test_secrets_are_never_removed() -> None:
    s1 = snap(secret("ca"), secret("cert"))
    c = Client()
    c.push(s1)
    (sds,) = c.request(SDS, ["ca", "cert"])
    c.ack(sds)
    assert c.push(snap(secret("cert"))) == []
    # not on reconnect either
    c2 = Client()
    c2.push(snap(secret("cert")))
    assert c2.request(SDS, ["ca", "cert"], initial=versions(s1, SDS)) == []
    # and a secret that comes back with other content is sent
    (back,) = c.push(snap(secret("ca", "new"), secret("cert")))
    assert set(added(back)) == {"ca"}


# -- versions and encoding ------------------------------------------------------------------


def test_resource_versions_match_across_independent_snapshots_and_streams() -> None:
    a, b = full(), full()
    ca, cb = Client(), Client()
    ca.push(a)
    cb.push(b)
    ra = [*ca.request(CDS), *ca.request(LDS)]
    rb = [*cb.request(CDS), *cb.request(LDS)]
    assert [added(r) for r in ra] == [added(r) for r in rb]
    assert [r.system_version_info for r in ra] == [r.system_version_info for r in rb]
    # and a client that reconnects to the other replica holding those versions gets nothing new
    c = Client()
    c.push(b)
    assert c.request(CDS, initial=ca.held[CDS]) == []


def test_joined_bytes_parse_like_a_protobuf_built_response() -> None:
    s1 = snap(cluster("a"), cluster("b"), cluster("gone"))
    c = Client()
    c.push(s1)
    (cds,) = c.request(CDS)
    c.ack(cds)
    s2 = snap(cluster("a", 4), cluster("b"), cluster("c"))
    outs = c.stream.on_snapshot(s2).responses
    # removals come in their own response after the additions
    assert [(o.resources, o.removed) for o in outs] == [(2, 0), (0, 1)]
    for o in outs:
        expected = DeltaResponse(
            system_version_info=s2.versions[CDS], type_url=CDS.value, nonce=o.nonce
        )
        if o.resources:
            for name in ("a", "c"):
                r = s2.of(CDS)[name]
                res = expected.resources.add(name=name, version=r.version)
                res.resource.Pack(r.message)
        else:
            expected.removed_resources.append("gone")
        assert DeltaResponse.FromString(o.data) == expected


def test_a_revert_after_a_nack_is_sent() -> None:
    s1 = snap(cluster("a", 1))
    c = Client()
    c.push(s1)
    (cds,) = c.request(CDS)
    c.ack(cds)
    (bad,) = c.push(snap(cluster("a", 2)))
    assert c.nack(bad) == []
    (back,) = c.push(s1)
    assert added(back) == versions(s1, CDS)


# -- a random walk through snapshots ---------------------------------------------------------


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshot:
    resources = []
    for name in ("a", "b", "c"):
        tag = draw(st.integers(0, 2))
        if tag:
            resources.append(cluster(name, tag))
            resources.append(endpoints(name, 8000 + draw(st.integers(0, 1))))
    for i, name in enumerate(("l1", "l2")):
        if draw(st.booleans()):
            resources.append(listener(name, "r", port=10000 + i))
    if draw(st.booleans()):
        resources.append(route("r", "a", draw(st.sampled_from(["/", "/x"]))))
    for name in ("s1", "s2"):
        if draw(st.booleans()):
            resources.append(secret(name, draw(st.sampled_from(["x", "y"]))))
    return snap(*resources)


@settings(max_examples=150, deadline=None)
@given(st.lists(snapshots(), min_size=1, max_size=6), st.booleans())
def test_random_walk_client_holds_exactly_the_snapshot(
    walk: list[Snapshot], reconnect_midway: bool
) -> None:
    named = {EDS: ["a", "c"], RDS: ["r"], SDS: ["s1", "s2"]}
    c = Client()

    def ack_all(responses: list[DeltaResponse]) -> None:
        for resp in responses:
            rtype = ResourceType(resp.type_url)
            assert c.request(rtype, nonce=resp.nonce) == [], "an ACK was answered"

    def subscribe(initial: bool) -> None:
        for rtype in PUSH_ORDER:
            subs = named.get(rtype, [])
            held = dict(c.held[rtype]) if initial else None
            ack_all(c.request(rtype, subs, initial=held))

    def check(s: Snapshot) -> None:
        for rtype in (CDS, LDS):
            assert c.held[rtype] == versions(s, rtype), rtype.short
        for rtype in (EDS, RDS):
            want = {n: v for n, v in versions(s, rtype).items() if n in named[rtype]}
            assert c.held[rtype] == want, rtype.short
        # secrets are never removed: what exists is current, what is gone may linger
        for n, v in versions(s, SDS).items():
            assert c.held[SDS][n] == v

    c.push(walk[0])
    subscribe(initial=False)
    check(walk[0])
    for i, s in enumerate(walk[1:], 1):
        if reconnect_midway and i == len(walk) // 2:
            old = c
            c = Client()
            c.held = {t: dict(v) for t, v in old.held.items()}
            c.push(s)
            subscribe(initial=True)
        else:
            ack_all(c.push(s))
        check(s)
        assert c.push(s) == []


# -- a NACK parks the version for the stream that sent it only --------------------------------


@pytest.mark.parametrize("rtype", [CDS, LDS, EDS, RDS, SDS])
def test_a_nack_on_one_stream_does_not_freeze_another_stream_of_the_same_node(
    rtype: ResourceType,
) -> None:
    """A process that claims a node's id and NACKs (issue 11): the node's other streams, and
    its next one, are still sent the current version; the NACK stays in the node's view."""
    from xdsplane.server.state import NodeMemory

    node = NodeMemory()  # what ads.py gives every stream of one node id (registry.memory)
    s1 = full()
    names = [] if rtype.wildcard else list(s1.of(rtype))
    changed = {
        CDS: cluster("backend", 9),
        LDS: listener("http", "routes", port=1),
        EDS: endpoints("backend", 1),
        RDS: route("routes", "backend", "/new"),
        SDS: secret("ca", "new"),
    }[rtype]
    s2 = snap(*_replace(s1, changed))
    attacker = Client(DeltaStream(node))
    attacker.push(s2)
    (got,) = attacker.request(rtype, names)
    assert attacker.nack(got, "rejected on purpose") == []
    assert attacker.request(rtype) == []  # parked for the stream that NACKed it
    assert node.as_dict()[rtype.short]["message"] == "rejected on purpose"

    # The real Envoy's stream, opened before the change: the change is pushed to it.
    envoy = Client(DeltaStream(node))
    envoy.push(s1)
    (first,) = envoy.request(rtype, names)
    assert envoy.ack(first) == []
    (pushed,) = envoy.push(s2)
    assert added(pushed) == {changed.name: changed.version}
    # A new stream of the same node: sent the current version; if it NACKs, parked too.
    again = Client(DeltaStream(node))
    again.push(s2)
    (fresh,) = again.request(rtype, names)
    assert added(fresh)[changed.name] == changed.version
    assert again.nack(fresh) == []
    assert again.request(rtype) == []


# -- a named subscription in sync gets the shared diff, not a scan of its names ---------------


class _NoScan(frozenset[str]):
    """A stream's subscribed names that may be asked about (``in``) but not walked."""

    walked = 0

    def __iter__(self):  # type: ignore[no-untyped-def]
        _NoScan.walked += 1
        return super().__iter__()


def test_a_named_subscription_in_sync_is_not_scanned_on_a_snapshot_change() -> None:
    """An Envoy subscribes to EDS (and RDS) by name, thousands of names: a change to one
    cluster must cost it what changed, not a walk and sort of every name it holds. Its
    subscribed names are replaced by a set that counts walks; pushes that change one CLA,
    one cluster (its CLA goes again, unchanged), and remove one go out without any walk,
    with what a full scan would send."""
    names = [f"c{i:03d}" for i in range(200)]
    s1 = snap(*[cluster(n) for n in names], *[endpoints(n) for n in names])
    c = Client()
    c.push(s1)
    for resp in [*c.request(CDS), *c.request(EDS, names)]:
        c.ack(resp)
    eds = c.stream.types[EDS]
    assert eds.synced == s1.versions[EDS]
    eds.names = _NoScan(eds.names)
    _NoScan.walked = 0
    s2 = snap(
        *s1.of(CDS).values(),
        *[endpoints(n, 7) if n == "c050" else s1.of(EDS)[n] for n in names],
    )
    got = c.push(s2)
    assert short(got) == ["EDS"] and set(added(got[0])) == {"c050"}
    s3 = snap(*[cluster(n, 9 if n == "c120" else 1) for n in names], *s2.of(EDS).values())
    got = c.push(s3)
    assert short(got) == ["CDS", "EDS"] and set(added(got[1])) == {"c120"}  # resent, unchanged
    keep = [n for n in names if n != "c199"]
    s4 = snap(*[s3.of(CDS)[n] for n in keep], *[s3.of(EDS)[n] for n in keep])
    got = c.push(s4)
    assert [r.removed_resources for r in got] == [["c199"], ["c199"]]
    assert _NoScan.walked == 0
    assert c.held[EDS] == {n: s4.of(EDS)[n].version for n in keep}
    assert dict(c.stream.types[EDS].held) == c.held[EDS]


@settings(max_examples=150, deadline=None)
@given(st.lists(snapshots(), min_size=2, max_size=6), st.data())
def test_named_streams_on_the_diff_path_send_what_a_scan_sends(
    walk: list[Snapshot], data: st.DataObject
) -> None:
    """Differential: a stream whose subscriptions are never in sync (``synced`` cleared
    before every push, so every push is a scan, the path of before) and a stream on the diff
    path get the same responses (resources and removals per type, in order), after any
    walk of snapshots with named, wildcard and mixed subscriptions, ACKs and some NACKs."""
    eds_names = data.draw(st.lists(st.sampled_from(["a", "b", "c", "zz"]), unique=True))
    rds_wild = data.draw(st.booleans())
    fast, slow = Client(), Client()

    def content(got: list[DeltaResponse]) -> list[object]:
        return [(r.type_url, sorted(added(r).items()), sorted(r.removed_resources)) for r in got]

    def both(f: Callable[[Client], list[DeltaResponse]]) -> list[DeltaResponse]:
        a, b = f(fast), f(slow)
        assert content(a) == content(b)
        return a

    for cl in (fast, slow):
        cl.push(walk[0])
    for rtype, subs in ((CDS, []), (EDS, eds_names), (RDS, ["*", "r"] if rds_wild else ["r"])):
        for resp in both(lambda cl, t=rtype, s=subs: cl.request(t, s)):
            both(lambda cl, r=resp: cl.ack(r))  # type: ignore[misc]
    for s in walk[1:]:
        for t in slow.stream.types.values():
            t.synced = ""
        got = both(lambda cl, s=s: cl.push(s))  # type: ignore[misc]
        nack = data.draw(st.booleans()) and got
        for i, resp in enumerate(got):
            if nack and i == 0:
                both(lambda cl, r=resp: cl.nack(r))  # type: ignore[misc]
            else:
                both(lambda cl, r=resp: cl.ack(r))  # type: ignore[misc]
    assert fast.held == slow.held
