"""Run ``xdsplane serve`` with diagnostics, for the benchmarks only.

    python benchmarks/_serve_diag.py [--gc-log FILE] [--loop-lag FILE]
        -- serve ARGS...

--gc-log FILE   append one JSON line per garbage-collector pause of 2 ms or more (wall
                and CPU time of the collecting thread, the generation, what it collected;
                for a full collection the objects it left); with BENCH_GC_CENSUS=N in the
                environment, the first full collection leaving N objects or more also
                writes their count by type (what keeps the heap large)
--loop-lag FILE append one JSON line per event-loop wake-up 5 ms or more late (a 2 ms
                heartbeat on the server's event loop: how long the loop itself was held)

With BENCH_TRACEMALLOC=PREFIX in the environment, Python's allocations are traced
(tracemalloc, 8 frames; the server runs slower) and every 5 s PREFIX.N.txt gets the 30
largest live allocation sites: what the server's Python objects hold at that moment (gRPC's
C core and upb arenas are not seen).
"""

from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def install_gc_log(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    start = [0.0]

    cpu = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
            cpu[0] = time.thread_time()
            return
        pause = time.perf_counter() - start[0]
        spent = time.thread_time() - cpu[0]  # CPU: what other processes took is not in it
        if pause >= 0.002:
            out.write(
                json.dumps(
                    {
                        "t": time.time(),
                        "ms": round(pause * 1000, 2),
                        "cpu_ms": round(spent * 1000, 2),
                        "gen": info.get("generation"),
                        "collected": info.get("collected"),
                        # objects a full collection walked (its survivors; frozen ones not)
                        "gen2": len(gc.get_objects(2)) if info.get("generation") == 2 else None,
                        "frozen": gc.get_freeze_count(),
                    }
                )
                + "\n"
            )

    gc.callbacks.append(callback)
    census = os.environ.get("BENCH_GC_CENSUS")
    if census:
        done = [False]

        def count(phase: str, info: dict[str, int]) -> None:
            if phase != "stop" or info.get("generation") != 2 or done[0]:
                return
            objs = gc.get_objects(2)
            if len(objs) < int(census):
                return
            done[0] = True
            c = collections.Counter(f"{type(o).__module__}.{type(o).__qualname__}" for o in objs)
            out.write(json.dumps({"census": c.most_common(40), "total": len(objs)}) + "\n")

        gc.callbacks.append(count)


def install_loop_lag(path: str) -> None:
    import asyncio

    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    run_forever = asyncio.base_events.BaseEventLoop.run_forever

    def patched(self: asyncio.base_events.BaseEventLoop) -> None:
        last = [time.perf_counter()]

        def beat() -> None:
            now = time.perf_counter()
            late = now - last[0] - 0.002
            if late >= 0.005:
                out.write(json.dumps({"t": time.time(), "ms": round(late * 1000, 2)}) + "\n")
            last[0] = now
            self.call_later(0.002, beat)

        self.call_soon(beat)
        run_forever(self)

    asyncio.base_events.BaseEventLoop.run_forever = patched  # type: ignore[method-assign]


def install_tracemalloc(prefix: str) -> None:
    import threading
    import tracemalloc

    tracemalloc.start(8)

    def dump() -> None:
        n = 0
        while True:
            time.sleep(5)
            n += 1
            snap = tracemalloc.take_snapshot()
            if os.environ.get("BENCH_TRACEMALLOC_DUMP"):
                snap.dump(f"{prefix}.{n}.snap")  # for Snapshot.load + compare_to offline
            stats = snap.statistics("traceback")
            total = sum(st.size for st in stats)
            with open(f"{prefix}.{n}.txt", "w") as out:
                out.write(f"total {total / 1e6:.1f} MB in {len(stats)} sites\n")
                for st in stats[:30]:
                    out.write(f"\n{st.size / 1e6:.2f} MB {st.count} blocks\n")
                    out.writelines(f"    {line}\n" for line in st.traceback.format())

    threading.Thread(target=dump, daemon=True).start()


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def install_memstats(path: str) -> None:
    """Every second (BENCH_MEMSTATS_EVERY), one JSON line: RSS, glibc's heap (mallinfo2: in
    use, free, mmapped), Python's allocated blocks, and (at 1 s or more) the collector's
    tracked objects and pending counts, pymalloc's arenas; with
    BENCH_COLLECT_AT=N also a full collection N s after start (and what it gave back)."""
    import threading

    from xdsplane.mallocopts import rss

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    collect_at = [float(x) for x in os.environ.get("BENCH_COLLECT_AT", "").split(",") if x]
    census_at = [float(x) for x in os.environ.get("BENCH_CENSUS_AT", "").split(",") if x]
    start = time.monotonic()

    def status() -> dict[str, int]:
        # (not _procs.proc_status: _procs imports the test harness into the measured server)
        got = {}
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile", "RssShmem", "Threads"):
                    n = int(value.split()[0])
                    got[key] = n if key == "Threads" else n >> 10
        return got

    def pymalloc() -> dict[str, int]:
        """pymalloc's own summary (sys._debugmallocstats writes it to fd 2)."""
        import tempfile

        with tempfile.TemporaryFile() as tmp:
            saved = os.dup(2)
            os.dup2(tmp.fileno(), 2)
            try:
                sys._debugmallocstats()
            finally:
                os.dup2(saved, 2)
                os.close(saved)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace")
        want = {
            "# arenas allocated current": "arenas",
            "# bytes in allocated blocks": "alloc_mb",
            "# bytes in available blocks": "avail_mb",
            "# bytes lost to pool headers": "hdr_mb",
            "# bytes lost to quantization": "quant_mb",
        }
        got: dict[str, int] = {}
        for line in text.splitlines():
            key, _, value = line.rpartition("=")
            key = key.strip()
            if key in want:
                n = int(value.strip().replace(",", ""))
                got[want[key]] = n if want[key] == "arenas" else n >> 20
            if "unused pools *" in line:
                got["unused_pools_mb"] = int(line.rpartition("=")[2].strip().replace(",", "")) >> 20
        return got

    every = float(os.environ.get("BENCH_MEMSTATS_EVERY", "1"))
    light = every < 1  # often: only what costs nothing to read

    def loop() -> None:
        while True:
            time.sleep(every)
            m = libc.mallinfo2()
            row: dict[str, object] = {
                "t": round(time.monotonic() - start, 2),
                "rss": rss() >> 20,
                **status(),
                "heap_used": m.uordblks >> 20,
                "heap_free": m.fordblks >> 20,
                "mmapped": m.hblkhd >> 20,
                "py_blocks": sys.getallocatedblocks(),
            }
            if not light:
                row.update(gc_count=gc.get_count(), tracked=len(gc.get_objects()), **pymalloc())
            if collect_at and time.monotonic() - start >= collect_at[0]:
                collect_at.pop(0)
                before = rss()
                row["collected"] = gc.collect()
                libc.malloc_trim(0)
                row["collect_freed"] = (before - rss()) >> 20
                row["rss_after_collect"] = rss() >> 20
            if census_at and time.monotonic() - start >= census_at[0]:
                census_at.pop(0)
                c = collections.Counter(
                    f"{type(o).__module__}.{type(o).__qualname__}" for o in gc.get_objects()
                )
                row["census"] = dict(c.most_common(60))
                t = collections.Counter(
                    repr(tuple(type(x).__name__ for x in o[:4]))
                    for o in gc.get_objects()
                    if type(o) is tuple
                )
                row["tuples"] = dict(t.most_common(40))
                want = os.environ.get("BENCH_REFERRERS")  # e.g. "('ResourceType', 'str')"
                if want:
                    picked = [
                        o
                        for o in gc.get_objects()
                        if type(o) is tuple and repr(tuple(type(x).__name__ for x in o[:4])) == want
                    ][:5]
                    refs = []
                    for o in picked:
                        for r in gc.get_referrers(o):
                            if r is picked:
                                continue
                            desc = f"{type(r).__module__}.{type(r).__qualname__}"
                            if isinstance(r, dict):
                                desc += f" keys={list(r)[:3]!r:.200}"
                                for rr in gc.get_referrers(r):
                                    if rr is not picked:
                                        desc += f" <- {type(rr).__qualname__}"
                            refs.append(f"{o!r:.80} <- {desc}")
                    row["referrers"] = refs
            out.write(json.dumps(row) + "\n")

    threading.Thread(target=loop, daemon=True).start()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gc-log")
    ap.add_argument("--loop-lag")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.gc_log:
        install_gc_log(args.gc_log)
    if args.loop_lag:
        install_loop_lag(args.loop_lag)
    if os.environ.get("BENCH_MEMSTATS"):
        install_memstats(os.environ["BENCH_MEMSTATS"])
    if os.environ.get("BENCH_TRACEMALLOC"):
        install_tracemalloc(os.environ["BENCH_TRACEMALLOC"])
    if os.environ.get("BENCH_GRPC_OPTIONS"):  # "name=int,name=int": extra server options
        from xdsplane import app

        extra = [
            (k, int(v))
            for k, _, v in (o.partition("=") for o in os.environ["BENCH_GRPC_OPTIONS"].split(","))
        ]
        given = app.grpc_options
        app.grpc_options = lambda limits: given(limits) + extra  # type: ignore[assignment]
    from xdsplane.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
