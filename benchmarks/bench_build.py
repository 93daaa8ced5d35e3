"""Build benchmark: a 2,000-cluster folder through FolderLoader, cold and after a one-route edit.

    .venv/bin/python benchmarks/bench_build.py [--quick] [--runs N] [--edits N] [--no-profile]

Measures, in this process, with xdsplane.pipeline.FolderLoader on a generated folder
(see _snapgen.py: 2,000 EDS clusters with SDS-referencing UpstreamTlsContexts and their
ClusterLoadAssignments, 200 Secrets, 200 Listeners with RDS, 200 RouteConfigurations):

(a) cold: a new FolderLoader loads the whole folder (read, YAML, proto3 JSON -> messages
    (config/fastjson.py, json_format for what it refuses),
    serialize + hash + pre-encode, reference check, snapshot build). The first load in a
    process also imports the proto packages named by the ``@type``s; it is shown apart.
(b) edit: one route's prefix changes in routes/route-017.yaml (written as tmp + rename) and
    the same FolderLoader loads the folder again (only that file is parsed again). As under
    ``serve``, the loader is told what the watch saw change (``FolderLoader.changed``): the
    other files, written long ago, are not even stat-ed (``--unwatched``: every file is).
(c) big-file edit: the same folder with the clusters in 2 files of 1,000 clusters and their
    1,000 ClusterLoadAssignments each (1.5 MB per file); one cluster's connect_timeout in
    the middle of clusters/team-000.yaml changes, the same FolderLoader loads the folder
    again (only that entry is parsed again: pipeline/chunks.py). Checked: the result is
    the snapshot a new FolderLoader makes of the edited folder.
(d) start from the disk cache (``serve --cache-dir``): a new FolderLoader with the cache a
    first one wrote (the Secret files are parsed each time: never cached).

Goals (issue 15): cold without the cache <= 500 ms, from the cache <= 150 ms; one-route and
one-cluster edits <= 3 ms (p50), whatever the file's size. Time per phase is measured by wrapping
the loader's functions (exclusive times); a cProfile of one cold load lists the top entries.
The "what if" section times alternatives that a fix could use, on the same data.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import os
import pstats
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import _common
import _snapgen
from _common import fmt_ms, p50, table, verdict

from xdsplane.config import stableread
from xdsplane.pipeline import FolderLoader, list_files
from xdsplane.snapshot import Snapshot, digest, make_resource
from xdsplane.types import ResourceType

COLD_GOAL = 0.500
CACHED_GOAL = 0.150
EDIT_GOAL = 0.003
# CPU time of this process during the load: on a machine shared with other work, wall time
# includes waiting for a core; CPU time does not (caches and frequency still vary).
CPU = "(CPU time of the load, this process)"
EDITED = "routes/route-017.yaml"


class Phases:
    """Exclusive wall time per phase, from wrappers installed on the loader's functions."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.stack: list[list[float]] = []  # per active call: [start, time spent in children]
        self.gc_time = 0.0
        self._gc_start = 0.0

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            frame = [time.perf_counter(), 0.0]
            self.stack.append(frame)
            try:
                return fn(*args, **kwargs)
            finally:
                self.stack.pop()
                spent = time.perf_counter() - frame[0]
                self.totals[name] += spent - frame[1]
                if self.stack:
                    self.stack[-1][1] += spent

        return timed

    def _patch(self, label: str, attr: str, modules: list[str]) -> None:
        """Wrap ``attr`` wherever one of ``modules`` binds it (the code moves around)."""
        import importlib

        for name in modules:
            try:
                mod = importlib.import_module(name)
            except ImportError:
                continue
            fn = getattr(mod, attr, None)
            if fn is not None and callable(fn):
                setattr(mod, attr, self.wrap(label, fn))

    def install(self) -> None:
        from xdsplane.pipeline.diskcache import DiskCache
        from xdsplane.pipeline.listing import Listing

        loader = ["xdsplane.pipeline.folder"]
        both = ["xdsplane.pipeline.folder", "xdsplane.pipeline.build"]
        self._patch("read files", "read_stable", loader)
        Listing.files = self.wrap("list files", Listing.files)  # type: ignore[method-assign]
        DiskCache.get = self.wrap("disk cache: read + decode", DiskCache.get)  # type: ignore[method-assign]
        DiskCache.key = self.wrap("disk cache: hash file contents", DiskCache.key)  # type: ignore[method-assign]
        DiskCache.put = self.wrap("disk cache: write", DiskCache.put)  # type: ignore[method-assign]
        self._patch("YAML parse (libyaml + values)", "parse", loader)
        self._patch("re-parse changed entries (chunks)", "parse", ["xdsplane.pipeline.chunks"])
        self._patch(
            "incremental rebuild (merge, versions, refs)", "rebuild", ["xdsplane.pipeline.build"]
        )
        self._patch("policy schema (parse_policy)", "parse_policy", ["xdsplane.pipeline.units"])
        self._patch(
            "proto3 JSON -> message (fastjson; json_format if refused)",
            "parse_message",
            ["xdsplane.pipeline.raw"],
        )
        self._patch(
            "serialize + hash + pre-encode (make_resource)",
            "make_resource",
            ["xdsplane.pipeline.raw", "xdsplane.pipeline.translations"],
        )
        self._patch("reference check (check_snapshot)", "check_snapshot", both)
        self._patch("policy merge + checks + translate", "merge", ["xdsplane.pipeline.groups"])
        self._patch(
            "policy merge + checks + translate", "check_policy", ["xdsplane.pipeline.groups"]
        )
        build = self.wrap("snapshot build (sort + versions)", Snapshot.build)

        class _TimedSnapshot:
            @staticmethod
            def build(resources: Any, previous: Any = None) -> Snapshot:
                return build(resources, previous)  # type: ignore[no-any-return]

        for name in both:
            mod = sys.modules.get(name)
            if mod is not None and getattr(mod, "Snapshot", None) is Snapshot:
                mod.Snapshot = _TimedSnapshot  # type: ignore[attr-defined]
        gc.callbacks.append(self._gc)

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_time += time.perf_counter() - self._gc_start

    def reset(self) -> None:
        self.totals = defaultdict(float)
        self.gc_time = 0.0

    def snapshot(self) -> dict[str, float]:
        out = dict(self.totals)
        out["(of all the above) garbage collector pauses"] = self.gc_time
        return out


