"""Built raw resources kept on disk (``serve --cache-dir``), so that a restart does not parse
the raw snapshot files again: a file's entry holds its resources serialized, their
references and the layout of its entries (``chunks.py``).

- **Keyed by content**: an entry's name is a hash of the file's bytes, its path (sources
  name it), and the versions of xdsplane, xds-protos, protobuf and this format; a file
  that changed, or another version, finds no entry and is parsed as usual.
- **Safe to lose or corrupt**: an entry is checked (magic, a BLAKE2b-256 digest of all it
  holds, its key inside) before use; anything wrong and the file is parsed again, its entry
  rewritten. Writes go through a temporary file and a rename.
- **Never trusted across users**: the folder must be a directory owned by this user and
  writable by no one else (created 0700 when missing); entries are written 0600.
- **No key material**: only raw files are cached, and not one with a Secret resource, a
  field that holds key material (``private_key``, ``password``, ... set at any depth,
  ``refs.scan``) or an ``Any`` that cannot be read: those are parsed every time.
  Policy files are not cached (their secrets are read from files each load anyway).

Entries no current file uses are removed after each load that wrote one.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import stat
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xdsplane.config.yamlsrc import Document
from xdsplane.pipeline.chunks import Layout
from xdsplane.pipeline.refs import Ref
from xdsplane.pipeline.units import Unit
from xdsplane.policy.model import PolicyFile
from xdsplane.snapshot import Resource, from_payload
from xdsplane.types import ResourceType

MAGIC = b"XDSPC001"
_HEAD = struct.Struct(">32sI")  # digest of the rest, length of the JSON part
SUFFIX = ".entry"


class CacheDirError(Exception):
    """The cache folder cannot be trusted or used (said plainly, with the path)."""


@functools.cache
def version_tag() -> str:
    """What an entry was built with: another version of any of these never reads it."""
    import xdsplane

    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "?"

    return (
        f"format 1; xdsplane {xdsplane.__version__}; xds-protos {dist('xds-protos')}; "
        f"protobuf {dist('protobuf')}"
    )


def open_dir(path: Path) -> Path:
    """The cache folder, created 0700 when missing; CacheDirError unless it is a directory
    owned by this user that no one else may write to."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = os.stat(path)
    except OSError as e:
        raise CacheDirError(f"--cache-dir {path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CacheDirError(f"--cache-dir {path}: not a directory")
    if st.st_uid != os.geteuid():
        raise CacheDirError(
            f"--cache-dir {path}: owned by uid {st.st_uid}, not by this user "
            f"(uid {os.geteuid()}): refused"
        )
    if st.st_mode & 0o022:
        raise CacheDirError(
            f"--cache-dir {path}: writable by others (mode {stat.S_IMODE(st.st_mode):o}): "
            "refused; chmod 700 it"
        )
    return path


@dataclass(frozen=True, slots=True)
class Entry:
    """What a file gave, as read back from disk."""

    nodes: list[str] | None
    resources: tuple[Resource, ...]
    refs: tuple[tuple[tuple[ResourceType, str, str], ...], ...]  # per resource
    layout: dict[str, Any] | None


class DiskCache:
    """One policy folder's entries, in a subfolder of the cache folder named by its path."""

    def __init__(self, folder: Path, root: Path) -> None:
        base = open_dir(folder)
        name = hashlib.blake2b(str(root).encode(), digest_size=10).hexdigest()
        self.dir = open_dir(base / name)
        self.hits = 0
        self.misses = 0
        self.writes = 0
        self.corrupt = 0

    def key(self, shown: str, data: bytes) -> str:
        h = hashlib.blake2b(digest_size=20)
        h.update(version_tag().encode() + b"\0" + shown.encode("utf-8", "surrogateescape"))
        h.update(b"\0")
        h.update(data)
        return h.hexdigest()

    def get(self, key: str, shown: str) -> Entry | None:
        path = self.dir / (key + SUFFIX)
        try:
            with open(path, "rb") as f:
                blob = f.read()
        except FileNotFoundError:
            self.misses += 1
            return None
        except OSError:
            self.misses += 1
            return None
        try:
            entry = _decode(blob, key, shown)
        except Exception:  # anything wrong with an entry: parse the file instead
            entry = None
        if entry is None:
            self.corrupt += 1
            path.unlink(missing_ok=True)
            return None
        self.hits += 1
        return entry

    def put(
        self,
        key: str,
        shown: str,
        nodes: list[str] | None,
        resources: tuple[Resource, ...],
        refs: list[tuple[tuple[ResourceType, str, str], ...]],
        layout: dict[str, Any] | None,
    ) -> None:
        types = [t.value for t in ResourceType]
        index = {t: i for i, t in enumerate(ResourceType)}
        whats: dict[str, int] = {}
        rows = []
        for r, rs in zip(resources, refs, strict=True):
            found = [[index[t], n, whats.setdefault(w, len(whats))] for t, n, w in rs]
            rows.append([index[r.type], r.name, r.source, r.size, found])
        meta = {
            "key": key,
            "tag": version_tag(),
            "path": shown,
            "nodes": nodes,
            "layout": layout,
            "types": types,
            "whats": list(whats),
            "resources": rows,
        }
        text = json.dumps(meta, separators=(",", ":")).encode()
        payloads = b"".join(r.payload for r in resources)
        body = struct.pack(">I", len(text)) + text + payloads
        digest = hashlib.blake2b(body, digest_size=32).digest()
        data = MAGIC + digest + body
        fd, tmp = tempfile.mkstemp(prefix=".tmp.", dir=self.dir)
        try:
            os.fchmod(fd, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self.dir / (key + SUFFIX))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.writes += 1

    def prune(self, keep: set[str]) -> None:
        """Remove the entries (and stray temporary files) not in ``keep``."""
        try:
            names = os.listdir(self.dir)
        except OSError:
            return
        for name in names:
            if name.endswith(SUFFIX) and name[: -len(SUFFIX)] in keep:
                continue
            try:
                os.unlink(self.dir / name)
            except OSError:
                continue


def _decode(blob: bytes, key: str, shown: str) -> Entry | None:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 36:
        return None
    digest = blob[len(MAGIC) : len(MAGIC) + 32]
    body = memoryview(blob)[len(MAGIC) + 32 :]
    if hashlib.blake2b(body, digest_size=32).digest() != digest:
        return None
    (size,) = struct.unpack_from(">I", body, 0)
    meta = json.loads(bytes(body[4 : 4 + size]))
    if meta.get("key") != key or meta.get("tag") != version_tag() or meta.get("path") != shown:
        return None
    at = 4 + size
    types = [ResourceType.from_url(u) for u in meta["types"]]
    whats = [str(w) for w in meta["whats"]]
    resources = []
    refs = []
    for ti, name, source, length, rs in meta["resources"]:
        rtype = types[ti]
        if rtype is None:
            return None
        payload = bytes(body[at : at + length])
        if len(payload) != length:
            return None
        at += length
        resources.append(from_payload(rtype, name, payload, source))
        found = []
        for t, n, w in rs:
            ref_type = types[t]
            if ref_type is None:
                return None
            found.append((ref_type, n, whats[w]))
        refs.append(tuple(found))
    if at != len(body):
        return None
    return Entry(meta["nodes"], tuple(resources), tuple(refs), meta["layout"])


class Persisted:
    """A FolderLoader's side of the cache: raw files read back, new ones written after a
    load that succeeded."""

    def __init__(self, cache: DiskCache) -> None:
        self.cache = cache
        self._keys: dict[str, str] = {}  # file -> the key of its entry on disk
        self._unsaved: dict[str, tuple[str, Unit, Layout | None]] = {}
        self._pruned = False

    def read(
        self, shown: str, data: bytes, text: str, scans: dict[tuple[ResourceType, str, str], Any]
    ) -> tuple[Unit, Layout | None] | str:
        """The file's unit (and layout) from its entry, its references put in ``scans``;
        or, when there is none, the key to save the file under once parsed."""
        key = self.cache.key(shown, data)
        entry = self.cache.get(key, shown)
        if entry is None:
            return key
        policy = PolicyFile.model_validate({"nodes": entry.nodes})
        nodes = tuple(sorted(set(entry.nodes))) if entry.nodes is not None else None
        unit = Unit(Document(shown, None, None), nodes, policy, entry.resources)
        for r, refs in zip(entry.resources, entry.refs, strict=True):
            scans[(r.type, r.name, r.version)] = (refs, False)
        layout = None
        if entry.layout is not None:
            layout = Layout.from_json(text, entry.layout, entry.resources)
        self._keys[shown] = key
        return unit, layout

    def parsed(self, shown: str, key: str, unit: Unit, layout: Layout | None) -> None:
        """A raw file was parsed (no policy parts): to be saved after the load."""
        self._unsaved[shown] = (key, unit, layout)

    def save(self, scan: Any, current: set[str]) -> None:
        """Write the files parsed since the last save (none holding key material: ``scan``
        tells), then remove the entries no current file uses."""
        wrote = False
        for shown, (key, unit, layout) in self._unsaved.items():
            if shown not in current:
                continue
            found = [scan(r) for r in unit.resources]
            if any(secret for _, secret in found):
                continue
            nodes = list(unit.policy.nodes) if unit.policy.nodes is not None else None
            refs: list[tuple[Ref, ...]] = [refs for refs, _ in found]
            try:
                self.cache.put(
                    key,
                    shown,
                    nodes,
                    unit.resources,
                    refs,
                    layout.to_json() if layout is not None else None,
                )
            except OSError:
                continue  # a full disk costs the next start time, nothing else
            self._keys[shown] = key
            wrote = True
        self._unsaved.clear()
        if wrote or not self._pruned:
            self._pruned = True
            self.cache.prune({k for s, k in self._keys.items() if s in current})
