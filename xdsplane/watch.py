"""The policy folder's reload: watch it, rebuild, validate, swap; keep the last good snapshot.

A thin adapter (``Source``) on ``xdsplane.reload.FileReloader``, which watches, loads in a
worker thread (retrying files being written for at most ``busy_timeout``), checks, swaps and
records. A reload that fails (a YAML error, a dangling reference, a file still being written
for longer than ``busy_timeout``) changes nothing that is served: the error is logged with
its ``file:line`` and shown in /status until a later reload succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import watchfiles

from xdsplane import logs, tlsfiles
from xdsplane.cache import SnapshotCache
from xdsplane.config.errors import ConfigErrors
from xdsplane.config.stableread import BUSY_BUDGET_SECONDS
from xdsplane.metrics import Metrics
from xdsplane.pipeline import FolderLoader
from xdsplane.redact import scrub_message
from xdsplane.reload import (
    WAKE_MS,
    FileReloader,
    Refused,
    ReloadState,
    Source,
)
from xdsplane.snapshot import SnapshotSet

__all__ = ["WAKE_MS", "ReloadState", "Reloader", "Validator"]

Validator = Callable[[SnapshotSet], Awaitable[list[str]]]
DELETE_SETTLE_SECONDS = 0.15  # how long a deleted policy file has to reappear
STAPLE_WAKE_SECONDS = 1.0  # the longest the staple deadline watch sleeps (to see new snapshots)


class _Outcomes:
    """The policy's reload metrics (``xdsplane_reload_*``)."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def succeeded(self, seconds: float | None) -> None:
        self.metrics.installed()
        if seconds is not None:
            self.metrics.reload_took(seconds)

    def failed(self) -> None:
        self.metrics.reload_failed()


