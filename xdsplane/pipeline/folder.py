"""Reading a folder (the first step): YAML files -> Units, then ``build`` -> a SnapshotSet.

Files are cached by content: a file whose bytes did not change is not parsed or
serialized again, so a one-file edit rebuilds only that file's resources; inside a raw
snapshot file, only the entries that changed (``chunks.py``).
"""

from __future__ import annotations

import codecs
import gc
import hashlib
import os
import threading
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
from xdsplane.policy.check_cache import HostChecks
from xdsplane.policy.parse import HostModels
from xdsplane.snapshot import Resource, SnapshotSet
from xdsplane.types import ResourceType

# Longest first: a UTF-32 little-endian mark starts with the UTF-16 one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "UTF-32"),
    (codecs.BOM_UTF32_BE, "UTF-32"),
    (codecs.BOM_UTF16_LE, "UTF-16"),
    (codecs.BOM_UTF16_BE, "UTF-16"),
)


class _Entry(NamedTuple):
    """A file as last read: a digest of its bytes (not the bytes: a served folder's files
    would stay in memory for the server's life; b"" when it has a layout, which holds its
    text), what it gave, its stat stamp, the layout of a raw file re-parsed by entry, and
    whether a load told what the watch saw change may reuse it without a ``stat``
    (``trusted``: ``plain``, and found settled since it was read)."""

    digest: bytes
    units: list[Unit]
    stamp: tuple[int, ...]
    layout: Layout | None
    trusted: bool
    key: str  # its absolute, normalised path (as the watch names it)
    plain: bool  # no symlink on its path: a change to it is seen under this path


