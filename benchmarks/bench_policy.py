"""Policy compile: 1,000 routes over 100 hosts and 200 upstreams.

    .venv/bin/python benchmarks/bench_policy.py [--quick] [--runs N] [--edits N]

Measures, with FolderLoader on a generated policy folder (10 listener files of 10 hosts x
10 routes, one upstreams file):

- cold: load + validate + translate + serialize the whole folder (a fresh loader);
- translate only: the policy part alone (merge, checks, translation, serialization), from
  parsed files, without YAML or schema;
- one-route edit: one route's prefix changed in one file, reloaded by a warm loader (only
  that file is parsed again; only the host holding the route is checked and translated
  again). Untouched files are dated in the past and the edits start once every file was
  written more than 2 s before (a file written in the last 2 s is read again on every
  load), as on a real machine; the loader is told which file changed, as under ``serve``
  (``--unwatched``: it is not, and ``stat``s every file).

CPU time of this process is given beside wall time (p50 of each): the machine may be
shared, and the load average is printed in the header.

Goals (issue 3): cold at most 50 ms; a one-route edit at most 5 ms (issue 15: 3 ms).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import fmt_ms, header, p50, percentile, table, verdict

from xdsplane.pipeline import FolderLoader
from xdsplane.pipeline.build import build
from xdsplane.pipeline.translations import TranslationCache

GOAL_COLD = 0.050
GOAL_EDIT = 0.005
GOAL_EDIT_15 = 0.003  # issue 15 item 1: a one-route edit, whatever the size of its file
HOSTS, ROUTES_PER_HOST, UPSTREAMS, LISTENERS = 100, 10, 200, 10


def generate(folder: Path) -> list[dict[str, object]]:
    upstreams = {
        f"u{i}": {"endpoints": [f"10.0.{i // 200}.{i % 200 + 1}:8080"]} for i in range(UPSTREAMS)
    }
    hosts = []
    for h in range(HOSTS):
        routes = [
            {
                "name": f"r{r}",
                "prefix": f"/h{h}/r{r}/",
                "upstream": f"u{(h * 10 + r) % UPSTREAMS}",
                "timeout": "5s",
            }
            for r in range(ROUTES_PER_HOST)
        ]
        hosts.append({"name": f"h{h}", "domains": [f"h{h}.example.com"], "routes": routes})
    per = HOSTS // LISTENERS
    listeners = [
        {
            "name": f"l{i}",
            "address": f"127.0.0.1:{10000 + i}",
            "hosts": hosts[i * per : (i + 1) * per],
        }
        for i in range(LISTENERS)
    ]
    for i, listener in enumerate(listeners):
        (folder / f"listeners-{i}.yaml").write_text(yaml.safe_dump({"listeners": [listener]}))
    (folder / "upstreams.yaml").write_text(yaml.safe_dump({"upstreams": upstreams}))
    past = time.time() - 60
    for f in folder.iterdir():
        os.utime(f, (past, past))
    return listeners


def settled(root: Path) -> None:
    """Wait until every file was written more than 2 s ago (``listing.SETTLED_SECONDS``):
    a file written since is read again by every load, which is not what an edit costs."""
    from xdsplane.pipeline.listing import SETTLED_SECONDS

    latest = max(max(p.stat().st_mtime, p.stat().st_ctime) for p in root.glob("*.yaml"))
    time.sleep(max(0.0, latest + SETTLED_SECONDS + 0.2 - time.time()))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--runs", type=int, default=None, help="cold loads (default 10, quick 3)")
    ap.add_argument("--edits", type=int, default=None, help="edits (default 50, quick 10)")
    ap.add_argument(
        "--unwatched", action="store_true", help="the loader is not told which file changed"
    )
    args = ap.parse_args()
    runs = args.runs or (3 if args.quick else 10)
    edits = args.edits or (10 if args.quick else 50)
    print(header("bench_policy: 1,000 routes over 100 hosts and 200 upstreams", args.quick))
    with tempfile.TemporaryDirectory(prefix="xdsplane-bench-policy-") as tmp:
        folder = Path(tmp)
        listeners = generate(folder)
        FolderLoader(folder).load()  # imports and first-use costs out of the way
        cold, cold_cpu = [], []
        for _ in range(runs):
            started, c0 = time.perf_counter(), time.process_time()
            snapshots = FolderLoader(folder).load()
            cold.append(time.perf_counter() - started)
            cold_cpu.append(time.process_time() - c0)
        (group,) = snapshots.groups
        counts = {t.short: len(r) for t, r in group.snapshot.resources.items()}

        warm = FolderLoader(folder)
        warm.load()
        units = [u for cached in warm._parsed.values() for u in cached[1]]
        translate = []
        for _ in range(runs):
            started = time.perf_counter()
            build(units, lambda p: b"", translations=TranslationCache())
            translate.append(time.perf_counter() - started)

        settled(folder)
        if not args.unwatched:
            warm.watching(True)
        warm.load()
        edit_times, edit_cpu = [], []
        target = folder / "listeners-3.yaml"
        for i in range(edits):
            listeners[3]["hosts"][2]["routes"][5]["prefix"] = f"/edit-{i}/"  # type: ignore[index]
            target.write_text(yaml.safe_dump({"listeners": [listeners[3]]}))
            if not args.unwatched:
                warm.changed({str(target)})  # as serve's watch does
            started, c0 = time.perf_counter(), time.process_time()
            warm.load()
            edit_times.append(time.perf_counter() - started)
            edit_cpu.append(time.process_time() - c0)
        hits, misses = warm._translations.hits, warm._translations.misses
        checks = list(getattr(warm, "_checks", {}).values())  # (none before s18-edit)
        checked = sum(c.misses for c in checks), sum(c.hits for c in checks)

    print(
        f"policy: {HOSTS} hosts, {HOSTS * ROUTES_PER_HOST} routes, {UPSTREAMS} upstreams, "
        f"{LISTENERS} listeners in {LISTENERS + 1} files -> {counts}\n"
    )
    rows = [
        [
            "cold load + validate + translate + serialize",
            fmt_ms(p50(cold)),
            fmt_ms(min(cold)),
            fmt_ms(max(cold)),
            len(cold),
            f"<= {GOAL_COLD * 1000:.0f} ms",
            verdict(p50(cold), GOAL_COLD),
        ],
        ["  (CPU time)", fmt_ms(p50(cold_cpu)), fmt_ms(min(cold_cpu)), "", "", "", ""],
        [
            "  of which translate + checks (no YAML, no schema)",
            fmt_ms(p50(translate)),
            fmt_ms(min(translate)),
            fmt_ms(max(translate)),
            len(translate),
            "",
            "",
        ],
        [
            "one-route edit reloaded",
            fmt_ms(p50(edit_times), 2),
            fmt_ms(min(edit_times), 2),
            fmt_ms(percentile(edit_times, 99), 2) + " (p99)",
            len(edit_times),
            f"<= {GOAL_EDIT * 1000:.0f} ms",
            verdict(p50(edit_times), GOAL_EDIT),
        ],
        [
            "  (CPU time)",
            fmt_ms(p50(edit_cpu), 2),
            fmt_ms(min(edit_cpu), 2),
            fmt_ms(percentile(edit_cpu, 99), 2) + " (p99)",
            "",
            f"<= {GOAL_EDIT_15 * 1000:.0f} ms",
            verdict(p50(edit_cpu), GOAL_EDIT_15),
        ],
    ]
    print(table(["measure", "p50", "min", "max", "runs", "goal", "status"], rows))
    print(f"\ntranslation cache over the edits: {hits} parts reused, {misses} rebuilt")
    print(
        f"host checks over the loads of the warm loader: {checked[1]} reused, {checked[0]} checked"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
