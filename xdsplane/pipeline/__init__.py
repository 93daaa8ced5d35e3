"""The pipeline: a policy folder -> the snapshots to serve, or every error found.

    read the folder     folder.py      YAML files -> Units (policy + raw resources), cached
         |                             by content; units.py parses one document, raw.py
         v                             its raw Envoy resources
    group by node       groups.py      files with the same ``nodes`` + every file without
         |
         v
    merge, check        groups.py      policy.merge, policy.check (per group)
         |
         v
    read secret files   build.py       certificates, keys, CAs, JWKS (checked, watched)
         |
         v
    translate           translations.py  policy.translate, cached per policy part
         |
         v
    build snapshots     build.py       raw resources added, duplicates refused,
                                       refs.py checks every reference

Every caller goes through this package: ``serve`` (its reloads keep one ``FolderLoader``
so unchanged files are not parsed or translated again), ``validate``, ``render``, ``diff``
and ``envoycheck`` through ``load``, the guard through ``load_policy``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from xdsplane.config import stableread
from xdsplane.config.errors import ConfigError, ConfigErrors
from xdsplane.pipeline.folder import FolderLoader
from xdsplane.pipeline.groups import merge_and_check, node_groups, scope_of
from xdsplane.pipeline.listing import list_files
from xdsplane.policy.merge import GroupPolicy
from xdsplane.redact import scrub_message
from xdsplane.snapshot import SnapshotSet

__all__ = [
    "FolderLoader",
    "LoadResult",
    "NodePolicy",
    "list_files",
    "load",
    "load_policy",
]


@dataclass(frozen=True, slots=True)
class LoadResult:
    """What a one-shot load found: the snapshots, or the errors (one line each)."""

    snapshots: SnapshotSet | None
    errors: tuple[str, ...]

    @property
    def warnings(self) -> tuple[ConfigError, ...]:
        return self.snapshots.warnings if self.snapshots is not None else ()


def load(folder: Path, busy_seconds: float = stableread.BUSY_BUDGET_SECONDS) -> LoadResult:
    """Load ``folder`` once (for a command): never raises for bad input.

    A file being written is waited for (up to ``busy_seconds``); an unexpected exception is a
    bug of ours, reported as one scrubbed line rather than a traceback.
    """
    stableread.install()
    loader = FolderLoader(folder)
    try:
        return LoadResult(stableread.retry_busy(loader.load, busy_seconds), ())
    except stableread.FileBusy:
        return LoadResult(None, (f"{folder}: files stayed open for writing; try again",))
    except ConfigErrors as e:
        return LoadResult(None, tuple(str(x) for x in e.errors))
    except Exception as e:
        text = f"{folder}: internal error while loading ({type(e).__name__}: {e})"
        return LoadResult(None, (scrub_message(text),))


@dataclass(frozen=True, slots=True)
class NodePolicy:
    """One node group's merged policy (before translation)."""

    name: str
    nodes: tuple[str, ...] | None
    policy: GroupPolicy


def load_policy(
    folder: Path, busy_seconds: float = stableread.BUSY_BUDGET_SECONDS
) -> tuple[list[NodePolicy], list[ConfigError]]:
    """Each node group's merged and checked policy, as ``serve`` forms it (for the guard).

    Secret and JWKS files are not read, nothing is translated. Raises ConfigErrors when a
    file does not parse, FileBusy when one stays open for writing; returns the problems the
    checks find with the policies, for the caller to add its own before it reports them.
    """
    units = stableread.retry_busy(FolderLoader(folder).units, busy_seconds)
    groups = node_groups(units)
    out: list[NodePolicy] = []
    errors: list[ConfigError] = []
    for group in groups:
        policy, _, problems = merge_and_check(group.units, scope_of(group, groups))
        errors.extend(problems)
        out.append(NodePolicy(group.name, group.nodes, policy))
    return out, errors
