"""A Resource keeps only its encoded bytes; its message is decoded on each use.

The decoded messages of a 4,600-resource snapshot held 13 MB of the server's memory
(BENCHMARKS.md, scoreboard); these tests hold the design, not the figure: nothing a snapshot
keeps refers to the message it was built from, every reader gets its own copy, and the EDS
name the streams look up per edit is remembered by content, not by a decoded message.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import pytest
from google.protobuf.message import Message
from helpers_snapshots import CDS, cluster_msg, snap

from xdsplane import snapshot as snapshot_mod
from xdsplane.snapshot import Resource, cluster_eds_name, make_resource


def test_a_resource_does_not_keep_the_message_it_was_built_from() -> None:
    msg = cluster_msg("c0", 3)
    before = sys.getrefcount(msg)
    r = make_resource(CDS, msg, "test:c0")
    assert sys.getrefcount(msg) == before  # nothing in ``r`` refers to it
    assert not any(isinstance(getattr(r, f.name), Message) for f in fields(r))
    assert r.payload == msg.SerializeToString(deterministic=True)
    assert r.sotw_entry.endswith(r.payload) and r.size == len(r.payload)


def test_each_reader_gets_its_own_copy_and_cannot_change_what_is_served() -> None:
    r = make_resource(CDS, cluster_msg("c0", 3), "test:c0")
    served = (r.sotw_entry, r.delta_entry, r.version)
    first = r.message
    assert first == cluster_msg("c0", 3) and first is not r.message
    first.connect_timeout.seconds = 99  # a reader that edits its copy (envoycheck does)
    assert r.message.connect_timeout.seconds == 3
    assert (r.sotw_entry, r.delta_entry, r.version) == served


def test_a_resource_from_a_snapshot_decodes_to_what_was_built() -> None:
    s = snap(*(make_resource(CDS, cluster_msg(f"c{i}", i + 1)) for i in range(5)))
    for i in range(5):
        assert s.of(CDS)[f"c{i}"].message == cluster_msg(f"c{i}", i + 1)


def _eds(name: str, service: str) -> Resource:
    msg = cluster_msg(name)
    msg.eds_cluster_config.service_name = service
    return make_resource(CDS, msg)


def test_the_eds_name_follows_the_content(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(snapshot_mod, "_EDS_NAMES", {})
    a = _eds("c0", "svc-a")
    b = _eds("c0", "svc-b")  # the same cluster edited: a new version
    assert cluster_eds_name(a) == "svc-a"
    assert cluster_eds_name(b) == "svc-b"
    assert cluster_eds_name(a) == "svc-a"
    plain = make_resource(CDS, cluster_msg("c1"))
    assert cluster_eds_name(plain) == "c1"  # no service_name: the cluster's own name
    static = cluster_msg("c2")
    static.type = static.STATIC
    assert cluster_eds_name(make_resource(CDS, static)) is None


def test_the_remembered_eds_names_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    memo: dict[tuple[str, str], str | None] = {}
    monkeypatch.setattr(snapshot_mod, "_EDS_NAMES", memo)
    monkeypatch.setattr(snapshot_mod, "_EDS_NAMES_MAX", 8)
    for i in range(50):
        r = make_resource(CDS, cluster_msg(f"c{i}"))
        assert cluster_eds_name(r) == f"c{i}"
        assert len(memo) <= 8
