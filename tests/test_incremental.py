"""Reloads that reuse what did not change give exactly what a cold load of the folder gives.

A long-lived ``FolderLoader`` re-parses only the entries of a raw file that an edit touched
(``pipeline/chunks.py``) and rebuilds, checks and versions only what changed
(``pipeline/incremental.py``). Under random edits of a big raw file (entries added, removed,
swapped, changed, duplicated, broken; lines inserted; the header changed), after each edit
its result must be the very same as a new loader's on the same folder: the same versions and
digests, the same bytes and sources of every resource, or the same errors (``file:line``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xdsplane.config.errors import ConfigErrors
from xdsplane.pipeline import FolderLoader
from xdsplane.snapshot import SnapshotSet
from xdsplane.types import ResourceType

SETTINGS = settings(
    max_examples=int(os.environ.get("XDSPLANE_HYPOTHESIS_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
T = "type.googleapis.com/envoy.config."
ADS = "{ads: {}, resource_api_version: V3}"


def cluster(name: str, timeout: int = 1) -> str:
    return f"""  - "@type": {T}cluster.v3.Cluster
    name: {name}
    type: EDS
    connect_timeout: {timeout}s
    eds_cluster_config:
      eds_config: {ADS}
"""


def endpoints(name: str, port: int = 8443) -> str:
    return f"""  - "@type": {T}endpoint.v3.ClusterLoadAssignment
    cluster_name: {name}
    endpoints:
      - lb_endpoints:
          - endpoint: {{address: {{socket_address: {{address: 10.0.0.1, port_value: {port}}}}}}}
"""


def pair(name: str, timeout: int | str = 1) -> list[str]:
    """A cluster and its endpoints."""
    return [
        cluster(name).replace("connect_timeout: 1s", f"connect_timeout: {timeout}s"),
        endpoints(name),
    ]


def base_entries(n: int) -> list[str]:
    return [cluster(f"c{i:02d}") for i in range(n)] + [endpoints(f"c{i:02d}") for i in range(n)]


ROUTES = f"""resources:
  - "@type": {T}route.v3.RouteConfiguration
    name: r
    virtual_hosts:
      - name: all
        domains: ["x"]
        routes:
          - match: {{prefix: /}}
            route: {{cluster: c00}}
