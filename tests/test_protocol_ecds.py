"""ECDS (TypedExtensionConfig) over ADS, SotW and delta, driven by scripted clients.

Envoy subscribes to a filter configuration by the filter's name once a listener names it;
the type is never a wildcard. The rules of shared/design/envoy-xds-facts.md for named types
apply: answer exactly the names asked that exist (skip the others, do not stall), push only
changes to what a stream uses, never resend a NACKed version; plus the order (a filter
configuration goes out before the listeners that use it) and, in delta, never a removal
(a draining listener may still use the configuration).
"""

from __future__ import annotations

from helpers_snapshots import ECDS, LDS, RDS, extension, full, listener, route, snap
from test_protocol_delta import Client as DeltaClient
from test_protocol_delta import added, short
from test_protocol_sotw import Client as SotwClient
from test_protocol_sotw import names_of, types_of

from xdsplane.snapshot import Snapshot, versions_hash
from xdsplane.types import PUSH_ORDER, ResourceType

JWT = "envoy.filters.http.jwt_authn"


def test_the_type() -> None:
    assert ECDS.value == "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig"
    assert ECDS.short == "ECDS" and not ECDS.wildcard and ECDS.kept
    # configurations before the listeners that name them, after what listeners warm on
    assert PUSH_ORDER.index(ECDS) == PUSH_ORDER.index(LDS) - 1
    assert ResourceType.from_url(ECDS.value) is ECDS


def two(tag: str = "one", other: str = "one") -> Snapshot:
    return snap(extension(JWT, tag), extension("other", other), listener("http"), route("routes"))


# -- SotW ------------------------------------------------------------------------------------


def test_sotw_answers_exactly_the_names_asked_that_exist() -> None:
    s = two()
    c = SotwClient()
    c.push(s)
    (resp,) = c.request(ECDS, [JWT, "missing"])
    assert names_of(resp) == [JWT]
    assert resp.version_info == versions_hash([(JWT, s.of(ECDS)[JWT].version)])
    assert c.ack(resp) == []
    # a reconnecting client that holds this version is sent nothing
    again = SotwClient()
    again.push(s)
    assert again.request(ECDS, [JWT], version=resp.version_info) == []


def test_sotw_pushes_only_changes_to_what_the_stream_uses() -> None:
    c = SotwClient()
    c.push(two())
    (resp,) = c.request(ECDS, [JWT])
    c.ack(resp)
    assert c.push(two(other="two")) == []  # a configuration this Envoy does not use
    (changed,) = c.push(two(tag="two", other="two"))
    assert types_of([changed]) == ["ECDS"] and names_of(changed) == [JWT]
    assert c.ack(changed) == []


def test_sotw_sends_a_changed_configuration_before_listeners_and_routes() -> None:
    c = SotwClient()
    s1 = snap(extension(JWT), listener("http"), route("routes"))
    c.push(s1)
    for rtype, names in ((LDS, ()), (RDS, ("routes",)), (ECDS, (JWT,))):
        (resp,) = c.request(rtype, names)
        c.ack(resp)
    s2 = snap(extension(JWT, "two"), listener("http", port=10001), route("routes", prefix="/x"))
    got = c.push(s2)
    assert types_of(got) == ["ECDS", "LDS", "RDS"]


def test_sotw_a_nacked_configuration_is_not_sent_again() -> None:
    c = SotwClient()
    c.push(two())
    (resp,) = c.request(ECDS, [JWT])
    c.ack(resp)
    (bad,) = c.push(two(tag="bad"))
    assert c.nack(bad, "invalid jwks") == []
    assert c.stream.types[ECDS].status.last_nack == "invalid jwks"
    assert c.push(two(tag="bad", other="two")) == []  # still the rejected configuration
    (fixed,) = c.push(two(tag="fixed"))
    assert names_of(fixed) == [JWT]


def test_sotw_unsubscribed_configurations_are_not_pushed() -> None:
    c = SotwClient()
    c.push(two())
    (resp,) = c.request(ECDS, [JWT])
    c.ack(resp)
    assert c.request(ECDS, [], nonce=resp.nonce) == []  # the listener went away
    assert c.push(two(tag="two")) == []


# -- delta -----------------------------------------------------------------------------------


def test_delta_answers_exactly_the_names_asked_that_exist() -> None:
    s = two()
    c = DeltaClient()
    c.push(s)
    (resp,) = c.request(ECDS, [JWT, "missing"])
    assert added(resp) == {JWT: s.of(ECDS)[JWT].version}
    assert list(resp.removed_resources) == []
    assert c.ack(resp) == []
    assert c.push(two(other="two")) == []
    (changed,) = c.push(two(tag="two", other="two"))
    assert list(added(changed)) == [JWT]


def test_delta_reconnect_with_the_held_version_gets_nothing() -> None:
    s = two()
    version = s.of(ECDS)[JWT].version
    c = DeltaClient()
    c.push(s)
    assert c.request(ECDS, [JWT], initial={JWT: version}) == []
    stale = DeltaClient()
    stale.push(s)
    (resp,) = stale.request(ECDS, [JWT], initial={JWT: "old"})
    assert added(resp) == {JWT: version}


def test_delta_sends_a_changed_configuration_before_listeners_and_routes() -> None:
    c = DeltaClient()
    c.push(snap(extension(JWT), listener("http"), route("routes")))
    for rtype, names in ((LDS, ()), (RDS, ("routes",)), (ECDS, (JWT,))):
        (resp,) = c.request(rtype, names)
        c.ack(resp)
    got = c.push(
        snap(extension(JWT, "two"), listener("http", port=10001), route("routes", prefix="/x"))
    )
    assert short(got) == ["ECDS", "LDS", "RDS"]


def test_delta_never_removes_a_configuration() -> None:
    """The listener goes: it is removed, its filter configuration is not (the listener may
    still be draining); Envoy unsubscribes when it no longer needs it."""
    c = DeltaClient()
    c.push(full())
    for rtype, names in ((LDS, ()), (ECDS, (JWT,))):
        (resp,) = c.request(rtype, names)
        c.ack(resp)
    got = c.push(snap(route("routes")))
    assert short(got) == ["LDS"]
    assert list(got[0].removed_resources) == ["http"]
    assert c.held[ECDS] == {JWT: full().of(ECDS)[JWT].version}
    # unsubscribing needs no answer
    assert c.request(ECDS, unsubscribe=[JWT]) == []
