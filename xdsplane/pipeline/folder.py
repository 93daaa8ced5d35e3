"""Reading a folder (the first step): YAML files -> Units, then ``build`` -> a SnapshotSet.

Files are cached by content: a file whose bytes did not change is not parsed or
serialized again, so a one-file edit rebuilds only that file's resources; inside a raw
snapshot file, only the entries that changed (``chunks.py``).
"""

from __future__ import annotations

import codecs
import gc
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from xdsplane.config.errors import ConfigError, ConfigErrors, Location
from xdsplane.config.stableread import FileBusy, read_stable
from xdsplane.config.yamlsrc import YamlError, parse
from xdsplane.pipeline.build import build
from xdsplane.pipeline.chunks import Layout
from xdsplane.pipeline.diskcache import DiskCache, Persisted
from xdsplane.pipeline.groups import has_parts
from xdsplane.pipeline.incremental import GroupState
from xdsplane.pipeline.listing import SETTLED_SECONDS, Listing
from xdsplane.pipeline.listing import stamp as _stamp
from xdsplane.pipeline.refs import Ref, scan
from xdsplane.pipeline.translations import TranslationCache
from xdsplane.pipeline.units import Unit, parse_unit
from xdsplane.snapshot import Resource, SnapshotSet
from xdsplane.types import ResourceType

# Longest first: a UTF-32 little-endian mark starts with the UTF-16 one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