"""

EDITS = st.one_of(
    st.tuples(st.just("change"), st.integers(0, 1000), st.integers(2, 60)),
    st.tuples(st.just("remove"), st.integers(0, 1000)),
    st.tuples(st.just("add"), st.integers(0, 1000), st.integers(0, 30)),
    st.tuples(st.just("swap"), st.integers(0, 1000), st.integers(0, 1000)),
    st.tuples(st.just("duplicate"), st.integers(0, 1000)),
    st.tuples(st.just("blank"), st.integers(0, 1000), st.sampled_from(["\n", "# note\n", "\n\n"])),
    st.tuples(st.just("bad"), st.integers(0, 1000), st.sampled_from(["field", "yaml", "indent"])),
    st.tuples(st.just("header"), st.sampled_from(["", "nodes: [a]\n", "# top\n"])),
    st.tuples(st.just("endpoints"), st.integers(0, 1000), st.integers(1, 65535)),
    st.tuples(st.just("alias"), st.integers(0, 1000), st.booleans()),
    st.tuples(st.just("star"), st.integers(0, 1000), st.integers(0, 9)),
)


def apply(entries: list[str], header: str, edit: tuple) -> tuple[list[str], str]:  # type: ignore[type-arg]
    out = list(entries)
    kind = edit[0]
    at = edit[1] % max(1, len(out)) if len(edit) > 1 and isinstance(edit[1], int) else 0
    if kind == "change" and out and "name: " in out[at]:  # a "bad" edit may have broken it
        name = out[at].split("name: ", 1)[1].split("\n", 1)[0]
        out[at] = cluster(name, edit[2]) if "Cluster\n" in out[at] else endpoints(name, edit[2])
    elif kind == "remove" and len(out) > 1:
        del out[at]
    elif kind == "add":
        out.insert(at, cluster(f"n{edit[2]:02d}", 3))
    elif kind == "swap" and out:
        b = edit[2] % len(out)
        out[at], out[b] = out[b], out[at]
    elif kind == "duplicate" and out:
        out.insert(at, out[at])
    elif kind == "blank" and out:
        out[at] = out[at] + edit[2]
    elif kind == "bad" and out:
        broken = {
            "field": out[at].replace("name:", "nmae:", 1),
            "yaml": out[at] + '    name: "unclosed\n',
            "indent": out[at] + "   stray: 1\n",
        }
        out[at] = broken[edit[2]]
    elif kind == "header":
        header = edit[1]
    elif kind == "alias" and out:
        # an anchor in one entry (maybe), an alias to it in a new one
        if edit[2]:
            out[at] = out[at].replace("connect_timeout: 1s", "connect_timeout: &t 1s", 1)
        out.append(cluster("aliased", 1).replace("connect_timeout: 1s", "connect_timeout: *t"))
    elif kind == "star":
        route = ROUTES.split("\n", 1)[1].replace('["x"]', '["*"]').replace("name: r\n", "name: s")
        out.insert(at, route.replace("name: s", f"name: s{edit[2]}\n", 1))
    elif kind == "endpoints" and out:
        out.insert(at, endpoints(f"c{edit[1] % 12:02d}", edit[2]))
    return out, header


def text_of(entries: list[str], header: str) -> str:
    return header + "resources:\n" + "".join(entries)


def outcome(result: SnapshotSet | ConfigErrors) -> object:
    if isinstance(result, ConfigErrors):
        return ("errors", [str(e) for e in result.errors])
    groups = []
    for g in result.groups:
        snap = g.snapshot
        items = {
            (t.value, n): (r.version, r.source, r.sotw_entry, r.delta_entry, r.size)
            for t, named in snap.resources.items()
            for n, r in named.items()
        }
        groups.append((g.name, g.globs, snap.digest, dict(snap.versions), items))
    return ("ok", groups)


def load(loader: FolderLoader) -> SnapshotSet | ConfigErrors:
    try:
        return loader.load()
    except ConfigErrors as e:
        return e


def write(path: Path, text: str) -> None:
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@SETTINGS
@given(st.integers(4, 14), st.lists(EDITS, min_size=1, max_size=6), st.booleans())
def test_edits_inside_a_big_file_equal_a_cold_load(
    n: int,
    edits: list[tuple],  # type: ignore[type-arg]
    watched: bool,
) -> None:
    """``watched``: the loader is told what the watch saw (only the edited file), as under
    ``serve``; every file counts as settled, so the others are reused without a stat."""
    root = Path(tempfile.mkdtemp(prefix="xdsplane-incremental-"))
    try:
        (root / "routes.yaml").write_text(ROUTES)
        (root / "other.yaml").write_text(text_of(pair("o1"), ""))
        big = root / "big.yaml"
        entries, header = base_entries(n), ""
        big.write_text(text_of(entries, header))
        loader = FolderLoader(root)
        with _settled(watched):
            if watched:
                loader.watching(True)
            assert outcome(load(loader)) == outcome(load(FolderLoader(root)))
            for i, edit in enumerate(edits):
                entries, header = apply(entries, header, edit)
                write(big, text_of(entries, header))
                told = {str(big)}
                if i % 2:  # another file edited too, in the same batch of changes
                    write(root / "other.yaml", text_of(pair("o1", i + 2), ""))
                    told.add(str(root / "other.yaml"))
                if watched:
                    loader.changed(told)
                warm = outcome(load(loader))
                cold = outcome(load(FolderLoader(root)))
                assert warm == cold, edit
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _settled(on: bool) -> contextlib.AbstractContextManager[object]:
    """Every file counts as settled (written long ago), as on a real machine: what the
    watch did not name is reused without a stat."""
    import xdsplane.pipeline.folder as folder

    if not on:
        return contextlib.nullcontext()
    return mock.patch.object(folder, "SETTLED_SECONDS", -1.0)


def test_a_watched_loader_looks_only_at_what_the_watch_named(tmp_path: Path) -> None:
    """Told what changed, a loader does not look at the other files (not even a stat);
    told "not known" (SIGHUP, a restarted watch), it checks every file again."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, text_of(pair("c00"), ""))
    write(b, text_of(pair("b0"), ""))
    loader = FolderLoader(tmp_path)
    with _settled(True):
        loader.watching(True)
        loader.load()
        write(a, text_of(pair("c00", 5), ""))
        write(b, text_of(pair("b0", 6), ""))
        loader.changed({str(a)})
        snap = loader.load().groups[0].snapshot.of(ResourceType.CLUSTER)
        assert snap["c00"].message.connect_timeout.seconds == 5
        assert snap["b0"].message.connect_timeout.seconds == 1  # not named: not looked at
        loader.changed(None)
        snap = loader.load().groups[0].snapshot.of(ResourceType.CLUSTER)
        assert snap["b0"].message.connect_timeout.seconds == 6
        # Not watching (a watch ended): every load checks every file.
        loader.watching(False)
        write(b, text_of(pair("b0", 7), ""))
        loader.changed({str(a)})
        snap = loader.load().groups[0].snapshot.of(ResourceType.CLUSTER)
        assert snap["b0"].message.connect_timeout.seconds == 7