class Reloader(Source[SnapshotSet]):
    """Serves the policy folder ``root`` from ``cache``, reloaded on change and on demand."""

    debounce_ms = 1600
    recursive = True
    swap_on_recovery = True  # a load back to what is served, after errors, is served again
    audits = True  # files reused without a stat are checked when the watch is idle

    def __init__(
        self,
        root: Path,
        cache: SnapshotCache,
        *,
        step_ms: int = 2,
        busy_timeout: float = BUSY_BUDGET_SECONDS,
        validator: Validator | None = None,
        cert_warn_days: float = 14.0,
        metrics: Metrics | None = None,
        cache_dir: Path | None = None,
        poll_ms: int | None = None,
    ) -> None:
        self.cert_warn_days = cert_warn_days
        self.metrics = metrics if metrics is not None else Metrics()
        self.root = root
        self.cache = cache
        self.loader = FolderLoader(root, cache_dir=cache_dir)
        self.validator = validator
        self.log = logs.get("xdsplane.reload")
        # The files outside the folder the latest load read (secrets): written by the
        # loading thread as one object, read by the watch on the event loop.
        self._outside: frozenset[str] = frozenset()
        self.reloads = FileReloader(
            self,
            self.log,
            outcomes=_Outcomes(self.metrics),
            busy_budget=busy_timeout,
            step_ms=step_ms,
            poll_ms=poll_ms,
        )
        self.state = self.reloads.state

    # -- Source ---------------------------------------------------------------------------

    def load(self) -> SnapshotSet:
        """In a worker thread: raises Refused (every error, ``path:line:col``) or FileBusy."""
        try:
            return self.loader.load()
        except ConfigErrors as e:
            raise Refused([str(x) for x in e.errors]) from None
        finally:
            self._outside = frozenset(self.loader.outside_files())

    async def check(self, new: SnapshotSet) -> list[str]:
        if self.validator is None:
            return []
        return await self.validator(new)

    def same(self, new: SnapshotSet) -> bool:
        # Nothing new (a touched file, a save of identical content): not a reload.
        return _same_set(self.cache.current, new)

    def swap(self, new: SnapshotSet, reason: str, state: ReloadState) -> None:
        """Serve ``new``: the cache swaps, streams are told, expiry is checked."""
        changed = self.cache.update(new)
        self.warn_expiring(new)
        state.warnings = [str(w) for w in new.warnings]
        for w in new.warnings:
            self.log.warning("policy warning", location=str(w.location), warning=w.message)
        if reason == "startup":
            return
        self.log.info(
            "reload",
            reason=reason,
            groups=[g.name for g in new.groups],
            resources=sum(g.snapshot.count() for g in new.groups),
            streams_notified=len(changed),
            ms=round(state.last_duration * 1000, 2),
        )

    def report_failure(self, errors: list[str], reason: str) -> None:
        for err in errors:
            self.log.error("reload failed, still serving the last good snapshot", error=err)
        self.log.warning("reload rejected", reason=reason, errors=len(errors))

    def internal_error(self, stage: str, error: Exception) -> str:
        return scrub_message(f"{self.root}: internal error while {stage}: {error}")

    def identity(self) -> tuple[int, int] | None:
        try:
            st = self.root.stat()
        except OSError:
            return None
        return (st.st_dev, st.st_ino) if self.root.is_dir() else None

    def gone(self) -> str:
        if self.root.exists():
            return f"{self.root}: is no longer a folder"
        return f"{self.root}: the policy folder is gone (deleted or unmounted)"

    def settle(self, changes: set[tuple[watchfiles.Change, str]]) -> float:
        # Editors save by deleting and creating: wait for the new file rather than serve
        # the folder without it for a moment.
        deleted = any(
            c == watchfiles.Change.deleted and self._is_policy_file(p) for c, p in changes
        )
        return DELETE_SETTLE_SECONDS if deleted else 0.0

    def watch_paths(self) -> list[Path]:
        """The folder, plus the folders of the files its secrets name (outside it)."""
        root = self.root.resolve()
        extra: set[Path] = set()
        for f in self._outside:
            folder = Path(f).parent
            if folder.is_dir() and not folder.resolve().is_relative_to(root):
                extra.add(folder)
        return [self.root, *sorted(extra)]

    def relevant(self, change: watchfiles.Change, path: str) -> bool:
        return self._relevant(change, path)

    def watching(self, on: bool) -> None:
        self.loader.watching(on)

    def changed(self, paths: set[str] | None) -> None:
        # Only the files the watch names are looked at again (the others not even stat-ed).
        self.loader.changed(paths)

    def unseen(self) -> bool:
        return self.loader.unseen()

    # -- the policy's own API -------------------------------------------------------------

    def load_now(self) -> SnapshotSet:
        """Load on this thread (at startup), FileBusy retried; raises Refused."""
        return self.reloads.load_now()

    def install(self, snapshots: SnapshotSet) -> None:
        """Serve ``snapshots`` loaded at startup (counted as a success, as in /status)."""
        self.reloads.installed(snapshots, "startup")

    async def reload(self, reason: str = "change", changed: set[str] | None = None) -> bool:
        """Load the folder and serve it if it is good; True when something new is served.
        ``changed``: the files the watch saw change (None: check every file)."""
        return await self.reloads.reload(reason, changed)

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set; survives the folder vanishing; follows secret files
        (see ``FileReloader.run``)."""
        await self.reloads.run(stop)

    async def run_staple_deadlines(self, stop: asyncio.Event) -> None:
        """Reload when a served OCSP staple reaches its nextUpdate, until ``stop`` is set.

        No file changes then, but what may be served does: the load leaves an expired staple
        out of its Secret (Envoy fails every handshake of a host with ``ocsp: strict`` that
        still has one) or, with ``ocsp: must_staple``, is refused, which /status shows while
        the last good snapshot keeps serving. Each (secret, nextUpdate) reloads once."""
        done: set[tuple[str, datetime.datetime]] = set()
        while not stop.is_set():
            wait = STAPLE_WAKE_SECONDS
            current = self.cache.current
            now = datetime.datetime.now(datetime.UTC)
            for cert in current.certificates if current is not None else ():
                due = cert.ocsp_next_update
                if not cert.ocsp_stapled or due is None or (cert.secret, due) in done:
                    continue
                # dropped a margin before its nextUpdate (tlsfiles.STAPLE_MARGIN_SECONDS)
                left = (due - now).total_seconds() - tlsfiles.STAPLE_MARGIN_SECONDS
                if left > 0:
                    wait = min(wait, left)
                    continue
                done.add((cert.secret, due))
                self.log.warning(
                    "ocsp staple expired, reloading",
                    secret=cert.secret,
                    next_update=due.isoformat(),
                )
                await self.reload("ocsp staple expired")
                wait = 0.0
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(wait, 0.05))

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
        read = self._outside  # secret and JWKS files, wherever they are
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
