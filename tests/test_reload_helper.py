"""``xdsplane.reload.FileReloader`` on its own: one scripted Source, every outcome recorded.

The three real users (the policy folder, the TLS files, the guard's limits) are tested
through their servers (test_reload.py, test_xds_cert_rotation.py, test_ratelimit.py); this
pins the helper's contract they rely on: what is swapped, what is kept, what is counted.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import watchfiles

from xdsplane import logs
from xdsplane.config.stableread import FileBusy
from xdsplane.reload import FileReloader, Refused, ReloadState, Source

WAIT = 10.0


class Scripted(Source[str]):
    """Loads what ``script`` says next: a value, or an exception to raise."""

    def __init__(self, folder: Path | None = None, recovery: bool = False) -> None:
        self.script: list[object] = []
        self.served: str | None = None
        self.swaps: list[tuple[str, str]] = []
        self.failures: list[list[str]] = []
        self.recoveries = 0
        self.problems: list[str] = []
        self.threads: list[str] = []
        self.folder = folder
        self.swap_on_recovery = recovery

    def load(self) -> str:
        self.threads.append(threading.current_thread().name)
        if self.folder is not None:
            return (self.folder / "value.yaml").read_text()
        item = self.script.pop(0)
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, str)
        return item

    async def check(self, new: str) -> list[str]:
        return list(self.problems)

    def same(self, new: str) -> bool:
        return new == self.served

    def swap(self, new: str, reason: str, state: ReloadState) -> None:
        self.served = new
        self.swaps.append((new, reason))

    def report_failure(self, errors: list[str], reason: str) -> None:
        self.failures.append(errors)

    def report_recovery(self, reason: str) -> None:
        self.recoveries += 1

    def watch_paths(self) -> list[Path]:
        return [self.folder] if self.folder is not None else []


class Counted:
    def __init__(self) -> None:
        self.succeeded_with: list[float | None] = []
        self.failed_n = 0

    def succeeded(self, seconds: float | None) -> None:
        self.succeeded_with.append(seconds)

    def failed(self) -> None:
        self.failed_n += 1


def reloader(source: Scripted, budget: float = 1.0) -> tuple[FileReloader[str], Counted]:
    counted = Counted()
    return FileReloader(source, logs.get("test"), outcomes=counted, busy_budget=budget), counted


async def test_good_bad_crash_and_unchanged_loads_are_recorded() -> None:
    src = Scripted()
    r, counted = reloader(src)
    src.script = ["v1"]
    assert await r.reload("start") is True
    assert src.served == "v1" and r.state.loaded and r.state.loaded_at > 0
    assert (r.state.attempts, r.state.successes, r.state.failures) == (1, 1, 0)
    assert counted.succeeded_with and counted.succeeded_with[0] is not None
    # The load ran in a worker thread, not on the event loop's.
    assert src.threads[-1] != threading.current_thread().name

    src.script = [Refused(["a.yaml:3:1: bad"])]
    assert await r.reload() is False
    assert src.served == "v1"  # the last good one stays
    assert r.state.errors == ["a.yaml:3:1: bad"] and r.state.failed_at > 0
    assert src.failures == [["a.yaml:3:1: bad"]] and counted.failed_n == 1

    src.script = [RuntimeError("boom")]
    assert await r.reload() is False
    assert src.served == "v1"
    assert r.state.errors == ["internal error while loading: boom"]

    src.script = ["v2"]
    src.problems = ["envoy says no"]
    assert await r.reload() is False
    assert src.served == "v1" and r.state.errors == ["envoy says no"]
    src.problems = []

    src.script = ["v1"]  # back to what is served: errors cleared, nothing swapped
    assert await r.reload() is False
    assert r.state.errors == [] and src.recoveries == 1 and r.state.unchanged == 1
    assert src.swaps == [("v1", "start")]
    assert (r.state.attempts, r.state.successes, r.state.failures) == (5, 1, 3)


async def test_a_source_may_serve_the_same_again_after_errors() -> None:
    src = Scripted(recovery=True)  # the policy: a recovery is a reload (a success)
    r, _ = reloader(src)
    src.script = ["v1", Refused(["bad"]), "v1"]
    assert await r.reload() is True
    assert await r.reload() is False
    assert await r.reload() is True
    assert src.swaps == [("v1", "change"), ("v1", "change")] and r.state.errors == []


async def test_busy_files_are_waited_for_then_reported_with_the_last_good_kept() -> None:
    src = Scripted()
    r, _ = reloader(src, budget=0.3)
    src.script = [FileBusy("v.yaml: open for writing"), FileBusy("v.yaml: open"), "v1"]
    assert await r.reload() is True
    assert src.served == "v1" and r.state.attempts == 1 and r.state.failures == 0
    src.script = [FileBusy("v.yaml: the file is open for writing")] * 1000
    started = time.monotonic()
    assert await r.reload() is False
    assert 0.3 <= time.monotonic() - started < WAIT
    assert r.state.errors == ["v.yaml: the file is open for writing (gave up after waiting 0.3s)"]
    assert src.served == "v1"


async def until(pred: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


async def test_the_watch_reloads_on_change_and_stops(tmp_path: Path) -> None:
    (tmp_path / "value.yaml").write_text("one")
    src = Scripted(folder=tmp_path)
    r, _ = reloader(src)
    assert await r.reload("start") is True
    stop = asyncio.Event()
    task = asyncio.create_task(r.run(stop))
    attempt = 0
    try:
        # No "ready" signal from the watch: write until one is picked up.
        while src.served is None or not src.served.startswith("two"):
            attempt += 1
            (tmp_path / "value.yaml").write_text(f"two-{attempt}")
            try:
                await asyncio.wait_for(
                    until(lambda a=attempt: src.served == f"two-{a}", "the edit"), 1.0
                )
            except TimeoutError:
                assert attempt < 10, "the watch never picked up an edit"
        assert src.swaps[-1][1] == "change"
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


def test_the_source_defaults_watch_everything() -> None:
    src: Source[Any] = Source()
    assert src.relevant(watchfiles.Change.added, "/x") is True
    assert src.settle(set()) == 0.0 and src.identity() == ()
    with pytest.raises(NotImplementedError):
        src.load()
