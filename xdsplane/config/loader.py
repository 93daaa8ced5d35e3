"""A folder of YAML files -> a validated SnapshotSet, or every error found.

Files are cached by content: a file whose bytes did not change is not parsed or
serialized again, so a one-file edit rebuilds only that file's resources.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from xdsplane.config.check import Ref, check_snapshot, references
from xdsplane.config.errors import ConfigError, ConfigErrors, Location
from xdsplane.config.raw import FileContent, parse_raw
from xdsplane.config.stableread import FileBusy, read_stable
from xdsplane.config.yamlsrc import YamlError, parse
from xdsplane.snapshot import NodeGroup, Resource, Snapshot, SnapshotSet, digest
from xdsplane.types import ResourceType

SUFFIXES = (".yaml", ".yml")


def list_files(root: Path) -> list[Path]:
    """The YAML files under ``root``, sorted; hidden files and folders are skipped.

    Hidden entries cover editors' swap files and Kubernetes' ``..data`` folders (whose
    files are reached through the visible symlinks beside them).
    """
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or not name.endswith(SUFFIXES):
                continue
            found.append(Path(dirpath) / name)
    return sorted(found)


@dataclass
class FolderLoader:
    """Loads one folder again and again, reusing what did not change."""

    root: Path
    _parsed: dict[str, tuple[str, list[FileContent]]] = field(default_factory=dict)
    _refs: dict[tuple[ResourceType, str, str], tuple[Ref, ...]] = field(default_factory=dict)

    def _display(self, path: Path) -> str:
        return str(path)

    def _parse_file(self, path: Path, errors: list[ConfigError]) -> list[FileContent]:
        shown = self._display(path)
        try:
            data = read_stable(str(path))
        except FileBusy:
            raise
        except IsADirectoryError:
            errors.append(ConfigError(Location(shown), "is not a regular file"))
            return []
        except OSError as e:
            errors.append(ConfigError(Location(shown), f"cannot read: {e.strerror or e}"))
            return []
        key = digest(data)
        cached = self._parsed.get(shown)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            errors.append(ConfigError(Location(shown), f"not UTF-8 text (byte {e.start})"))
            return []
        try:
            docs = parse(text, shown)
        except YamlError as e:
            errors.append(e.error)
            return []
        contents: list[FileContent] = []
        file_errors: list[ConfigError] = []
        for doc in docs:
            content, errs = parse_raw(doc)
            file_errors.extend(errs)
            if content is not None:
                contents.append(content)
        if file_errors:
            errors.extend(file_errors)
            return []
        self._parsed[shown] = (key, contents)
        return contents

    def _refs_of(self, resource: Resource) -> tuple[Ref, ...]:
        key = (resource.type, resource.name, resource.version)
        refs = self._refs.get(key)
        if refs is None:
            refs = references(resource)
            self._refs[key] = refs
        return refs

    def load(self) -> SnapshotSet:
        """Load the folder; raises ConfigErrors (all of them) or FileBusy (try again)."""
        errors: list[ConfigError] = []
        if not self.root.is_dir():
            raise ConfigErrors([ConfigError(Location(str(self.root)), "is not a folder")])
        files = list_files(self.root)
        if not files:
            raise ConfigErrors(
                [ConfigError(Location(str(self.root)), "holds no .yaml or .yml files")]
            )
        contents: list[FileContent] = []
        for path in files:
            contents.extend(self._parse_file(path, errors))
        seen = {self._display(p) for p in files}
        for stale in set(self._parsed) - seen:
            del self._parsed[stale]
        if errors:
            raise ConfigErrors(errors)
        snapshots = build_groups(contents, lambda s, g: check_snapshot(s, g, self._refs_of))
        if len(self._refs) > 100_000:
            self._refs.clear()
        return snapshots


def _group_name(nodes: tuple[str, ...] | None) -> str:
    return "*" if nodes is None else ",".join(nodes)


Checker = Callable[[Snapshot, str], list[ConfigError]]


def build_groups(contents: Iterable[FileContent], check: Checker | None = None) -> SnapshotSet:
    """Group file contents by their ``nodes`` and build one snapshot per group.

    Files without ``nodes`` are served to every group and form the catch-all group for
    nodes no glob selects. A node takes the first group (by file order) that selects it.
    """
    contents = list(contents)
    common = [c for c in contents if c.nodes is None]
    order: list[tuple[str, ...]] = []
    members: dict[tuple[str, ...], list[FileContent]] = {}
    for c in contents:
        if c.nodes is None:
            continue
        if c.nodes not in members:
            order.append(c.nodes)
            members[c.nodes] = []
        members[c.nodes].append(c)
    plan: list[tuple[tuple[str, ...] | None, list[FileContent]]] = [
        (nodes, members[nodes] + common) for nodes in order
    ]
    if common:
        plan.append((None, common))
    errors: list[ConfigError] = []
    groups: list[NodeGroup] = []
    for nodes, files in plan:
        name = _group_name(nodes)
        scope = name if len(plan) > 1 else ""
        resources, errs = _merge(files, scope)
        errors.extend(errs)
        snapshot = Snapshot.build(resources)
        if check is not None and not errs:
            errors.extend(check(snapshot, scope))
        groups.append(NodeGroup(name, nodes, snapshot))
    if errors:
        raise ConfigErrors(_unique(errors))
    return SnapshotSet(tuple(groups))


def _merge(files: list[FileContent], group: str) -> tuple[list[Resource], list[ConfigError]]:
    by_key: dict[tuple[ResourceType, str], Resource] = {}
    errors: list[ConfigError] = []
    for f in files:
        for r in f.resources:
            key = (r.type, r.name)
            first = by_key.get(key)
            if first is not None:
                scope = f" (for nodes {group})" if group else ""
                errors.append(
                    ConfigError(
                        Location.parse(r.source),
                        f"duplicate {r.type.short} name {r.name!r}, first defined at "
                        f"{first.source}{scope}",
                    )
                )
                continue
            by_key[key] = r
    return list(by_key.values()), errors


def _unique(errors: list[ConfigError]) -> list[ConfigError]:
    return list(dict.fromkeys(errors))
