"""The reload loop: watch the folder, rebuild, validate, swap; keep the last good snapshot.

A reload that fails (a YAML error, a dangling reference, a file still being written for
longer than ``busy_timeout``) changes nothing that is served: the error is logged with its
``file:line`` and shown in /status until a later reload succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from xdsplane import logs
from xdsplane.cache import SnapshotCache
from xdsplane.config.errors import ConfigErrors
from xdsplane.config.loader import FolderLoader
from xdsplane.config.stableread import FileBusy
from xdsplane.snapshot import SnapshotSet

Validator = Callable[[SnapshotSet], Awaitable[list[str]]]


@dataclass
class ReloadState:
    """The outcome of the latest reloads, for /status and /readyz."""

    loaded: bool = False
    loaded_at: float = 0.0
    attempts: int = 0
    successes: int = 0
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    failed_at: float = 0.0
    last_duration: float = 0.0


class Reloader:
    def __init__(
        self,
        root: Path,
        cache: SnapshotCache,
        *,
        step_ms: int = 2,
        busy_timeout: float = 5.0,
        validator: Validator | None = None,
    ) -> None:
        self.root = root
        self.cache = cache
        self.loader = FolderLoader(root)
        self.step_ms = step_ms
        self.busy_timeout = busy_timeout
        self.validator = validator
        self.state = ReloadState()
        self.log = logs.get("xdsplane.reload")
        self._lock = asyncio.Lock()

    def load_now(self) -> SnapshotSet:
        """Load synchronously (at startup); raises ConfigErrors or FileBusy."""
        return self.loader.load()

    async def reload(self, reason: str = "change") -> bool:
        """Load the folder and serve it if it is good; True when something new is served."""
        async with self._lock:
            started = time.perf_counter()
            self.state.attempts += 1
            deadline = time.monotonic() + self.busy_timeout
            while True:
                try:
                    snapshots = self.loader.load()
                    break
                except FileBusy as e:
                    if time.monotonic() > deadline:
                        return self._failed([f"{self.root}: {e} (gave up after waiting)"], reason)
                    await asyncio.sleep(0.005)
                except ConfigErrors as e:
                    return self._failed([str(x) for x in e.errors], reason)
                except Exception as e:  # never let a surprise take down what is serving
                    self.log.exception("reload crashed")
                    return self._failed([f"{self.root}: internal error while loading: {e}"], reason)
            if self.validator is not None:
                problems = await self.validator(snapshots)
                if problems:
                    return self._failed(problems, reason)
            changed = self.cache.update(snapshots)
            self.state.loaded = True
            self.state.loaded_at = time.time()
            self.state.successes += 1
            self.state.errors = []
            self.state.last_duration = time.perf_counter() - started
            self.log.info(
                "reload",
                reason=reason,
                groups=[g.name for g in snapshots.groups],
                resources=sum(g.snapshot.count() for g in snapshots.groups),
                streams_notified=len(changed),
                ms=round(self.state.last_duration * 1000, 2),
            )
            return True

    def _failed(self, errors: list[str], reason: str) -> bool:
        self.state.failures += 1
        self.state.errors = errors
        self.state.failed_at = time.time()
        for err in errors:
            self.log.error("reload failed, still serving the last good snapshot", error=err)
        self.log.warning("reload rejected", reason=reason, errors=len(errors))
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Watch the folder until ``stop`` is set; survives the folder vanishing."""
        while not stop.is_set():
            if not self.root.is_dir():
                await _wait(stop, 0.2)
                continue
            try:
                async for _changes in watchfiles.awatch(
                    self.root,
                    step=self.step_ms,
                    debounce=1600,
                    stop_event=stop,
                    recursive=True,
                    ignore_permission_denied=True,
                    watch_filter=None,
                ):
                    await self.reload()
            except (FileNotFoundError, RuntimeError, OSError) as e:
                self.log.warning("watch interrupted, retrying", error=str(e))
            if not stop.is_set():
                await _wait(stop, 0.1)
                await self.reload("watch restarted")


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
