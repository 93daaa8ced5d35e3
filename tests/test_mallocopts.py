"""``xdsplane serve`` gives the heap a burst of responses left back to the system
(xdsplane/mallocopts.py): once ``--write-budget`` bytes were written since the last time,
``malloc_trim(0)``.

glibc keeps the free chunks of a burst of large blocks in its heap once its dynamic mmap
threshold has risen. The first test shows it in a fresh process: after 200 blocks of
600 KB are freed below a live one, the RSS stays until the Trimmer trims. The
others check when the Trimmer trims, and that ``serve`` runs it (/status).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from harness import ProcessGroup, free_port, wait_until, write_snapshot
from test_ads_limits import cds_stream, run, serve
from test_observability import resources

from xdsplane.mallocopts import Trimmer

# Polled; a trim comes within TRIM_EVERY (1 s) of the writes. Generous for a busy machine.
CEILING = 60.0

PROBE = """
import ctypes, json, sys
from xdsplane.mallocopts import Trimmer, rss

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
libc.memset.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t)
# As glibc's dynamic threshold does once a large block was freed: what follows is heap.
libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
assert libc.mallopt(-3, 16 << 20) == 1  # M_MMAP_THRESHOLD
big = []
for _ in range(200):
    p = libc.malloc(600 * 1024)
    libc.memset(p, 1, 600 * 1024)  # touched: resident
    big.append(p)
# A live block above them (larger than any free chunk, so from the heap's top): freed,
# they cannot be given back by shrinking the heap, as live objects allocated after a
# burst of responses do in a server.
pin = libc.malloc(4 << 20)
for p in big:
    libc.free(p)
before = rss()
written = [0]
trimmer = Trimmer(lambda: written[0], threshold=1000)
if sys.argv[1] == "trim":
    written[0] = 1000
trimmed = trimmer.check()
print(json.dumps({"freed": before - rss(), "trimmed": trimmed, "before": before}))
"""

glibc = pytest.mark.skipif(
    not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"),
    reason="glibc malloc only",
)


def _probe(mode: str) -> dict[str, int]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env=env,
    )
    result: dict[str, int] = json.loads(done.stdout)
    return result


@glibc
def test_the_heap_of_freed_large_blocks_is_given_back_only_by_a_trim() -> None:
    kept = _probe("none")
    given = _probe("trim")
    assert kept["before"] > 100 << 20 and given["before"] > 100 << 20  # resident when freed
    assert not kept["trimmed"] and kept["freed"] < 10 << 20  # free() alone keeps them
    assert given["trimmed"] and given["freed"] > 100 << 20  # of 117 MB freed


def test_the_trimmer_trims_once_per_threshold_written() -> None:
    written = [0]
    calls: list[int] = []
    trimmer = Trimmer(lambda: written[0], threshold=100, trim=lambda: calls.append(written[0]))
    assert not trimmer.check()  # nothing written
    written[0] = 99
    assert not trimmer.check()
    written[0] = 150
    assert trimmer.check() and calls == [150]
    written[0] = 200
    assert not trimmer.check()  # 50 since the last trim
    written[0] = 250
    assert trimmer.check() and calls == [150, 250]
    assert trimmer.as_dict()["trims"] == 2


def test_the_trimmer_trims_after_a_reload() -> None:
    reloads = [3]
    calls: list[int] = []
    trimmer = Trimmer(
        lambda: 0, threshold=100, reloads=lambda: reloads[0], trim=lambda: calls.append(1)
    )
    assert not trimmer.check()  # the reloads before it started
    reloads[0] = 4
    assert trimmer.check() and not trimmer.check() and len(calls) == 1


def test_the_trimmer_waits_for_the_end_of_a_burst_but_not_forever() -> None:
    written, busy = [0], [True]
    calls: list[int] = []
    trimmer = Trimmer(
        lambda: written[0],
        threshold=100,
        busy=lambda: busy[0],
        latest=0.2,
        trim=lambda: calls.append(written[0]),
    )
    trimmer._last = time.monotonic()
    written[0] = 500
    assert not trimmer.check()  # writes in progress, the last trim was just now
    busy[0] = False
    assert trimmer.check() and calls == [500]  # the burst is over
    busy[0], written[0] = True, 1000
    wait_until(lambda: trimmer.check(), CEILING, what="a trim while writes never stop")
    assert calls == [500, 1000]


@glibc
def test_serve_trims_after_a_write_budget_of_responses(procs: ProcessGroup, tmp_path: Path) -> None:
    server = serve(procs, tmp_path, "--write-budget", "100")
    before = server.status()["malloc"]
    assert before["trim"] == "malloc_trim" and before["trim_after_bytes"] == 100
    assert before["trims"] == 0

    async def scenario(channel: grpc.aio.Channel) -> None:
        streams = [await cds_stream(channel, f"edge-{i}") for i in range(3)]
        for s, _ in streams:
            s.cancel()

    run(server, scenario)
    assert server.status()["write_gate"]["written"] > 100
    wait_until(lambda: server.status()["malloc"]["trims"] >= 1, CEILING, what="a trim")


@glibc
def test_serve_trims_after_a_reload(procs: ProcessGroup, tmp_path: Path) -> None:
    server = serve(procs, tmp_path)
    assert server.status()["malloc"]["trims"] == 0
    done = server.status()["reload"]["successes"]
    write_snapshot(tmp_path / "snapshots" / "edge.yaml", resources(free_port(), free_port(), "v2"))
    wait_until(lambda: server.status()["reload"]["successes"] > done, CEILING, what="the reload")
    wait_until(lambda: server.status()["malloc"]["trims"] >= 1, CEILING, what="a trim")
