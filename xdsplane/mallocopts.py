"""Giving the memory of a burst of responses back to the system (glibc ``malloc_trim``).

A response of a large snapshot is one bytes object of most of a megabyte (a full CDS of
2,000 clusters is 610 KB), joined, handed to gRPC (which copies it) and freed, thousands
of times while streams sync or an edit goes out. glibc serves blocks of that size from
its heap once its dynamic mmap threshold has risen (after the first such block freed),
and what the heap took for a burst mostly stays in the process after the blocks are freed:
free chunks between live ones are not given back by ``free``. ``malloc_trim(0)`` gives
back every free page of every arena (madvise), in a few milliseconds.

A reload leaves the same behind: the snapshot it replaced, freed at once. So ``xdsplane
serve`` runs a ``Trimmer``: every second it looks whether at least ``--write-budget``
bytes of responses were written, or a new snapshot was installed, since it last trimmed;
if so, it calls
``malloc_trim(0)`` once no write is in progress (the burst is over), or at the latest
``TRIM_LATEST`` seconds after the last trim while writes go on. Measured at 1,000 SotW
streams on the 2,000-cluster snapshot:
steady RSS 190 MB before, ~160 MB after (BENCHMARKS.md section 2, item 3, second pass).
Fixing the mmap threshold instead (``mallopt``) gave the same memory but cost the server
~50 % more CPU per edit (an mmap, page faults and munmap per response), so it is not done.
Other C libraries (musl) and other systems: nothing is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
import sys
import time
from collections.abc import Callable
from typing import Any

TRIM_EVERY = 1.0  # seconds between two looks at the bytes written
TRIM_LATEST = 10.0  # seconds between two trims at most while writes never stop

_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _malloc_trim() -> Callable[[], Any] | None:
    if not sys.platform.startswith("linux") or not os.confstr("CS_GNU_LIBC_VERSION"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_size_t,)
    fn.restype = ctypes.c_int
    return lambda: fn(0)


def rss() -> int:
    """This process's resident memory in bytes (0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


class Trimmer:
    """Calls ``malloc_trim(0)`` once ``threshold`` bytes were written (``written()``, a
    running total) or a snapshot was installed (``reloads()``, a count) since the last
    trim and nothing is being written (``busy()``), or ``latest`` seconds after the last
    trim; looks every ``every`` seconds."""

    def __init__(
        self,
        written: Callable[[], int],
        threshold: int,
        busy: Callable[[], bool] = lambda: False,
        reloads: Callable[[], int] = lambda: 0,
        every: float = TRIM_EVERY,
        latest: float = TRIM_LATEST,
        trim: Callable[[], Any] | None = None,
    ) -> None:
        self.written = written
        self.busy = busy
        self.reloads = reloads
        self._reloads = reloads()  # the count at the last trim
        self.latest = latest
        self._last = time.monotonic()
        self.threshold = max(1, threshold)
        self.every = every
        self._trim = trim if trim is not None else _malloc_trim()
        self._mark = 0  # bytes written at the last trim
        self.trims = 0
        self.last_ms = 0.0  # how long the last trim held the event loop
        self.last_freed = 0  # RSS it gave back, in bytes

    @property
    def available(self) -> bool:
        return self._trim is not None

    def check(self) -> bool:
        """Trim if enough was written since the last time; whether it did."""
        total, reloads = self.written(), self.reloads()
        if self._trim is None:
            return False
        if total - self._mark < self.threshold and reloads == self._reloads:
            return False
        if self.busy() and time.monotonic() - self._last < self.latest:
            return False  # a burst is going on: trim once it is over
        self._mark, self._reloads = total, reloads
        self._last = time.monotonic()
        before = rss()
        t0 = time.perf_counter()
        self._trim()
        self.last_ms = (time.perf_counter() - t0) * 1000
        self.last_freed = max(0, before - rss())
        self.trims += 1
        return True

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), self.every)
            except TimeoutError:
                self.check()

    def as_dict(self) -> dict[str, object]:
        """For /status."""
        return {
            "trim": "malloc_trim" if self.available else None,
            "trim_after_bytes": self.threshold,
            "trims": self.trims,
            "last_trim_ms": round(self.last_ms, 3),
            "last_trim_freed": self.last_freed,
        }
