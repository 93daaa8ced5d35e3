"""The garbage collector's young generation sized for thousands of streams, and its pauses
counted for /status.

Each ADS stream keeps ~190 objects the collector tracks alive (almost all grpc.aio's:
coroutines, tasks, futures, callback wrappers, contexts; BENCHMARKS.md section 2), so
5,000 streams hold about a million. With Python's default threshold (a young collection
every 700 allocations more than frees), an edit pushed to every stream promotes the objects
of the responses waiting their turn to write into the old generation, which sets off a full
collection of the whole million once or twice per edit: 300-440 ms of CPU each, with the
event loop held. A young generation of ``YOUNG`` objects lets those short-lived objects die
by reference counting before any collection looks at them: measured at 5,000 delta streams,
the collector's CPU over a run fell from ~4 s to ~1 s, and on a quiet machine the server's
CPU per edit from 1.32 to 0.94 s (the edit reached all 5,000 in 993 ms instead of
1,318). A young collection then walks up to ``YOUNG`` objects (a few milliseconds).

``serve --gc-young N`` sets it (Python's own default is 700). The older generations keep
Python's defaults (10, 10), and nothing is frozen or disabled: cyclic garbage is still
collected, only a little later.
"""

from __future__ import annotations

import gc
import time
from typing import Any

YOUNG = 20_000  # allocations (less frees) between two young collections


class GcPauses:
    """How many collections of each generation ran, and how long they held the process
    (wall time; the longest and the total), since it was installed."""

    def __init__(self, before: tuple[int, int, int] = (700, 10, 10)) -> None:
        self.before = before  # the thresholds to give back (``untune``)
        self.count = [0, 0, 0]
        self.total = [0.0, 0.0, 0.0]
        self.longest = [0.0, 0.0, 0.0]
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        gen = int(info.get("generation", 0))
        if not 0 <= gen <= 2:
            return
        pause = time.perf_counter() - self._start
        self.count[gen] += 1
        self.total[gen] += pause
        if pause > self.longest[gen]:
            self.longest[gen] = pause

    def as_dict(self) -> dict[str, object]:
        """For /status: the thresholds, and per generation the collections and pauses."""
        return {
            "threshold": list(gc.get_threshold()),
            "collections": list(self.count),
            "pause_ms_total": [round(t * 1000, 1) for t in self.total],
            "pause_ms_longest": [round(t * 1000, 2) for t in self.longest],
        }


def tune(young: int = YOUNG) -> GcPauses:
    """Size the young generation (``young`` >= 1) and start counting pauses."""
    if young < 1:
        raise ValueError(f"the young generation needs at least 1 object, not {young}")
    before = gc.get_threshold()
    gc.set_threshold(young, before[1], before[2])
    pauses = GcPauses(before)
    gc.callbacks.append(pauses)
    return pauses


def untune(pauses: GcPauses) -> None:
    """Stop counting and give back the thresholds found (tests run servers in-process)."""
    if pauses in gc.callbacks:
        gc.callbacks.remove(pauses)
    gc.set_threshold(*pauses.before)