@dataclass
class FolderLoader:
    """Loads one folder again and again, reusing what did not change."""

    root: Path
    # A folder for built raw resources across restarts (serve --cache-dir; diskcache.py).
    cache_dir: Path | None = None
    # path -> the file as last read
    _parsed: dict[str, _Entry] = field(default_factory=dict)
    # (type, name, version) -> (its references, whether it may hold key material)
    _refs: dict[tuple[ResourceType, str, str], tuple[tuple[Ref, ...], bool]] = field(
        default_factory=dict
    )
    secret_files: set[str] = field(default_factory=set)
    _translations: TranslationCache = field(default_factory=TranslationCache)
    _last: SnapshotSet | None = None
    _states: dict[str, GroupState] = field(default_factory=dict)
    _checks: dict[str, HostChecks] = field(default_factory=dict)  # per node group
    # path -> per document, the hosts its last parse validated (parse.HostModels)
    _hosts: dict[str, list[HostModels]] = field(default_factory=dict)
    _listing: Listing | None = None
    _generation: int = -1  # of the listing when files gone were last dropped
    _reading: set[str] = field(default_factory=set)
    _disk: Persisted | None = None
    # What the watch saw change since the last load began (absolute paths), or None: not
    # known, every file is checked with a stat (see ``changed``).
    _pending: set[str] | None = None
    _tracking: bool = False
    _pending_lock: threading.Lock = field(default_factory=threading.Lock)
    _plain_dirs: dict[str, bool] = field(default_factory=dict)
    _dirs: set[str] = field(default_factory=set)  # every folder above a file read

    def __post_init__(self) -> None:
        if self.cache_dir is not None:  # CacheDirError: a folder that cannot be trusted
            self._disk = Persisted(DiskCache(self.cache_dir, self.root))

    def _display(self, path: Path) -> str:
        return str(path)

    def _parse_file(
        self,
        path: Path,
        errors: list[ConfigError],
        changed: set[str] | None = None,
        shown: str | None = None,
    ) -> list[Unit]:
        if shown is None:
            shown = self._display(path)
        cached = self._parsed.get(shown)
        if cached is not None:
            if changed is not None and cached.trusted and cached.key not in changed:
                # The watch saw no change to it since it was last found settled.
                return cached.units
            try:
                st = os.stat(path)
            except OSError:
                st = None
            # Unchanged since it was read, and quiet for long enough that a write in the
            # same timestamp tick would have shown in ctime: no need to read it again.
            if (
                st is not None
                and _stamp(st) == cached.stamp
                and time.time() - max(st.st_mtime, st.st_ctime) > SETTLED_SECONDS
            ):
                if not cached.trusted and cached.plain:
                    self._parsed[shown] = cached._replace(trusted=True)
                return cached.units
            if cached.trusted:
                # Changed: checked by every load until it reads well again (a file that
                # stays broken is not reported as an unseen change over and over).
                self._parsed[shown] = cached = cached._replace(trusted=False)
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
            st = os.stat(path)
            stamp = _stamp(st)
            quiet = time.time() - max(st.st_mtime, st.st_ctime) > SETTLED_SECONDS
        except OSError:
            stamp, quiet = (), False
        where, plain = self._plain(str(path))
        trusted = quiet and plain

        # A raw file re-parsed by entry keeps its text (its layout): the new text is
        # compared with it, so such a file (the 1.5 MB one of BENCHMARKS.md) is not hashed.
        before = cached.layout if cached is not None else None
        digest = b"" if before is not None else _digest(data)

        def entry(units: list[Unit], layout: Layout | None) -> _Entry:
            return _Entry(digest, units, stamp, layout, trusted, where, plain)

        if cached is not None and before is None and cached.digest == digest:
            self._parsed[shown] = entry(cached.units, None)
            return cached.units
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
        if cached is not None and before is not None:
            if text == before.text:
                self._parsed[shown] = entry(cached.units, before)
                return cached.units
            layout = before.update(text, shown)
            if layout is not None:
                unit = cached.units[0]
                units = [Unit(unit.doc, unit.nodes, unit.policy, layout.resources)]
                self._parsed[shown] = entry(units, layout)
                return units
            digest = _digest(data)  # parsed whole below: it may leave no layout
        key = None
        if self._disk is not None:
            found = self._disk.read(shown, data, text, self._refs)
            if not isinstance(found, str):
                self._parsed[shown] = entry([found[0]], found[1])
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
        reuse = self._hosts.get(shown, [])
        reuse += [HostModels() for _ in range(len(docs) - len(reuse))]
        self._hosts[shown] = reuse
        for doc, hosts in zip(docs, reuse, strict=False):
            content, errs = parse_unit(doc, hosts)
            file_errors.extend(errs)
            if content is not None:
                contents.append(content)
        if file_errors:
            errors.extend(file_errors)
            return []
        layout = None
        one = contents[0] if len(docs) == 1 and len(contents) == 1 else None
        if one is not None and one.doc.value is None and not one.warnings:
            layout = Layout.of(text, docs[0], sizes[0], one.resources)
            if key is not None and self._disk is not None and not has_parts(one):
                self._disk.parsed(shown, key, one, layout)
        self._parsed[shown] = entry(contents, layout)
        return contents

    def _plain(self, path: str) -> tuple[str, bool]:
        """``path`` absolute and normalised, and whether no symlink is on it (an edit of a
        symlink's target is not seen by a watch under the symlink's name)."""
        key = os.path.abspath(path)
        folder = os.path.dirname(key)
        plain = self._plain_dirs.get(folder)
        if plain is None:
            plain = self._plain_dirs[folder] = os.path.realpath(folder) == folder
            up = folder
            while up not in self._dirs:
                self._dirs.add(up)
                up, last = os.path.dirname(up), up
                if up == last:
                    break
        return key, plain and not os.path.islink(key)

    def watching(self, on: bool) -> None:
        """The caller's watch of the folder is in place (True) from now on, or is not (False).

        From a load that starts while it is, ``changed`` may tell the next load which files
        changed: the others, found settled when last read or checked, are not even
        ``stat``-ed. Either way what changed before is not known: the next load checks all.
        """
        with self._pending_lock:
            self._tracking = on
            self._pending = None

    def changed(self, paths: Collection[str] | None) -> None:
        """What the watch reported changed (any path, absolute or relative to the current
        folder), or None: not known (a SIGHUP, a watch restarted). The next load checks
        every file with a ``stat`` unless, since the last load began, the watch has been in
        place and told every change. A path that is a folder above a file read (a folder
        moved or replaced) makes it check every file too."""
        with self._pending_lock:
            if paths is None or self._pending is None:
                self._pending = None
                return
            for p in paths:
                key = os.path.abspath(p)
                if key in self._dirs:
                    self._pending = None
                    return
                self._pending.add(key)

    def unseen(self) -> bool:
        """Did a file the loads reuse without a ``stat`` change all the same (a change the
        watch did not report: a dropped event)? The caller's watch asks now and then, when
        idle, and reloads with every file checked if so."""
        for shown, entry in list(self._parsed.items()):
            if not entry.trusted:
                continue  # checked by every load anyway
            try:
                if _stamp(os.stat(shown)) != entry.stamp:
                    return True
            except OSError:
                return True
        return False

    def _take_pending(self) -> set[str] | None:
        with self._pending_lock:
            taken = self._pending
            self._pending = set() if self._tracking else None
        return taken

    def _give_back(self, taken: set[str] | None) -> None:
        """A load that did not finish: what it was told is told again to the next one."""
        with self._pending_lock:
            if taken is None or self._pending is None:
                self._pending = None
            else:
                self._pending |= taken

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

    def units(self, changed: set[str] | None = None) -> list[Unit]:
        """Every document of the folder, parsed; raises ConfigErrors or FileBusy.

        ``changed``: the files the watch saw change (absolute paths); the others that are
        ``trusted`` are reused without a ``stat``. None: every file is checked."""
        errors: list[ConfigError] = []
        if not self.root.is_dir():
            raise ConfigErrors([ConfigError(Location(str(self.root)), "is not a folder")])
        files = self._files()
        if not files:
            raise ConfigErrors(
                [ConfigError(Location(str(self.root)), "holds no .yaml or .yml files")]
            )
        contents: list[Unit] = []
        listing = self._listing
        assert listing is not None
        parsed = self._parsed
        for path, shown in zip(files, listing.shown, strict=True):
            if changed is not None:  # the common case of a reload under serve, inlined
                cached = parsed.get(shown)
                if cached is not None and cached.trusted and cached.key not in changed:
                    contents.extend(cached.units)
                    continue
            contents.extend(self._parse_file(path, errors, changed, shown))
        if listing.generation != self._generation or len(self._parsed) != len(files):
            self._generation = listing.generation
            seen = set(listing.shown)
            for stale in set(self._parsed) - seen:
                del self._parsed[stale]
            for stale in set(self._hosts) - seen:
                del self._hosts[stale]
        if errors:
            raise ConfigErrors(errors)
        return contents

    def _load(self) -> SnapshotSet:
        changed = self._take_pending()
        try:
            return self._build(changed)
        except BaseException:
            self._give_back(changed)
            raise

    def _build(self, changed: set[str] | None) -> SnapshotSet:
        contents = self.units(changed)
        self._reading = set()
        try:
            snapshots = build(
                contents,
                self._read_secret,
                self._refs_of,
                self._translations,
                self._last,
                self._states,
                self._checks,
            )
            self._last = snapshots
        finally:
            self.secret_files = self._reading
        if self._disk is not None:
            self._disk.save(self._scan, set(self._parsed))
        if len(self._refs) > 100_000:
            self._refs.clear()
        return snapshots


def _digest(data: bytes) -> bytes:
    """What tells a file's new bytes from its old ones (SHA-256, first 128 bits).

    SHA-256, not BLAKE2b: OpenSSL's runs on the CPU's SHA extensions (x86 SHA-NI, ARMv8),
    0.86 ms for a 1.5 MB file against 2.2 ms (BENCHMARKS.md, the one-cluster edit)."""
    return hashlib.sha256(data).digest()[:16]