def timed_load(loader: FolderLoader, phases: Phases) -> tuple[float, dict[str, float], Any]:
    phases.reset()
    c0 = time.process_time()
    t0 = time.perf_counter()
    result = loader.load()
    total = time.perf_counter() - t0
    cpu = time.process_time() - c0
    parts = phases.snapshot()
    parts["other (merge, grouping, loop, dataclasses)"] = max(
        0.0, total - sum(v for k, v in parts.items() if not k.startswith("("))
    )
    parts[CPU] = cpu
    return total, parts, result


def phase_table(runs: list[dict[str, float]], total: float) -> str:
    keys: list[str] = []
    for r in runs:
        for k in r:
            if k not in keys:
                keys.append(k)
    keys.sort(key=lambda k: (k.startswith("("), -p50([r.get(k, 0.0) for r in runs])))
    rows = []
    for k in keys:
        v = p50([r.get(k, 0.0) for r in runs])
        rows.append([k, fmt_ms(v, 2), f"{100 * v / total:.0f}%" if total else "-"])
    return table(["phase (exclusive, p50 over runs)", "time", "share"], rows)


def profile_top(root: Path, n: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    FolderLoader(root).load()
    prof.disable()
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime")
    rows = []
    # pstats keeps (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    entries = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)  # type: ignore[attr-defined]
    total = sum(v[2] for _, v in entries)
    for (path, line, name), (_cc, nc, tt, ct, _callers) in entries[:n]:
        short = path.replace(str(_common.ROOT) + "/", "")
        short = short.split("site-packages/")[-1]
        where = f"{short}:{line}({name})" if line else name
        rows.append([where[-78:], nc, f"{tt:.3f}", f"{ct:.3f}", f"{100 * tt / total:.0f}%"])
    return (
        table(
            ["function (cProfile, one cold load)", "calls", "tottime s", "cumtime s", "self%"], rows
        )
        + f"\n(profiled total {total:.2f} s; cProfile roughly doubles Python-heavy code)"
    )


def _parse_alternatives(texts: list[bytes]) -> list[list[str]]:
    """YAML without positions, JSON, and json_format alone, on the folder's files."""
    import yaml
    from google.protobuf import json_format

    from xdsplane.config import fastjson, yamlsrc
    from xdsplane.config.protos import prepare_types

    rows: list[list[str]] = []
    strings = [t.decode() for t in texts]

    def python_fast(text: str, path: str, **kw: Any) -> Any:
        saved, yamlsrc._C = yamlsrc._C, None
        try:
            return yamlsrc.parse(text, path, **kw)
        finally:
            yamlsrc._C = saved

    built = "built" if yamlsrc._C is not None else "NOT built: the Python fast path"
    for label, fn in (
        (f"yamlsrc.parse (compiled path _yamlc.c, {built})", yamlsrc.parse),
        ("yamlsrc Python fast path (PyYAML's nodes; without _yamlc)", python_fast),
        (
            "yamlsrc general builder (aliases, tags, errors)",
            yamlsrc._parse_general,
        ),
    ):
        gc.disable()  # as FolderLoader.load does
        try:
            c0 = time.process_time()
            for text in strings:
                fn(text, "f.yaml", sizes=[])
            rows.append([label + " (CPU, collector off)", fmt_ms(time.process_time() - c0)])
        finally:
            gc.enable()
    t0 = time.perf_counter()
    docs = [yaml.load(t, Loader=yaml.CSafeLoader) for t in texts]
    rows.append(["yaml.load(CSafeLoader), no positions kept", fmt_ms(time.perf_counter() - t0)])

    as_json = [json.dumps(d).encode() for d in docs]
    t0 = time.perf_counter()
    for t in as_json:
        json.loads(t)
    rows.append(
        ["json.loads of the same content written as JSON", fmt_ms(time.perf_counter() - t0)]
    )

    bodies = []
    for d in docs:
        for item in d.get("resources", []):
            rtype = ResourceType.from_url(item["@type"])
            bodies.append((rtype, {k: v for k, v in item.items() if k != "@type"}))
    for _, body in bodies:
        prepare_types(body)

    t0 = time.perf_counter()
    for rtype, body in bodies:
        json_format.ParseDict(body, rtype.message_class())
    rows.append(
        ["json_format.ParseDict alone (types already imported)", fmt_ms(time.perf_counter() - t0)]
    )
    t0 = time.perf_counter()
    for rtype, body in bodies:
        fastjson.parse(body, rtype.message_class)
    rows.append(["fastjson.parse alone (the same mappings)", fmt_ms(time.perf_counter() - t0)])
    return rows


def what_if(root: Path, snapshot_set: Any, heavy: bool = True) -> list[list[str]]:
    """Time alternatives a fix could use, on the same folder."""
    rows: list[list[str]] = []
    files = list_files(root)
    texts = [p.read_bytes() for p in files]

    if heavy:
        rows.extend(_parse_alternatives(texts))

    resources = [
        r for g in snapshot_set.groups for v in g.snapshot.resources.values() for r in v.values()
    ]
    payloads = [(r.type, r.message.SerializeToString(deterministic=True)) for r in resources]
    t0 = time.perf_counter()
    rebuilt = [make_resource(t, t.message_class.FromString(p)) for t, p in payloads]
    rows.append(
        [
            "restart from cached payloads: FromString + make_resource",
            fmt_ms(time.perf_counter() - t0),
        ]
    )
    t0 = time.perf_counter()
    for t, p in payloads:
        t.message_class.FromString(p)
    rows.append(["  of which FromString alone", fmt_ms(time.perf_counter() - t0)])
    t0 = time.perf_counter()
    Snapshot.build(rebuilt)
    rows.append(
        ["Snapshot.build of all resources (sort + versions)", fmt_ms(time.perf_counter() - t0)]
    )
    t0 = time.perf_counter()
    for p in files:
        os.stat(p)
    rows.append(
        ["os.stat() of every file (a size/mtime check)", fmt_ms(time.perf_counter() - t0, 2)]
    )
    t0 = time.perf_counter()
    for p in files:
        digest(p.read_bytes())
    rows.append(
        [
            "read + blake2b of every file (what each reload does)",
            fmt_ms(time.perf_counter() - t0, 2),
        ]
    )
    total_bytes = sum(len(t) for t in texts)
    rows.append(["(folder size)", f"{total_bytes / 1e6:.1f} MB in {len(files)} files"])
    return rows


def settled(root: Path) -> None:
    """Wait until every file was written more than 2 s ago, as on a real machine: the
    loader reads again a file written in the last 2 s (a write in the same timestamp tick
    could hide), which is not what an edit costs (``listing.SETTLED_SECONDS``)."""
    from xdsplane.pipeline.listing import SETTLED_SECONDS

    latest = max(max(p.stat().st_mtime, p.stat().st_ctime) for p in root.rglob("*.yaml"))
    time.sleep(max(0.0, latest + SETTLED_SECONDS + 0.2 - time.time()))


def watched(loader: FolderLoader, path: Path, on: bool) -> None:
    """Tell the loader, as ``serve``'s watch does, that ``path`` changed."""
    if on:
        loader.changed({str(path)})


def big_file_edits(
    root: Path, shape: _snapgen.Shape, edits: int, phases: Phases, watch: bool = True
) -> tuple[list[float], list[dict[str, float]], int]:
    """(c): one cluster's connect_timeout in the middle of a 1,000-cluster file, edited."""
    from xdsplane.config.errors import ConfigErrors

    _snapgen.generate(root, shape)
    edited = root / "clusters" / "team-000.yaml"
    middle = shape.per_team // 2
    settled(root)
    loader = FolderLoader(root)
    if watch:
        loader.watching(True)
    loader.load()
    gc.collect()
    times: list[float] = []
    parts: list[dict[str, float]] = []
    for i in range(edits):
        _snapgen.write_atomic(edited, _snapgen.team_text(0, shape, {middle: 2000 + i}))
        watched(loader, edited, watch)
        t, p, result = timed_load(loader, phases)
        times.append(t)
        parts.append(p)
    try:
        fresh = FolderLoader(root).load()
    except ConfigErrors as e:
        raise AssertionError(f"the edited folder does not load: {e}") from None
    mine = result.groups[0].snapshot
    assert mine.digest == fresh.groups[0].snapshot.digest, "an edit differs from a cold load"
    edited_cluster = mine.of(ResourceType.CLUSTER)[_snapgen.cluster_name(middle)].message
    timeout_ms = edited_cluster.connect_timeout.ToMilliseconds()
    assert timeout_ms == 2000 + edits - 1, f"the edit was not loaded ({timeout_ms} ms)"
    return times, parts, edited.stat().st_size


def cached_starts(root: Path, runs: int, phases: Phases) -> tuple[list[float], Any, dict[str, int]]:
    """(d): new FolderLoaders with the disk cache a first one wrote."""
    cache = Path(tempfile.mkdtemp(prefix="xdsplane-cache-")) / "cache"
    try:
        FolderLoader(root, cache_dir=cache).load()  # writes the entries
        times: list[float] = []
        counts: dict[str, int] = {}
        parts: list[dict[str, float]] = []
        for _ in range(runs):
            gc.collect()
            loader = FolderLoader(root, cache_dir=cache)
            t, p, _ = timed_load(loader, phases)
            times.append(t)
            parts.append(p)
            assert loader._disk is not None
            disk = loader._disk.cache
            counts = {"hits": disk.hits, "misses": disk.misses, "corrupt": disk.corrupt}
        return times, parts, counts
    finally:
        shutil.rmtree(cache.parent, ignore_errors=True)


def cpu_p50(parts: list[dict[str, float]]) -> str:
    return fmt_ms(p50([p[CPU] for p in parts]), 2)


def vmhwm() -> str:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return f"{int(line.split()[1]) / 1024:.0f} MB"
    return "?"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="few runs, no profile (< 30 s)")
    ap.add_argument("--runs", type=int, help="cold loads (default 5, quick 2)")
    ap.add_argument("--edits", type=int, help="one-route edits (default 30, quick 10)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--keep", metavar="DIR", help="generate into DIR and keep it")
    ap.add_argument(
        "--unwatched", action="store_true", help="(b), (c): the loader not told what changed"
    )
    args = ap.parse_args()
    runs = args.runs or (1 if args.quick else 5)
    edits = args.edits or (10 if args.quick else 30)
    profile = not args.quick and not args.no_profile

    print(_common.header("bench_build: FolderLoader on 2,000 clusters", args.quick))
    workdir = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="xdsplane-build-"))
    try:
        shape = _snapgen.Shape()
        counts = _snapgen.generate(workdir, shape)
        print(
            "folder: "
            + ", ".join(f"{v} {k}" for k, v in counts.items())
            + f", {_snapgen.folder_bytes(workdir) / 1e6:.1f} MB"
        )
        stableread.install()  # as `xdsplane serve` does: reads probe for writers with a lease
        phases = Phases()
        phases.install()

        first, first_parts, result = timed_load(FolderLoader(workdir), phases)

        cold: list[float] = []
        cold_parts: list[dict[str, float]] = []
        for _ in range(runs):
            result = None  # a cold load must not pay GC time for the previous load's objects
            gc.collect()
            t, parts, result = timed_load(FolderLoader(workdir), phases)
            cold.append(t)
            cold_parts.append(parts)

        settled(workdir)
        loader = FolderLoader(workdir)
        if not args.unwatched:
            loader.watching(True)
        result = loader.load()
        gc.collect()
        edit: list[float] = []
        edit_parts: list[dict[str, float]] = []
        for i in range(edits):
            _snapgen.write_atomic(workdir / EDITED, _snapgen.route_text(17, shape, i + 1))
            watched(loader, workdir / EDITED, not args.unwatched)
            t, parts, _ = timed_load(loader, phases)
            edit.append(t)
            edit_parts.append(parts)
        routes = loader.load().groups[0].snapshot.of(ResourceType.ROUTE)
        assert f"/api/v{edits}/r0" in str(routes["route-017"].message), "the edit was not loaded"
        del loader
        warm, warm_parts, warm_counts = cached_starts(workdir, runs, phases)
        big_shape = (
            _snapgen.Shape(clusters=400, listeners=40, cluster_files=2, listener_files=2)
            if args.quick
            else _snapgen.Shape(cluster_files=2)
        )
        big_root = Path(tempfile.mkdtemp(prefix="xdsplane-bigfile-"))
        try:
            big, big_parts, big_bytes = big_file_edits(
                big_root, big_shape, edits, phases, not args.unwatched
            )
        finally:
            shutil.rmtree(big_root, ignore_errors=True)

        print()
        print(
            table(
                ["measure", "p50", "min", "max", "CPU p50", "runs", "goal", "status"],
                [
                    [
                        "(a) cold load + build + serialize, no disk cache",
                        fmt_ms(p50(cold)),
                        fmt_ms(min(cold)),
                        fmt_ms(max(cold)),
                        cpu_p50(cold_parts),
                        runs,
                        "<= 500 ms",
                        verdict(p50(cold), COLD_GOAL),
                    ],
                    [
                        "    first load in the process (+ proto imports)",
                        fmt_ms(first),
                        "",
                        "",
                        "",
                        1,
                        "",
                        "",
                    ],
                    [
                        "(b) one-route edit reloaded",
                        fmt_ms(p50(edit), 2),
                        fmt_ms(min(edit), 2),
                        fmt_ms(max(edit), 2),
                        cpu_p50(edit_parts),
                        edits,
                        "<= 3 ms",
                        verdict(p50(edit), EDIT_GOAL),
                    ],
                    [
                        f"(c) one-cluster edit inside a {big_bytes / 1e6:.1f} MB file "
                        f"({big_shape.per_team} clusters + endpoints)",
                        fmt_ms(p50(big), 2),
                        fmt_ms(min(big), 2),
                        fmt_ms(max(big), 2),
                        cpu_p50(big_parts),
                        edits,
                        "<= 3 ms",
                        verdict(p50(big), EDIT_GOAL),
                    ],
                    [
                        "(d) start from the disk cache (--cache-dir)",
                        fmt_ms(p50(warm)),
                        fmt_ms(min(warm)),
                        fmt_ms(max(warm)),
                        cpu_p50(warm_parts),
                        runs,
                        "<= 150 ms",
                        verdict(p50(warm), CACHED_GOAL),
                    ],
                ],
            )
        )
        print()
        print("(a) where a cold load goes:")
        print(phase_table(cold_parts, p50(cold)))
        print()
        print("(b) where a one-route edit reload goes:")
        print(phase_table(edit_parts, p50(edit)))
        print()
        print("(c) where a one-cluster edit inside the big file goes:")
        print(phase_table(big_parts, p50(big)))
        print()
        print(
            f"(d) where a start from the disk cache goes (entries: {warm_counts['hits']} read, "
            f"{warm_counts['misses']} files parsed: the Secret files, never cached):"
        )
        print(phase_table(warm_parts, p50(warm)))
        print()
        print(f"this process's peak RSS (VmHWM): {vmhwm()}")
        gc.collect()
        tracked = len(gc.get_objects())
        t0 = time.perf_counter()
        gc.collect()
        full_gc = time.perf_counter() - t0
        gc.freeze()
        t0 = time.perf_counter()
        gc.collect()
        frozen_gc = time.perf_counter() - t0
        gc.unfreeze()
        rows = what_if(workdir, result, heavy=not args.quick)
        rows.insert(
            0,
            [
                f"one full GC with the loaded folder alive ({tracked:,} tracked objects)",
                fmt_ms(full_gc),
            ],
        )
        rows.insert(1, ["  the same after gc.freeze()", fmt_ms(frozen_gc, 2)])
        if not args.quick:
            result = None
            gc.collect()
            gc.disable()
            try:
                nogc, _, result = timed_load(FolderLoader(workdir), phases)
            finally:
                gc.enable()
            rows.insert(
                2, ["cold load with the collector off during the load (gc.disable)", fmt_ms(nogc)]
            )
        print()
        print("what if (same data, alternatives a fix could use):")
        print(table(["alternative", "time"], rows))
        if profile:
            print()
            print(profile_top(workdir, 15))
        del first_parts
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
