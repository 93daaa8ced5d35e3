"""The reload loop: watch the folder, rebuild, validate, swap; keep the last good snapshot.

A reload that fails (a YAML error, a dangling reference, a file still being written for
longer than ``busy_timeout``) changes nothing that is served: the error is logged with its
``file:line`` and shown in /status until a later reload succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import watchfiles

from xdsplane import logs
from xdsplane.cache import SnapshotCache, Watch
from xdsplane.config.errors import ConfigErrors
from xdsplane.config.stableread import FileBusy
from xdsplane.metrics import Metrics
from xdsplane.pipeline import FolderLoader
from xdsplane.redact import scrub_message
from xdsplane.snapshot import SnapshotSet

Validator = Callable[[SnapshotSet], Awaitable[list[str]]]
WAKE_MS = 250  # the longest the watch sleeps without events (folder replaced, new paths)
DELETE_SETTLE_SECONDS = 0.15  # how long a deleted policy file has to reappear


@dataclass
class ReloadState:
    """The outcome of the latest reloads, for /status and /readyz."""

    loaded: bool = False
    loaded_at: float = 0.0
    attempts: int = 0
    successes: int = 0  # loads that changed what is served
    unchanged: int = 0  # loads that found nothing new
    failures: int = 0
    errors: list[str] = field(default_factory=list)
    failed_at: float = 0.0
    warnings: list[str] = field(default_factory=list)  # of what is served (legacy TLS)
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
        cert_warn_days: float = 14.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.cert_warn_days = cert_warn_days
        self.metrics = metrics if metrics is not None else Metrics()
        self.root = root
        self.cache = cache
        self.loader = FolderLoader(root)
        self.step_ms = step_ms
        self.busy_timeout = busy_timeout
        self.validator = validator
        self.state = ReloadState()
        self.log = logs.get("xdsplane.reload")
        self._lock = asyncio.Lock()

    def install(self, snapshots: SnapshotSet) -> list[Watch]:
        """Serve ``snapshots``: the cache swaps, streams are told, expiry is checked."""
        changed = self.cache.update(snapshots)
        self.state.loaded = True
        self.state.loaded_at = time.time()
        self.state.successes += 1
        self.state.errors = []
        self.metrics.installed()
        self.warn_expiring(snapshots)
        self.state.warnings = [str(w) for w in snapshots.warnings]
        for w in snapshots.warnings:
            self.log.warning("policy warning", location=str(w.location), warning=w.message)
        return changed

    def warn_expiring(self, snapshots: SnapshotSet) -> None:
        limit = self.cert_warn_days * 86400
        for cert in snapshots.certificates:
            left = cert.seconds_left()
            if left < limit:
                self.log.warning(
                    "certificate expires soon",
                    secret=cert.secret,
                    path=cert.path,
                    subject=cert.subject,
                    not_after=cert.not_after.isoformat(),
                    days_left=round(left / 86400, 1),
                )

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
                        waited = f"gave up after waiting {self.busy_timeout:g}s"
                        return self._failed([f"{e} ({waited})"], reason)
                    await asyncio.sleep(0.005)
                except ConfigErrors as e:
                    return self._failed([str(x) for x in e.errors], reason)
                except Exception as e:  # never let a surprise take down what is serving
                    self.log.exception("reload crashed")
                    text = scrub_message(f"{self.root}: internal error while loading: {e}")
                    return self._failed([text], reason)
            if self.validator is not None:
                try:
                    problems = await self.validator(snapshots)
                except Exception as e:  # a broken check must not end the reload loop
                    self.log.exception("validator crashed")
                    problems = [scrub_message(f"{self.root}: internal error while validating: {e}")]
                if problems:
                    return self._failed(problems, reason)
            if _same_set(self.cache.current, snapshots) and not self.state.errors:
                # Nothing new (a touched file, a save of identical content): not a reload.
                self.state.unchanged += 1
                self.log.debug("reload: nothing changed", reason=reason)
                return False
            changed = self.install(snapshots)
            self.state.last_duration = time.perf_counter() - started
            self.metrics.reload_took(self.state.last_duration)
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
        self.metrics.reload_failed()
        self.state.errors = errors
        self.state.failed_at = time.time()
        for err in errors:
            self.log.error("reload failed, still serving the last good snapshot", error=err)
        self.log.warning("reload rejected", reason=reason, errors=len(errors))
        return False

    def watch_paths(self) -> list[Path]:
        """The folder, plus the folders of the files its secrets name (outside it)."""
        root = self.root.resolve()
        extra: set[Path] = set()
        for f in self.loader.outside_files():
            folder = Path(f).parent
            if folder.is_dir() and not folder.resolve().is_relative_to(root):
                extra.add(folder)
        return [self.root, *sorted(extra)]

    def _is_policy_file(self, path: str) -> bool:
        p = _norm(Path(path))
        for root in {_norm(self.root), self.root.resolve()}:
            if root in p.parents:
                rel = p.relative_to(root)
                hidden = any(part.startswith(".") for part in rel.parts)
                return not hidden and p.suffix in (".yaml", ".yml")
        return False

    def _relevant(self, change: watchfiles.Change, path: str) -> bool:
        """Changes that can matter: policy files (not hidden, not editors' temporary files),
        the secret files and their folders (rotations write a temporary file and rename it;
        Kubernetes swaps a ``..data`` link); the rest is noise."""
        p = Path(os.path.normpath(os.path.abspath(path)))
        if p.name == "..data":
            return True
        read = self.loader.outside_files()  # secret and JWKS files, wherever they are
        if any(p in (_norm(Path(f)), Path(f).resolve()) for f in read):
            return True
        for root in {_norm(self.root), self.root.resolve()}:
            if p == root or root in p.parents:
                rel = p.relative_to(root)
                if any(part.startswith(".") for part in rel.parts):
                    return False
                return p.suffix in (".yaml", ".yml") or p.is_dir()
        for f in read:
            for candidate in {_norm(Path(f)), Path(f).resolve()}:
                if p.parent == candidate.parent:
                    return True
        return False

    def _gone(self) -> str:
        if self.root.exists():
            return "is no longer a folder"
        return "the policy folder is gone (deleted or unmounted)"

    def _identity(self) -> tuple[int, int] | None:
        try:
            st = self.root.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if self.root.is_dir() else None

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set; survives the folder vanishing; follows secret files.

        The watch wakes at least every ``WAKE_MS`` even without events, to notice a folder
        that was deleted or replaced (its inotify watch would never fire again) and a change
        in the set of folders to watch (a secret now names a file elsewhere); either restarts
        the watch, and the first wake-up after a restart reloads, so that an edit made while
        no watch was in place is not missed.
        """
        resync = False
        gone_logged = False
        while not stop.is_set():
            identity = self._identity()
            if identity is None:
                if not gone_logged:
                    # An error like any failed load: in the log and /status until a load
                    # of the folder, back again, succeeds.
                    self._failed([f"{self.root}: {self._gone()}"], "folder gone")
                    gone_logged = True
                resync = True
                await _wait(stop, 0.1)
                continue
            gone_logged = False
            paths = self.watch_paths()
            halt = asyncio.Event()
            relay = asyncio.create_task(_relay(stop, halt))
            try:
                async for changes in watchfiles.awatch(
                    *paths,
                    step=self.step_ms,
                    debounce=1600,
                    stop_event=halt,
                    recursive=True,
                    ignore_permission_denied=True,
                    watch_filter=self._relevant,
                    rust_timeout=WAKE_MS,
                    yield_on_timeout=True,
                ):
                    if self._identity() != identity:
                        resync = True
                        break
                    if any(
                        c == watchfiles.Change.deleted and self._is_policy_file(p)
                        for c, p in changes
                    ):
                        # Editors save by deleting and creating: wait for the new file
                        # rather than serve the folder without it for a moment.
                        await asyncio.sleep(DELETE_SETTLE_SECONDS)
                    if changes or resync:
                        await self.reload("change" if changes else "watch restarted")
                        resync = False
                    if self.watch_paths() != paths:
                        resync = True
                        break
            except (FileNotFoundError, RuntimeError, OSError) as e:
                self.log.warning("watch interrupted, retrying", error=str(e))
                resync = True
                await _wait(stop, 0.1)
            finally:
                relay.cancel()


def _norm(p: Path) -> Path:
    return Path(os.path.normpath(os.path.abspath(p)))


def _same_set(a: SnapshotSet | None, b: SnapshotSet) -> bool:
    if a is None or len(a.groups) != len(b.groups):
        return False
    same_groups = all(
        x.name == y.name and x.globs == y.globs and x.snapshot.digest == y.snapshot.digest
        for x, y in zip(a.groups, b.groups, strict=True)
    )
    return same_groups and a.certificates == b.certificates


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