def test_a_failed_watched_load_is_told_again(tmp_path: Path) -> None:
    """A bad edit: the load fails, naming the line; the next load (told of another file
    only) still reports it, never the file's last good content; once fixed it loads."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, text_of(pair("c00"), ""))
    write(b, text_of(pair("b0"), ""))
    loader = FolderLoader(tmp_path)
    with _settled(True):
        loader.watching(True)
        loader.load()
        write(a, text_of(pair("c00", "x"), ""))
        loader.changed({str(a)})
        for told in ({str(a)}, {str(b)}, set()):
            loader.changed(told)
            with pytest.raises(ConfigErrors) as e:
                loader.load()
            assert [str(x).split(": ", 1)[0] for x in e.value.errors] == [f"{a}:5:22"]
        write(a, text_of(pair("c00", 4), ""))
        loader.changed({str(a)})
        assert outcome(loader.load()) == outcome(FolderLoader(tmp_path).load())


def test_a_watched_loader_checks_symlinks_and_replaced_folders(tmp_path: Path) -> None:
    """A file reached through a symlink (an edit of its target is not seen under its name)
    is checked on every load; a folder named by the watch (moved, replaced) makes the load
    check every file under it."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    target = tmp_path / ".data" / "linked.yaml"
    target.parent.mkdir()
    write(target, text_of(pair("c00"), ""))
    (tmp_path / "linked.yaml").symlink_to(target)
    sub = tmp_path / "sub"
    sub.mkdir()
    write(sub / "s.yaml", text_of(pair("s0"), ""))
    loader = FolderLoader(tmp_path)
    with _settled(True):
        loader.watching(True)
        loader.load()
        write(target, text_of(pair("c00", 3), ""))
        loader.changed(set())
        snap = loader.load().groups[0].snapshot.of(ResourceType.CLUSTER)
        assert snap["c00"].message.connect_timeout.seconds == 3
        other = tmp_path / "other"
        other.mkdir()
        write(other / "s.yaml", text_of(pair("s0", 8), ""))
        sub.rename(tmp_path / "old")
        other.rename(sub)
        shutil.rmtree(tmp_path / "old")
        loader.changed({str(sub)})
        snap = loader.load().groups[0].snapshot.of(ResourceType.CLUSTER)
        assert snap["s0"].message.connect_timeout.seconds == 8


