"""Small helpers shared by the benchmark scripts: statistics and plain-text tables."""

from __future__ import annotations

import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:  # the installed (editable) package, or another copy put first on PYTHONPATH
    import xdsplane  # noqa: F401
except ImportError:  # pragma: no cover - not installed: use this checkout
    sys.path.insert(0, str(ROOT))


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100) of a non-empty sequence."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def p50(values: Sequence[float]) -> float:
    return percentile(values, 50)


def fmt_ms(seconds: float, digits: int = 1) -> str:
    if math.isnan(seconds):
        return "-"
    return f"{seconds * 1000:.{digits}f} ms"


def verdict(value: float, goal: float) -> str:
    """'ok' when ``value`` is within ``goal``, else how many times over it is."""
    if math.isnan(value):
        return "n/a"
    if value <= goal:
        return "ok"
    return f"MISS x{value / goal:.1f}"


def table(
    headers: Sequence[str], rows: Sequence[Sequence[object]], right: set[int] | None = None
) -> str:
    """Aligned plain-text columns; columns in ``right`` (default: all but the first) are
    right-aligned."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    if right is None:
        right = set(range(1, len(headers)))
    lines = []
    for n, r in enumerate(cells):
        parts = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(r)]
        lines.append("  ".join(parts).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header(title: str, quick: bool) -> str:
    import xdsplane

    mode = "quick" if quick else "full"
    return (
        f"== {title} ({mode}) ==\n"
        f"{time.strftime('%Y-%m-%d %H:%M')}  python {platform.python_version()}  "
        f"{_cpus()} CPUs  {platform.machine()}  {load()}\n"
        f"xdsplane from {Path(xdsplane.__file__).parent}"
    )


def load() -> str:
    """The load average: other work on the machine skews every figure here."""
    try:
        one, five, _ = Path("/proc/loadavg").read_text().split()[:3]
    except OSError:
        return ""
    return f"load {one} (1 min) {five} (5 min)"


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 0
