"""Process helpers for the benchmarks: the test harness's, plus /proc readings.

tests/harness.py (free ports, ``xdsplane serve`` and Envoy as subprocesses stopped by PID,
``wait_until``) is reused as it is; this module only adds what the benchmarks need on top.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import _common

sys.path.insert(0, str(_common.ROOT / "tests"))

import harness

HOST = harness.HOST
ProcessGroup = harness.ProcessGroup
XdsServer = harness.XdsServer
Envoy = harness.Envoy
free_port = harness.free_port
wait_until = harness.wait_until

_TICKS = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (peak RSS) and friends from /proc/PID/status, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
        elif key == "Threads":
            out[key] = int(parts[0])
    return out


def rss(pid: int) -> int:
    return proc_status(pid)["VmRSS"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


def mb(n: float) -> str:
    return f"{n / 1024 / 1024:.0f} MB"