def test_a_bad_entry_names_its_line_and_the_next_good_edit_loads(tmp_path: Path) -> None:
    """A broken entry in the middle of a big file: the error names the file and the entry's
    line (the whole file parsed), and fixing it serves exactly the cold result again."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    big = tmp_path / "big.yaml"
    entries = base_entries(200)
    big.write_text(text_of(entries, ""))
    loader = FolderLoader(tmp_path)
    first = loader.load()
    broken = list(entries)
    broken[150] = broken[150].replace("connect_timeout: 1s", "connect_timeout: soon")
    write(big, text_of(broken, ""))
    try:
        loader.load()
        raise AssertionError("a bad entry loaded")
    except ConfigErrors as e:
        line = 1 + sum(x.count("\n") for x in broken[:150]) + 1 + 3  # its connect_timeout
        assert [str(x).split(": ", 1)[0] for x in e.errors] == [f"{big}:{line}:22"], e.errors
    fixed = list(entries)
    fixed[150] = cluster("c150", 9)
    write(big, text_of(fixed, ""))
    again = loader.load()
    assert outcome(again) == outcome(FolderLoader(tmp_path).load())
    assert again.groups[0].snapshot.digest != first.groups[0].snapshot.digest


def test_versions_do_not_depend_on_the_history(tmp_path: Path) -> None:
    """Two replicas, one with a long history of edits, one started on the final folder: the
    same versions (content-derived, never from a cache's history)."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    big = tmp_path / "big.yaml"
    replica = FolderLoader(tmp_path)
    for timeout in range(1, 8):
        entries = base_entries(30)
        entries[timeout] = cluster(f"c{timeout:02d}", timeout + 10)
        write(big, text_of(entries, ""))
        replica.load()
    late = FolderLoader(tmp_path).load()
    assert outcome(replica.load()) == outcome(late)


def _walk_reference(root: Path) -> list[Path]:
    """The listing as it was (os.walk, Path order), to compare the cached one with."""
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        st = os.stat(dirpath)
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        visible = [d for d in dirnames if not d.startswith(".")]
        found.extend(Path(dirpath) / d for d in visible if d.endswith((".yaml", ".yml")))
        dirnames[:] = sorted(d for d in visible if not d.endswith((".yaml", ".yml")))
        found += [
            Path(dirpath) / n
            for n in filenames
            if not n.startswith(".") and n.endswith((".yaml", ".yml"))
        ]
    return sorted(found)


def test_the_listing_is_reused_only_where_no_folder_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Files added, removed or renamed in a settled folder tree are seen on the next load;
    the order is the one a full walk gives (Path order: "a/b" before "a-b")."""
    import xdsplane.pipeline.listing as listing

    for name in ("a/b.yaml", "a-b.yaml", "a/c/d.yml", "z.yaml", ".hidden.yaml", "a/.x/e.yaml"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    (tmp_path / "loop").symlink_to(tmp_path)
    (tmp_path / "dir.yaml").mkdir()
    lister = listing.Listing(tmp_path)
    assert lister.files() == _walk_reference(tmp_path)
    monkeypatch.setattr(listing, "SETTLED_SECONDS", -1.0)  # every folder counts as settled
    scans: list[str] = []
    real = listing._scan
    monkeypatch.setattr(listing, "_scan", lambda f: (scans.append(f), real(f))[1])
    assert lister.files() == _walk_reference(tmp_path)
    assert scans == []  # nothing changed: no folder listed again
    os.replace(tmp_path / "a/c/d.yml", tmp_path / "a/c/f.yaml")
    (tmp_path / "a/new.yaml").write_text("")
    (tmp_path / "z.yaml").unlink()
    assert lister.files() == _walk_reference(tmp_path)
    assert sorted(Path(s).name for s in scans) == ["a", "c", tmp_path.name]


def test_the_versions_formula_is_unchanged() -> None:
    """Replicas of different builds agree: a type's version is blake2b-64 over the sorted
    "name\\0version\\n" lines, whatever computes it."""
    import hashlib

    from xdsplane.snapshot import versions_hash

    items = [("b", "2"), ("a", "1"), ("é", "3")]
    h = hashlib.blake2b(digest_size=8)
    for name, version in sorted(items):
        h.update(name.encode() + b"\0" + version.encode() + b"\n")
    assert versions_hash(items) == h.hexdigest()


def test_response_entries_are_what_protobuf_encodes(tmp_path: Path) -> None:
    """``snapshot.from_payload`` encodes the SotW and delta entries by hand: byte for byte
    what protobuf gives, for names and payloads short and long (varint lengths)."""
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.service.discovery.v3 import discovery_pb2
    from google.protobuf import any_pb2

    from xdsplane.snapshot import make_resource
    from xdsplane.types import ResourceType

    for name in ("", "a", "x" * 127, "y" * 128, "z" * 20000):
        for size in (0, 1, 200, 70000):
            msg = cluster_pb2.Cluster(name=name, alt_stat_name="s" * size)
            r = make_resource(ResourceType.CLUSTER, msg)
            payload = msg.SerializeToString(deterministic=True)
            packed = any_pb2.Any(type_url=ResourceType.CLUSTER.value, value=payload)
            assert (
                r.sotw_entry
                == discovery_pb2.DiscoveryResponse(resources=[packed]).SerializeToString()
            )
            assert (
                r.delta_entry
                == discovery_pb2.DeltaDiscoveryResponse(
                    resources=[
                        discovery_pb2.Resource(name=name, version=r.version, resource=packed)
                    ]
                ).SerializeToString()
            )


def test_a_policy_edit_dumps_only_the_parts_that_changed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The translation cache finds what changed by the parts' JSON: a part of a file that
    did not change is not dumped again (the same frozen object), and the edited folder
    gives what a cold load gives."""
    from pydantic import BaseModel

    from xdsplane.policy.model import Upstream

    ups = "".join(f"  u{i}: {{endpoints: ['10.0.0.{i + 1}:80']}}\n" for i in range(20))
    (tmp_path / "upstreams.yaml").write_text("upstreams:\n" + ups)

    def listener(prefix: str) -> str:
        routes = "".join(
            f"          - {{name: r{i}, prefix: /{prefix}{i}/, upstream: u{i}}}\n"
            for i in range(20)
        )
        return (
            "listeners:\n  - name: l\n    address: 127.0.0.1:10000\n    hosts:\n"
            "      - name: h\n        domains: [h.example.com]\n        routes:\n" + routes
        )

    write(tmp_path / "l.yaml", listener("a"))
    loader = FolderLoader(tmp_path)
    loader.load()
    dumped: list[str] = []
    real = BaseModel.model_dump_json

    def counting(self: BaseModel, **kw: object) -> str:
        dumped.append(type(self).__name__)
        return real(self, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(BaseModel, "model_dump_json", counting)
    write(tmp_path / "l.yaml", listener("b"))
    warm = loader.load()
    assert Upstream.__name__ not in dumped, dumped
    assert "Listener" in dumped
    assert outcome(warm) == outcome(FolderLoader(tmp_path).load())


def test_a_change_the_watch_did_not_report_is_found_when_asked(tmp_path: Path) -> None:
    """``unseen``: a file reused without a stat that changed all the same (a dropped
    event) is found; once loaded with every file checked, nothing is unseen; a file that
    stays broken is not found again and again."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    write(a, text_of(pair("c00"), ""))
    write(b, text_of(pair("b0"), ""))
    loader = FolderLoader(tmp_path)
    with _settled(True):
        loader.watching(True)
        loader.load()
        assert not loader.unseen()
        write(b, text_of(pair("b0", 6), ""))
        assert loader.unseen()
        loader.changed(None)
        loader.load()
        assert not loader.unseen()
        write(b, text_of(pair("b0", "x"), ""))
        assert loader.unseen()
        loader.changed(None)
        with pytest.raises(ConfigErrors):
            loader.load()
        assert not loader.unseen()


def test_a_raw_file_saved_again_unchanged_is_not_parsed_again(tmp_path: Path) -> None:
    """A raw file re-parsed by entry is compared by its text, not hashed: saved again with
    the same bytes it gives the very same resources (nothing parsed), and an edit after
    that, and an edit back, still load like a cold loader."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    big = tmp_path / "big.yaml"
    entries = base_entries(40)
    write(big, text_of(entries, ""))
    loader = FolderLoader(tmp_path)
    first = loader.load().groups[0].snapshot
    write(big, text_of(entries, ""))  # a new file (inode, mtime), the same text
    again = loader.load().groups[0].snapshot
    assert again.digest == first.digest
    for rtype in (ResourceType.CLUSTER, ResourceType.ENDPOINT):
        for name, r in first.of(rtype).items():
            assert again.of(rtype)[name] is r, name
    edited = entries[:]
    edited[7] = cluster("c07", timeout=9)
    write(big, text_of(edited, ""))
    assert outcome(load(loader)) == outcome(load(FolderLoader(tmp_path)))
    write(big, text_of(entries, ""))
    back = loader.load().groups[0].snapshot
    assert back.digest == first.digest
    assert back.of(ResourceType.CLUSTER)["c07"].message.connect_timeout.seconds == 1


def test_files_larger_than_one_read_are_read_whole(tmp_path: Path) -> None:
    """``read_stable`` asks for a file's size plus one in its first read: files of every
    size around the old 1 MiB read size come back whole and equal."""
    from xdsplane.config.stableread import read_stable

    for size in (0, 1, (1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 * (1 << 20) + 7):
        path = tmp_path / f"f{size}"
        data = os.urandom(size)
        path.write_bytes(data)
        assert read_stable(str(path)) == data, size


def test_a_resource_replaced_with_the_same_references_still_counts_them(
    tmp_path: Path,
) -> None:
    """A rebuild leaves out of the reference counts a resource replaced by one with the
    same references (a cluster's timeout changed); one edit that does so and removes what
    it refers to (the cluster's endpoints) must still be refused, as a cold load refuses
    it; and the next good edit loads as a cold load does."""
    (tmp_path / "routes.yaml").write_text(ROUTES)
    big = tmp_path / "big.yaml"
    entries = base_entries(4)
    big.write_text(text_of(entries, ""))
    loader = FolderLoader(tmp_path)
    assert outcome(load(loader))[0] == "ok"
    steps = [
        # c01's timeout changed (same references) and its endpoints removed: dangling
        [e for e in entries if "cluster_name: c01" not in e],
        # c00 (that the route names) changed and c01's endpoints back: loads
        [cluster("c00", 9), *entries[1:]],
        # c00, which the route names, removed: dangling
        [e for e in entries if "name: c00\n    type" not in e],
    ]
    steps[0][1] = cluster("c01", 7)
    for i, step in enumerate(steps):
        write(big, text_of(step, ""))
        warm, cold = outcome(load(loader)), outcome(load(FolderLoader(tmp_path)))
        assert warm == cold, i
        assert warm[0] == ("ok" if i == 1 else "errors"), (i, warm)
