"""Which policy files a folder holds: listed once, then again only where a folder changed.

Adding, removing or renaming an entry changes its folder's mtime; a folder whose stamp is
unchanged, and quiet for longer than ``SETTLED_SECONDS`` (so that a change made in the same
timestamp tick would show in its ctime), is not listed again: a reload of a folder of
hundreds of files costs one ``stat`` per folder, not a walk.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

SUFFIXES = (".yaml", ".yml")
SETTLED_SECONDS = 2.0
_GENERATIONS = itertools.count(1)  # shared: no two listings' lists have the same number


def stamp(st: os.stat_result) -> tuple[int, ...]:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _order(path: Path) -> str:
    # Path order (part by part) as a string: "/" sorts before every other character.
    return str(path).replace("/", "\0")


def _scan(folder: str) -> tuple[list[str], list[str]]:
    """(folders, other entries) of ``folder``, symlinks followed, as ``os.walk`` splits them."""
    dirs: list[str] = []
    files: list[str] = []
    try:
        with os.scandir(folder) as entries:
            for e in entries:
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                (dirs if is_dir else files).append(e.name)
    except OSError:
        pass
    return dirs, files


class Listing:
    """``list_files`` for one folder again and again, each unchanged folder's part reused."""

    def __init__(self, root: Path) -> None:
        self.root = root
        # folder path -> (stamp, subfolders to enter, policy files in it)
        self._folders: dict[str, tuple[tuple[int, ...], list[str], list[Path]]] = {}
        self._files: list[Path] = []
        # The files as strings (in the same order), and a number that changes with the
        # list (unique across listings): the loader keeps per-file work keyed by them.
        self.shown: list[str] = []
        self.generation = 0

    def files(self, reuse: bool = True) -> list[Path]:
        """The YAML files under the root, sorted; hidden files and folders are skipped.

        Hidden entries cover editors' swap files and Kubernetes' ``..data`` folders (whose
        files are reached through the visible symlinks beside them). A folder named like a
        policy file is listed, not entered: a policy file replaced by a directory is
        reported by its name rather than silently missing.
        """
        now = time.time()
        before = self._folders if reuse else {}
        folders: dict[str, tuple[tuple[int, ...], list[str], list[Path]]] = {}
        found: list[Path] = []
        seen: set[tuple[int, int]] = set()
        changed = False
        stack = [str(self.root)]
        while stack:  # depth first, subfolders in name order: the order os.walk takes
            folder = stack.pop()
            try:
                st = os.stat(folder)
            except OSError:
                continue
            # A folder reached again through a symlink (a loop such as ``sub -> .``) is
            # listed once: otherwise the walk runs until paths get too long.
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            mark = stamp(st)
            known = before.get(folder)
            if (
                known is not None
                and known[0] == mark
                and now - max(st.st_mtime, st.st_ctime) > SETTLED_SECONDS
            ):
                entry = known
            else:
                dirnames, filenames = _scan(folder)
                visible = [d for d in dirnames if not d.startswith(".")]
                here = Path(folder)
                names = [d for d in visible if d.endswith(SUFFIXES)]
                names += [n for n in filenames if not n.startswith(".") and n.endswith(SUFFIXES)]
                old = {p.name: p for p in known[2]} if known is not None else {}
                files = [old.get(n) or here / n for n in names]
                subs = [os.path.join(folder, d) for d in sorted(visible)]
                entry = (mark, [d for d in subs if not d.endswith(SUFFIXES)], files)
                # Listed again (an edit saved by rename, a file added): a new order only if
                # what it holds changed.
                changed = changed or known is None or entry[1:] != known[1:]
            folders[folder] = entry
            found.extend(entry[2])
            stack.extend(reversed(entry[1]))
        if changed or folders.keys() != self._folders.keys():
            self._files = sorted(found, key=_order)
            self.shown = [str(p) for p in self._files]
            self.generation = next(_GENERATIONS)
        self._folders = folders
        return list(self._files)


def list_files(root: Path) -> list[Path]:
    """The YAML files under ``root``, sorted (``Listing.files``)."""
    return Listing(root).files(reuse=False)
