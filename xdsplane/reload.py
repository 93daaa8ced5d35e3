"""One reload helper for everything the servers read from files while they run.

The policy folder (``watch.py``), the xDS server's and the guard's TLS files (``xdstls.py``)
and the guard's rate limits (``guard/app.py``) are each a ``Source``: what to load, how to
check it, what to swap. ``FileReloader`` does the rest, the same way for all of them:

- **watch** the source's paths with watchfiles (and reload on SIGHUP: the servers call
  ``reload("SIGHUP")``);
- **load off the event loop**, in a worker thread, so that ADS streams and the admin HTTP
  keep answering during a load of seconds (a cold load of the 2,000-cluster benchmark
  folder: see BENCHMARKS.md, "Reload stalls"). While a load runs, the interpreter's switch
  interval is lowered to ``LOAD_SWITCH_INTERVAL`` so that the loading thread hands the GIL
  back to the event loop often;
- **retry FileBusy** (a file open for writing, replaced while read, or a rotation seen
  half-way) here and nowhere else: every ``BUSY_RETRY_SECONDS`` for at most
  ``BUSY_BUDGET_SECONDS`` (the startup loads use the same budget through ``retry_busy``);
- **check** (e.g. ``envoy --mode validate``), then **swap** on the event loop, or keep the
  last good one and record why;
- **record** attempts, successes, unchanged loads, failures, the last errors, ``loaded_at``
  and ``failed_at`` in a ``ReloadState`` (what ``/status`` shows), and report each outcome
  to the source's metrics (``Outcomes``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import watchfiles

from xdsplane.config import stableread
from xdsplane.config.stableread import BUSY_BUDGET_SECONDS, BUSY_RETRY_SECONDS, FileBusy

T = TypeVar("T")

# FileBusy: how long a load is retried while a file is being written, and how often. One
# budget for every file xdsplane reads while running and at startup: long enough for an
# editor's or a rotation's write (milliseconds), short enough that a writer that hangs is
# reported promptly (as an error naming the file; the last good state stays).

# The GIL switch interval while a load runs in its thread (CPython's default is 5 ms): the
# event loop waits at most about this long for the GIL each time it wakes up.
LOAD_SWITCH_INTERVAL = 0.001

WAKE_MS = 250  # the longest a watch sleeps without events (folder replaced, new paths)
# How often an idle watch asks its source whether something changed that it did not report
# (``Source.unseen``): a dropped event is served within about this long.
AUDIT_SECONDS = 1.0


class Refused(Exception):
    """A load that does not check out; ``errors`` name each file (``path:line:col: ...``)."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class Settling(FileBusy):
    """Files seen half-way through a change that is made in several writes (a key that does
    not match its certificate yet): retried like a busy file; when the budget runs out,
    ``errors`` are what is reported."""

    def __init__(self, errors: list[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = errors


class GaveUp(Refused):
    """FileBusy for longer than the budget."""


def _gave_up(e: FileBusy, budget: float) -> GaveUp:
    if isinstance(e, Settling):
        return GaveUp(e.errors)
    return GaveUp([f"{e} (gave up after waiting {budget:g}s)"])


def retry_busy(load: Callable[[], T], budget: float = BUSY_BUDGET_SECONDS) -> T:
    """``load()``, called again while it raises FileBusy, for at most ``budget`` seconds
    (``stableread.retry_busy``); then GaveUp. For loads outside an event loop."""
    try:
        return stableread.retry_busy(load, budget)
    except FileBusy as e:
        raise _gave_up(e, budget) from None


_switch_lock = threading.Lock()
_loads_running = 0
_switch_before = sys.getswitchinterval()


def _in_thread(load: Callable[[], T]) -> Callable[[], T]:
    """``load`` with the switch interval lowered while it runs (restored by the last one)."""

    def run() -> T:
        global _loads_running, _switch_before
        with _switch_lock:
            if _loads_running == 0:
                _switch_before = sys.getswitchinterval()
                sys.setswitchinterval(min(_switch_before, LOAD_SWITCH_INTERVAL))
            _loads_running += 1
        try:
            return load()
        finally:
            with _switch_lock:
                _loads_running -= 1
                if _loads_running == 0:
                    sys.setswitchinterval(_switch_before)

    return run


async def aretry_busy(load: Callable[[], T], budget: float = BUSY_BUDGET_SECONDS) -> T:
    """``load()`` in a worker thread, called again while it raises FileBusy (see
    ``retry_busy``); the event loop keeps running meanwhile."""
    deadline = time.monotonic() + budget
    while True:
        try:
            return await asyncio.to_thread(_in_thread(load))
        except FileBusy as e:
            if time.monotonic() > deadline:
                raise _gave_up(e, budget) from None
        await asyncio.sleep(BUSY_RETRY_SECONDS)


@dataclass
class ReloadState:
    """The outcome of the latest reloads of one source, for /status and /readyz."""

    loaded: bool = False
    loaded_at: float = 0.0
    attempts: int = 0
    successes: int = 0  # loads that changed what is served
    unchanged: int = 0  # loads that found nothing new
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    failed_at: float = 0.0
    warnings: list[str] = field(default_factory=list)  # of what is served (policy: legacy TLS)
    last_duration: float = 0.0  # seconds: load, check and swap of the latest change


class Outcomes(Protocol):
    """Where a source's reload metrics go (the names stay the source's own)."""

    def succeeded(self, seconds: float | None) -> None:
        """Something new is served; ``seconds`` from the start of the reload (None: the
        startup load)."""

    def failed(self) -> None: ...


class Source(Generic[T]):
    """What ``FileReloader`` reloads: override ``load``, ``swap`` and ``watch_paths``; the
    rest has defaults."""

    debounce_ms = 400  # watchfiles: wait this long for a burst of changes to end
    recursive = False  # watch the paths' subfolders too
    # A reload that finds what is served, after a failed one: True serves it again (a
    # success; the policy), False only clears the errors (the TLS files).
    swap_on_recovery = False
    audits = False  # asks ``unseen`` when the watch is idle (it overrides it)

    def load(self) -> T:
        """Runs in a worker thread. Raise Refused (errors naming the files) or FileBusy."""
        raise NotImplementedError

    async def check(self, new: T) -> list[str]:
        """On the event loop, after a good load: problems that keep ``new`` from serving."""
        return []

    def same(self, new: T) -> bool:
        """``new`` is what is served already."""
        return False

    def swap(self, new: T, reason: str, state: ReloadState) -> None:
        """Serve ``new`` (on the event loop); ``state`` is updated already."""
        raise NotImplementedError

    def report_failure(self, errors: list[str], reason: str) -> None:
        """Log a refused load (the last good state stays)."""

    def report_recovery(self, reason: str) -> None:
        """The files are back to what is served (after errors)."""

    def internal_error(self, stage: str, error: Exception) -> str:
        """The error shown for a bug of ours while loading or checking."""
        return f"internal error while {stage}: {error}"

    def watch_paths(self) -> list[Path]:
        raise NotImplementedError

    def relevant(self, change: watchfiles.Change, path: str) -> bool:
        return True

    def identity(self) -> object | None:
        """Changes when what is watched was replaced (a folder deleted and made again);
        None while it is gone."""
        return ()

    def gone(self) -> str:
        """The error while ``identity()`` is None."""
        return "gone"

    def settle(self, changes: set[tuple[watchfiles.Change, str]]) -> float:
        """Seconds to wait after ``changes`` before loading (e.g. an editor's delete and
        create)."""
        return 0.0

    def watching(self, on: bool) -> None:
        """The watch of ``watch_paths`` is in place (True: it reports every change from now
        on) or is not (False)."""

    def changed(self, paths: set[str] | None) -> None:
        """Before a load: the paths the watch reported changed since the last reload, or
        None when that is not known (SIGHUP, a restarted watch, a reload on demand). A
        source may use it to look only at those (the policy folder's loader does)."""

    def unseen(self) -> bool:
        """In a worker thread, while the watch is idle: did something change that the watch
        did not report (then it reloads, every file checked)? A source that trusts
        ``changed`` checks here what it did not look at."""
        return False


class FileReloader(Generic[T]):
    """Watch, load in a thread (FileBusy retried), check, swap, record; see the module."""

    def __init__(
        self,
        source: Source[T],
        log: Any,
        *,
        outcomes: Outcomes | None = None,
        state: ReloadState | None = None,
        busy_budget: float = BUSY_BUDGET_SECONDS,
        step_ms: int = 2,
        poll_ms: int | None = None,
    ) -> None:
        self.source = source
        # Poll every poll_ms instead of inotify (network file systems: docs/scaling.md);
        # None: inotify, unless WATCHFILES_FORCE_POLLING is set.
        self.poll_ms = poll_ms
        self.log = log
        self.outcomes = outcomes
        self.state = state if state is not None else ReloadState()
        self.busy_budget = busy_budget
        self.step_ms = step_ms
        self._lock = asyncio.Lock()

    def load_now(self) -> T:
        """Load on this thread (startup), FileBusy retried; raises Refused."""
        return retry_busy(self.source.load, self.busy_budget)

    def installed(self, new: T, reason: str, started: float | None = None) -> None:
        """Record ``new`` as served and swap it in (``started``: perf_counter at the start
        of the reload; None for the startup load)."""
        s = self.state
        s.loaded = True
        s.loaded_at = time.time()
        s.successes += 1
        s.errors = []
        seconds = None if started is None else time.perf_counter() - started
        if seconds is not None:
            s.last_duration = seconds
        if self.outcomes is not None:
            self.outcomes.succeeded(seconds)
        self.source.swap(new, reason, s)

    async def reload(self, reason: str = "change", changed: set[str] | None = None) -> bool:
        """Load, check and serve the source if it is good and new; True when something new
        is served. The last good state stays otherwise, and the errors are recorded.
        ``changed``: the paths the watch reported (None: not known; ``Source.changed``)."""
        async with self._lock:
            started = time.perf_counter()
            self.state.attempts += 1
            self.source.changed(changed)
            try:
                new = await aretry_busy(self.source.load, self.busy_budget)
            except Refused as e:
                return self.failed(e.errors, reason)
            except Exception as e:  # never let a surprise take down what is serving
                self.log.exception("reload crashed")
                return self.failed([self.source.internal_error("loading", e)], reason)
            try:
                problems = await self.source.check(new)
            except Exception as e:  # a broken check must not end the reload loop
                self.log.exception("validator crashed")
                problems = [self.source.internal_error("validating", e)]
            if problems:
                return self.failed(problems, reason)
            if self.source.same(new) and not (self.state.errors and self.source.swap_on_recovery):
                self.state.unchanged += 1
                if self.state.errors:
                    self.state.errors = []
                    self.source.report_recovery(reason)
                return False
            self.installed(new, reason, started)
            return True

    async def _unseen(self) -> bool:
        async with self._lock:  # not while a load changes what the source holds
            try:
                return await asyncio.to_thread(self.source.unseen)
            except Exception:  # a broken check must not end the watch
                self.log.exception("unseen-change check crashed")
                return False

    def failed(self, errors: list[str], reason: str) -> bool:
        s = self.state
        s.failures += 1
        s.errors = errors
        s.failed_at = time.time()
        if self.outcomes is not None:
            self.outcomes.failed()
        self.source.report_failure(errors, reason)
        return False

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set, reloading on every relevant change.

        The watch wakes at least every ``WAKE_MS`` even without events, to notice what it
        watches being deleted or replaced (an inotify watch would never fire again) and a
        change in the set of paths to watch (a symlink or a secret now leads elsewhere);
        either restarts the watch, and the first wake-up after a restart reloads, so that
        an edit made while no watch was in place is not missed.
        """
        resync = False
        gone_reported = False
        while not stop.is_set():
            identity = self.source.identity()
            if identity is None:
                if not gone_reported:
                    # An error like any failed load: logged and in /status until a load
                    # succeeds again.
                    self.failed([self.source.gone()], "gone")
                    gone_reported = True
                resync = True
                await _wait(stop, 0.1)
                continue
            gone_reported = False
            paths = self.source.watch_paths()
            if not paths:
                await _wait(stop, WAKE_MS / 1000)
                continue
            halt = asyncio.Event()
            relay = asyncio.create_task(_relay(stop, halt))
            started = False
            audited = time.monotonic()
            try:
                async for changes in watchfiles.awatch(
                    *paths,
                    step=self.step_ms,
                    debounce=self.source.debounce_ms,
                    stop_event=halt,
                    recursive=self.source.recursive,
                    ignore_permission_denied=True,
                    watch_filter=self.source.relevant,
                    rust_timeout=WAKE_MS,
                    yield_on_timeout=True,
                    force_polling=True if self.poll_ms else None,
                    poll_delay_ms=self.poll_ms or 300,
                ):
                    if not started:
                        # The watch is in place (watchfiles adds it before the first
                        # yield): every change from here on is reported.
                        self.source.watching(True)
                        started = True
                    if self.source.identity() != identity:
                        resync = True
                        break
                    delay = self.source.settle(changes) if changes else 0.0
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if changes or resync:
                        seen = None if resync else {p for _, p in changes}
                        await self.reload("change" if changes else "watch restarted", seen)
                        resync = False
                        audited = time.monotonic()
                    elif (
                        self.source.audits
                        and started
                        and time.monotonic() - audited > AUDIT_SECONDS
                    ):
                        audited = time.monotonic()
                        if await self._unseen():
                            await self.reload("change the watch did not report")
                    if self.source.watch_paths() != paths:
                        resync = True
                        break
            except (FileNotFoundError, RuntimeError, OSError) as e:
                self.log.warning("watch interrupted, retrying", error=str(e))
                resync = True
                await _wait(stop, 0.1)
            finally:
                relay.cancel()
                if started:
                    self.source.watching(False)


def norm(p: Path) -> Path:
    """``p`` absolute and normalised, without resolving symlinks."""
    return Path(os.path.normpath(os.path.abspath(p)))


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
