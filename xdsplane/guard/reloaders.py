"""The guard's watched files: the rate limits (``--limits FILE``, ``--policy DIR``) and the
revocations (``--revocations FILE``), reloaded through ``xdsplane.reload`` when they change
and on SIGHUP; a load with errors is logged and the last good state stays.

Kubernetes mounts a ConfigMap or Secret as a folder whose files are symlinks
(``limits.yaml -> ..data/limits.yaml``) into a versioned folder: an update writes a new
``..2026_12_05_...`` folder and swaps the ``..data`` symlink to it in one rename, so the
files' own paths never see an event. A change of ``..data`` beside a watched file, or at
the top of the policy folder, therefore counts as a change of the files; and each
reloader's ``identity`` is where its symlinks lead, so a swap made while no watch was in
place (or of a symlink elsewhere in the path) restarts the watch and reloads too.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import watchfiles
from prometheus_client import CollectorRegistry, Counter

from xdsplane import logs
from xdsplane.config.errors import ConfigErrors
from xdsplane.guard.limits import GuardLimits, load_limits
from xdsplane.guard.policy import combine, limits_from_policy
from xdsplane.guard.revoke import Revocation, RevocationError, read_file
from xdsplane.guard.service import GuardService
from xdsplane.reload import FileReloader, Refused, ReloadState, Source, norm

SWAPPED = "..data"  # the symlink a Kubernetes ConfigMap/Secret volume swaps on an update


def load_all(limits: Path | None, policy: Path | None) -> GuardLimits:
    """The limits file's and the policy's limits; raises ConfigErrors, or FileBusy while a
    file is being written."""
    loaded = load_limits(limits) if limits is not None else GuardLimits()
    if policy is not None:
        loaded = combine(loaded, limits_from_policy(policy), policy)
    return loaded


def _resolved(path: Path) -> Path | None:
    try:
        return Path(os.path.realpath(path, strict=True))
    except OSError:
        return None


def file_changed(path: str, watched: Path) -> bool:
    """``path`` (an event) changes the file ``watched``: the file itself, the file it
    leads to (a symlink), or the ``..data`` symlink beside it (a ConfigMap update)."""
    p = norm(Path(path))
    target = norm(watched)
    if p == target or p == target.parent / SWAPPED:
        return True
    return p == _resolved(watched)


def file_watch_paths(watched: Path) -> list[Path]:
    """The folders whose events can change ``watched``: its own, and that of the file it
    leads to when it is a symlink."""
    paths = [norm(watched).parent]
    target = _resolved(watched)
    if target is not None and target.parent not in paths:
        paths.append(target.parent)
    return [p for p in paths if p.is_dir()]


class _Outcomes:
    """``xdsplane_guard_limits_reloads_total{result}``."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.counter = Counter(
            "xdsplane_guard_limits_reloads",
            "reloads of the rate limits (--policy, --limits), by result (success: new limits "
            "apply; failure: refused, the previous ones stay)",
            ["result"],
            registry=registry,
        )

    def succeeded(self, seconds: float | None) -> None:
        if seconds is not None:
            self.counter.labels("success").inc()

    def failed(self) -> None:
        self.counter.labels("failure").inc()


class LimitsReloader(Source[GuardLimits]):
    """Reloads the limits when the limits file or the policy folder changes (watched, either
    alone or both) and on SIGHUP."""

    debounce_ms = 400

    def __init__(self, limits: Path | None, policy: Path | None, service: GuardService) -> None:
        self.limits = limits
        self.policy = policy
        self.service = service
        self.log = logs.get("xdsplane.guard")
        self.reloads = FileReloader(self, self.log, outcomes=_Outcomes(service.metrics.registry))
        self.state = self.reloads.state

    @property
    def recursive(self) -> bool:  # type: ignore[override]
        return self.policy is not None  # a policy folder's subfolders hold policy too

    def load(self) -> GuardLimits:
        try:
            return load_all(self.limits, self.policy)
        except ConfigErrors as e:
            raise Refused([str(x) for x in e.errors]) from None

    def swap(self, new: GuardLimits, reason: str, state: ReloadState) -> None:
        self.service.limits = new
        self.log.info("limits reloaded", why=reason, rules=new.rule_count())

    def report_failure(self, errors: list[str], reason: str) -> None:
        self.log.error("limits not reloaded; keeping the last good ones", why=reason, errors=errors)

    def internal_error(self, stage: str, error: Exception) -> str:
        return f"internal error while {stage}: {type(error).__name__}: {error}"

    def watch_paths(self) -> list[Path]:
        paths: list[Path] = []
        if self.policy is not None and self.policy.is_dir():
            paths.append(self.policy)
        if self.limits is not None:
            inside = self.policy is not None and self._in_policy(norm(self.limits))
            if not inside:
                paths += [p for p in file_watch_paths(self.limits) if p not in paths]
        return paths

    def identity(self) -> object | None:
        # Where the symlinks lead: a swap elsewhere in the path restarts the watch.
        return tuple(_resolved(p) for p in (self.limits, self.policy) if p is not None)

    def _in_policy(self, p: Path) -> Path | None:
        """The root of the policy folder ``p`` is in (as given or resolved), if any."""
        folder = self.policy
        if folder is None:
            return None
        for root in {norm(folder), folder.resolve()}:
            if p == root or root in p.parents:
                return root
        return None

    def relevant(self, change: watchfiles.Change, path: str) -> bool:
        if self.limits is not None and file_changed(path, self.limits):
            return True
        p = norm(Path(path))
        root = self._in_policy(p)
        if root is None:
            return False
        parts = p.relative_to(root).parts
        if parts == (SWAPPED,):  # a ConfigMap update: every file may have changed
            return True
        if any(part.startswith(".") for part in parts):
            return False
        return p.suffix in (".yaml", ".yml") or p.is_dir()

    async def reload(self, why: str) -> bool:
        return await self.reloads.reload(why)

    async def watch(self, stop: asyncio.Event) -> None:
        if self.policy is None and self.limits is None:
            return
        await self.reloads.run(stop)


class RevocationsReloader(Source[list[Revocation]]):
    """Reloads the revocations file (--revocations) when it changes and on SIGHUP."""

    debounce_ms = 50  # a revocation applies within a second

    def __init__(self, path: Path, service: GuardService) -> None:
        self.path = path
        self.service = service
        self.log = logs.get("xdsplane.guard")
        self.reloads = FileReloader(self, self.log)
        self.state = self.reloads.state

    def load(self) -> list[Revocation]:
        try:
            return read_file(self.path)
        except RevocationError as e:
            raise Refused([str(e)]) from None

    def swap(self, new: list[Revocation], reason: str, state: ReloadState) -> None:
        self.service.revocations.set_file(new)
        self.log.info("revocations reloaded", why=reason, file=str(self.path), entries=len(new))

    def report_failure(self, errors: list[str], reason: str) -> None:
        self.log.error(
            "revocations not reloaded; keeping the last good ones", why=reason, errors=errors
        )

    def watch_paths(self) -> list[Path]:
        return file_watch_paths(self.path)

    def identity(self) -> object | None:
        return (_resolved(self.path),)

    def relevant(self, change: watchfiles.Change, path: str) -> bool:
        return file_changed(path, self.path)

    async def reload(self, why: str) -> bool:
        return await self.reloads.reload(why)

    async def watch(self, stop: asyncio.Event) -> None:
        await self.reloads.run(stop)
