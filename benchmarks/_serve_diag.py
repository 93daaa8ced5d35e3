"""Run ``xdsplane serve`` with diagnostics or prototype fixes, for the benchmarks only.

    python benchmarks/_serve_diag.py [--gc-log FILE] [--proposals a,b] -- serve ARGS...

--gc-log FILE   append one JSON line per garbage-collector pause of 2 ms or more
--proposals     apply prototypes of the fixes proposed in BENCHMARKS.md (see _proposals.py)
                before the server starts; the xdsplane package itself is not changed.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def install_gc_log(path: str) -> None:
    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the life of the process
    start = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            start[0] = time.perf_counter()
            return
        pause = time.perf_counter() - start[0]
        if pause >= 0.002:
            out.write(
                json.dumps(
                    {
                        "t": time.time(),
                        "ms": round(pause * 1000, 2),
                        "gen": info.get("generation"),
                        "collected": info.get("collected"),
                    }
                )
                + "\n"
            )

    gc.callbacks.append(callback)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gc-log")
    ap.add_argument("--proposals", default="")
    ap.add_argument("rest", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    rest = args.rest[1:] if args.rest[:1] == ["--"] else args.rest
    if args.gc_log:
        install_gc_log(args.gc_log)
    if args.proposals:
        import _proposals

        _proposals.apply(args.proposals.split(","))
    from xdsplane.cli import main as cli_main

    return cli_main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
