"""The young garbage-collector generation of ``serve`` (xdsplane/gctune.py).

The figures (GC CPU and server CPU per edit at 5,000 streams) are in BENCHMARKS.md; here:
the mechanism (a burst of short-lived objects smaller than the young generation is freed
without any collection looking at it, where Python's default promotes it towards the old
generation), the pause counts, that thresholds are given back, and that ``serve`` applies
``--gc-young`` and shows it in /status.
"""

from __future__ import annotations

import gc
import subprocess
import sys
from pathlib import Path

import pytest
from harness import ProcessGroup
from test_ads_limits import serve

from xdsplane import gctune


class Burst:
    """A container the collector tracks (one per simulated response waiting its turn)."""

    __slots__ = ("payload",)

    def __init__(self) -> None:
        self.payload: list[int] = []


def _promoted_during_burst(young: int, n: int = 5_000) -> tuple[int, int]:
    """Allocate ``n`` tracked objects alive together, then free them: (young collections
    during the burst, how many of them had left the young generation)."""
    pauses = gctune.tune(young)
    try:
        gc.collect()  # counts start from zero
        before = pauses.count[0]
        burst = [Burst() for _ in range(n)]
        ids = {id(b) for b in burst}
        older = sum(1 for o in gc.get_objects(1) + gc.get_objects(2) if id(o) in ids)
        during = pauses.count[0] - before
        del burst
        return during, older
    finally:
        gctune.untune(pauses)


def test_a_burst_smaller_than_the_young_generation_is_never_walked() -> None:
    collections, promoted = _promoted_during_burst(gctune.YOUNG)
    assert collections == 0
    assert promoted == 0


def test_with_pythons_default_the_same_burst_is_promoted() -> None:
    """What the larger young generation avoids: at 700, young collections run during the
    burst and move most of its objects on towards the old generation, where a full
    collection walks them with every stream's objects."""
    collections, promoted = _promoted_during_burst(700)
    assert collections >= 5
    assert promoted > 4_000


def test_pauses_are_counted_and_thresholds_given_back() -> None:
    before = gc.get_threshold()
    pauses = gctune.tune(12_345)
    try:
        assert gc.get_threshold() == (12_345, before[1], before[2])
        gc.collect(0)
        gc.collect()
        shown = pauses.as_dict()
        assert shown["threshold"] == [12_345, before[1], before[2]]
        counts = shown["collections"]
        assert isinstance(counts, list) and counts[0] >= 1 and counts[2] >= 1
        longest = shown["pause_ms_longest"]
        assert isinstance(longest, list) and longest[2] > 0
    finally:
        gctune.untune(pauses)
    assert gc.get_threshold() == before
    assert pauses not in gc.callbacks


def test_a_young_generation_of_nothing_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        gctune.tune(0)
    out = subprocess.run(
        [sys.executable, "-m", "xdsplane", "serve", "--config", "snapshots", "--gc-young", "-5"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.returncode == 2
    assert "--gc-young must be at least 1, not -5" in out.stderr


def test_serve_applies_gc_young_and_shows_its_collections(
    procs: ProcessGroup, tmp_path: Path
) -> None:
    default = serve(procs, tmp_path / "a").status()["gc"]
    assert default["threshold"][0] == gctune.YOUNG
    assert len(default["collections"]) == 3 and len(default["pause_ms_longest"]) == 3
    chosen = serve(procs, tmp_path / "b", "--gc-young", "5000").status()["gc"]
    assert chosen["threshold"][0] == 5000