@dataclass
class FolderLoader:
    """Loads one folder again and again, reusing what did not change."""

    root: Path
    # A folder for built raw resources across restarts (serve --cache-dir; diskcache.py).
    cache_dir: Path | None = None
    # path -> (bytes, units, stat stamp, layout of a raw file re-parsed by entry)
    _parsed: dict[str, tuple[bytes, list[Unit], tuple[int, ...], Layout | None]] = field(
        default_factory=dict
    )
    # (type, name, version) -> (its references, whether it may hold key material)
    _refs: dict[tuple[ResourceType, str, str], tuple[tuple[Ref, ...], bool]] = field(
        default_factory=dict
    )
    secret_files: set[str] = field(default_factory=set)
    _translations: TranslationCache = field(default_factory=TranslationCache)
    _last: SnapshotSet | None = None
    _states: dict[str, GroupState] = field(default_factory=dict)
    _listing: Listing | None = None
    _reading: set[str] = field(default_factory=set)
    _disk: Persisted | None = None

    def __post_init__(self) -> None:
        if self.cache_dir is not None:  # CacheDirError: a folder that cannot be trusted
            self._disk = Persisted(DiskCache(self.cache_dir, self.root))

    def _display(self, path: Path) -> str:
        return str(path)

    def _parse_file(self, path: Path, errors: list[ConfigError]) -> list[Unit]:
        shown = self._display(path)
        cached = self._parsed.get(shown)
        if cached is not None:
            try:
                st = os.stat(path)
            except OSError:
                st = None
            # Unchanged since it was read, and quiet for long enough that a write in the
            # same timestamp tick would have shown in ctime: no need to read it again.
            if (
                st is not None
                and _stamp(st) == cached[2]
                and time.time() - max(st.st_mtime, st.st_ctime) > SETTLED_SECONDS
            ):
                return cached[1]
        try:
            data = read_stable(str(path))
        except FileBusy:
            raise
        except IsADirectoryError:
            what = "is a directory, not a policy file" if path.is_dir() else "is not a regular file"
            errors.append(ConfigError(Location(shown), what))
            return []
        except OSError as e:
            errors.append(ConfigError(Location(shown), f"cannot read: {e.strerror or e}"))
            return []
        try:
            stamp = _stamp(os.stat(path))
        except OSError:
            stamp = ()
        if cached is not None and cached[0] == data:
            self._parsed[shown] = (data, cached[1], stamp, cached[3])
            return cached[1]
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
            message = f"not UTF-8 text (byte {e.start})"
            for bom, encoding in _BOMS:
                if data.startswith(bom):
                    message = f"{encoding} text (a byte-order mark says so); save it as UTF-8"
                    break
            errors.append(ConfigError(Location(shown, line, column), message))
            return []
        if cached is not None and cached[3] is not None:
            layout = cached[3].update(text, shown)
            if layout is not None:
                unit = cached[1][0]
                units = [Unit(unit.doc, unit.nodes, unit.policy, layout.resources)]
                self._parsed[shown] = (data, units, stamp, layout)
                return units
        key = None
        if self._disk is not None:
            found = self._disk.read(shown, data, text, self._refs)
            if not isinstance(found, str):
                self._parsed[shown] = (data, [found[0]], stamp, found[1])
                return [found[0]]
            key = found
        sizes: list[dict[int, int]] = []
        try:
            docs = parse(text, shown, sizes=sizes)
        except YamlError as e:
            errors.append(e.error)
            return []
        contents: list[Unit] = []
        file_errors: list[ConfigError] = []
        for doc in docs:
            content, errs = parse_unit(doc)
            file_errors.extend(errs)
            if content is not None:
                contents.append(content)
        if file_errors:
            errors.extend(file_errors)
            return []
        layout = None
        one = contents[0] if len(docs) == 1 and len(contents) == 1 else None
        if one is not None and one.doc.node is None and not one.warnings:
            layout = Layout.of(text, docs[0], sizes[0], one.resources)
            if key is not None and self._disk is not None and not has_parts(one):
                self._disk.parsed(shown, key, one, layout)
        self._parsed[shown] = (data, contents, stamp, layout)
        return contents

    def _files(self) -> list[Path]:
        if self._listing is None or self._listing.root != self.root:
            self._listing = Listing(self.root)
        return self._listing.files()

    def _read_secret(self, path: str) -> bytes:
        self._reading.add(path)
        return read_stable(path, limit=4 * 1024 * 1024)

    def outside_files(self) -> set[str]:
        """Files the last load read from outside the folder (secrets): to watch too."""
        return set(self.secret_files)

    def _scan(self, resource: Resource) -> tuple[tuple[Ref, ...], bool]:
        key = (resource.type, resource.name, resource.version)
        found = self._refs.get(key)
        if found is None:
            found = scan(resource)
            self._refs[key] = found
        return found

    def _refs_of(self, resource: Resource) -> tuple[Ref, ...]:
        return self._scan(resource)[0]

    def load(self) -> SnapshotSet:
        """Load the folder; raises ConfigErrors (all of them) or FileBusy (try again).

        The cyclic garbage collector is paused while loading: a load allocates a great
        many objects that all stay alive, and full collections over them dominated it.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._load()
        finally:
            if enabled:
                gc.enable()

    def units(self) -> list[Unit]:
        """Every document of the folder, parsed; raises ConfigErrors or FileBusy."""
        errors: list[ConfigError] = []
        if not self.root.is_dir():
            raise ConfigErrors([ConfigError(Location(str(self.root)), "is not a folder")])
        files = self._files()
        if not files:
            raise ConfigErrors(
                [ConfigError(Location(str(self.root)), "holds no .yaml or .yml files")]
            )
        contents: list[Unit] = []
        for path in files:
            contents.extend(self._parse_file(path, errors))
        seen = {self._display(p) for p in files}
        for stale in set(self._parsed) - seen:
            del self._parsed[stale]
        if errors:
            raise ConfigErrors(errors)
        return contents

    def _load(self) -> SnapshotSet:
        contents = self.units()
        self._reading = set()
        try:
            snapshots = build(
                contents,
                self._read_secret,
                self._refs_of,
                self._translations,
                self._last,
                self._states,
            )
            self._last = snapshots
        finally:
            self.secret_files = self._reading
        if self._disk is not None:
            self._disk.save(self._scan, set(self._parsed))
        if len(self._refs) > 100_000:
            self._refs.clear()
        return snapshots
