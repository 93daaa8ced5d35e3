"""SotW as gRPC's xDS client speaks it, driven by a scripted client (no network): LDS and CDS
asked for by name (a subset, never a wildcard), the node on the first request only, and
reconnects that resend the last version with an empty nonce. The same rules run against
real grpcio clients in tests/test_grpc_xds.py.
"""

from __future__ import annotations

from helpers_snapshots import CDS, LDS, cluster, listener, snap
from test_protocol_sotw import Client, names_of

from xdsplane.server.sotw import SotwStream


def test_cds_by_name_every_response_carries_every_named_cluster() -> None:
    """In SotW a Cluster left out of a response is deleted: asking for a second cluster
    must not drop the first (gRPC reported 'does not exist' before this rule)."""
    c = Client(node="grpc-1")
    c.push(snap(cluster("a"), cluster("b"), cluster("c")))
    (first,) = c.request(CDS, ["a"])
    assert names_of(first) == ["a"]  # a subset: never the group's other clusters
    assert c.ack(first) == []
    (second,) = c.request(CDS, ["a", "b"], nonce=first.nonce)
    assert names_of(second) == ["a", "b"]
    assert c.ack(second) == []
    # A change to one named cluster: the response still carries both.
    (third,) = c.push(snap(cluster("a"), cluster("b", tag=2), cluster("c")))
    assert names_of(third) == ["a", "b"]
    assert c.ack(third) == []
    # A change to a cluster nobody asked for sends nothing.
    assert c.push(snap(cluster("a"), cluster("b", tag=2), cluster("c", tag=3))) == []


def test_a_named_listener_that_does_not_exist_is_answered_at_once_and_its_removal_sent() -> None:
    c = Client(node="grpc-1")
    c.push(snap(listener("other")))
    (empty,) = c.request(LDS, ["billing.grpc:50051"])
    assert names_of(empty) == []  # not left waiting for its does-not-exist timer
    assert c.ack(empty) == []
    (found,) = c.push(snap(listener("other"), listener("billing.grpc:50051")))
    assert names_of(found) == ["billing.grpc:50051"]
    assert c.ack(found) == []
    (gone,) = c.push(snap(listener("other")))
    assert names_of(gone) == []  # deleted: the client learns it
    assert c.ack(gone) == []


def test_after_unsubscribing_a_named_cluster_responses_carry_the_rest() -> None:
    """The client drops what it unsubscribes from itself: nothing is sent for that, and
    the next response carries only what it still asks for."""
    c = Client(node="grpc-1")
    c.push(snap(cluster("a"), cluster("b")))
    (both,) = c.request(CDS, ["a", "b"])
    c.ack(both)
    assert c.request(CDS, ["b"], nonce=both.nonce) == []
    (one,) = c.push(snap(cluster("a", tag=2), cluster("b", tag=2)))
    assert names_of(one) == ["b"]


def test_a_nacked_named_set_is_not_resent_on_the_stream() -> None:
    c = Client(node="grpc-1")
    c.push(snap(cluster("a")))
    (first,) = c.request(CDS, ["a"])
    c.ack(first)
    (bad,) = c.push(snap(cluster("a", tag=9)))
    assert c.nack(bad, "unsupported") == []
    assert c.request(CDS, ["a"], nonce=bad.nonce) == []  # the same request again: nothing
    (fixed,) = c.push(snap(cluster("a", tag=3)))
    assert names_of(fixed) == ["a"]


def test_a_reconnect_with_the_last_version_and_no_nonce_gets_nothing_it_has() -> None:
    s = snap(cluster("a"), cluster("b"), listener("billing.grpc:50051"))
    c = Client(node="grpc-1")
    c.push(s)
    (lds,) = c.request(LDS, ["billing.grpc:50051"])
    c.ack(lds)
    (cds,) = c.request(CDS, ["a", "b"])
    c.ack(cds)
    # A new stream: gRPC sends the node again, the names, the last version, no nonce.
    again = Client(SotwStream(), node="grpc-1")
    again.push(s)
    assert again.request(LDS, ["billing.grpc:50051"], version=lds.version_info, nonce="") == []
    assert again.request(CDS, ["a", "b"], version=cds.version_info, nonce="") == []
    # ... and a change after the reconnect still reaches it, whole.
    (changed,) = again.push(snap(cluster("a", tag=2), cluster("b"), listener("billing.grpc:50051")))
    assert names_of(changed) == ["a", "b"]


def test_a_reconnect_with_an_old_version_gets_the_current_set() -> None:
    c = Client(SotwStream(), node="grpc-1")
    c.push(snap(cluster("a"), cluster("b")))
    (cds,) = c.request(CDS, ["a", "b"], version="some-old-version", nonce="")
    assert names_of(cds) == ["a", "b"]


def test_the_node_on_the_first_request_only() -> None:
    """Requests after the first carry no node (gRPC, and Envoy with
    set_node_on_first_message_only): they are served as the stream's node."""
    c = Client(node="grpc-1")
    c.push(snap(cluster("a"), listener("l")))
    (lds,) = c.request(LDS, ["l"])
    c.ack(lds)
    (cds,) = c.request(CDS, ["a"])  # no node on this request (Client sets it once)
    assert names_of(cds) == ["a"]
