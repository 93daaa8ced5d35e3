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
            stats = snap.statistics("traceback")
            total = sum(st.size for st in stats)
            with open(f"{prefix}.{n}.txt", "w") as out:
                out.write(f"total {total / 1e6:.1f} MB in {len(stats)} sites\n")
                for st in stats[:30]:
                    out.write(f"\n{st.size / 1e6:.2f} MB {st.count} blocks\n")
                    out.writelines(f"    {line}\n" for line in st.traceback.format())

    threading.Thread(target=dump, daemon=True).start()


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
    if os.environ.get("BENCH_TRACEMALLOC"):
        install_tracemalloc(os.environ["BENCH_TRACEMALLOC"])
    from xdsplane.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
