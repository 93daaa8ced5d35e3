"""A/B of the guard's Redis pipelining (``RedisStore(batch=...)``), without gRPC around it.

    .venv/bin/python benchmarks/_store_batch.py [--checks 5000] [--concurrency 1,8,32]

A real redis-server on a free port; in this process, C coroutines each doing what one
Check does to the store (the revocation MGET, then the jti SET NX) with new keys, until
``--checks`` are done; with and without batching, alternately, twice each. Prints Checks/s
and this process's CPU per Check (the guard's share of the store's cost).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import tempfile
import time
from pathlib import Path

import _common
import _procs

from xdsplane.guard.store import RedisStore


async def run(url: str, batch: bool, concurrency: int, n: int) -> tuple[float, float]:
    store = RedisStore(url, batch=batch)
    prefix = secrets.token_hex(4)
    done = 0

    async def one_check_after_another() -> None:
        nonlocal done
        while done < n:
            done += 1
            key = f"{prefix}:{done}"
            await store.get_many([f"rv:jti:{key}", f"rv:sub:{key}"])
            await store.claim(key, 60_000)

    for i in range(200):  # warm-up: connections
        await store.claim(f"{prefix}:w{i}", 1000)
    t0, c0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(one_check_after_another() for _ in range(concurrency)))
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    await store.close()
    return n / wall, cpu / n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--checks", type=int, default=5000)
    ap.add_argument("--concurrency", default="1,8,32")
    args = ap.parse_args()
    print(_common.header("_store_batch: RedisStore with and without pipelining", False))
    workdir = Path(tempfile.mkdtemp(prefix="xdsplane-store-batch-"))
    procs = _procs.ProcessGroup(workdir / "logs", max_seconds=600)
    rows = []
    try:
        redis = _procs.Redis(procs, workdir, max_seconds=600).start()
        for c in (int(x) for x in args.concurrency.split(",")):
            for _ in range(2):
                for batch in (False, True):
                    rate, cpu = asyncio.run(run(redis.url, batch, c, args.checks))
                    rows.append(
                        [c, "yes" if batch else "no", f"{rate:.0f}/s", f"{cpu * 1e6:.0f} us"]
                    )
    finally:
        procs.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(_common.table(["in flight", "batched", "Checks/s", "CPU per Check"], rows))
    print(_common.load())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
