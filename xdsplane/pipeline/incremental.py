"""A node group's snapshot rebuilt from its last good one: only what changed is merged,
versioned and checked (the last step of ``build.py``, on a reload).

Unchanged files give the very same Unit and Resource objects (``folder.py``, ``chunks.py``,
``translations.py``), so what changed is found by identity: the resources of units that went
or came, less the objects found on both sides. They are applied to the last good maps; only
the types they touch are copied, re-sorted and versioned (``Snapshot`` shares the rest), and
references are checked against what changed with a count of references per name (a reverse
index): an added resource's references must resolve, a removed name must not be referred to.

The result is the snapshot a build from scratch gives (same maps, same order, versions from
content alone). Whatever would be an error (a duplicate name, a dangling reference) returns
None: the caller builds from scratch, which reports it as it always has.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import compress, count
from operator import is_not

from xdsplane.pipeline.refs import Ref
from xdsplane.pipeline.units import Unit
from xdsplane.snapshot import Resource, Snapshot, lines_hash
from xdsplane.types import ResourceType

Key = tuple[ResourceType, str]
RefsOf = Callable[[Resource], tuple[Ref, ...]]


@dataclass
class GroupState:
    """What one group's last good build was made of, to build the next one from."""

    scope: str
    units: tuple[Unit, ...]
    translated: tuple[Resource, ...]
    snapshot: Snapshot  # its resources are what was merged (one mapping per type)
    # (type, name) -> how many references the served resources make to it; counted on
    # the first reload that needs it (a cold start does not pay for it)
    refcount: dict[Key, int] | None = field(default=None)
    # type -> its names in order and their "name\0version\n" lines (``snapshot.lines_hash``),
    # made on the first reload that changes the type, then kept up to date: a type is
    # re-versioned at the cost of what changed in it, not of re-sorting all of it.
    lines: dict[ResourceType, tuple[list[str], list[str]]] = field(default_factory=dict)


def _changes(
    before: Iterable[Resource], after: Iterable[Resource]
) -> tuple[dict[int, Resource], list[Resource]]:
    removed = {id(r): r for r in before}
    added = []
    for r in after:
        if removed.pop(id(r), None) is None:
            added.append(r)
    return removed, added


def _first_change(a: Sequence[Resource], b: Sequence[Resource]) -> int:
    """How many leading items ``a`` and ``b`` share, the very objects (a C-speed scan)."""
    return next(compress(count(), map(is_not, a, b)), min(len(a), len(b)))


def _edited(
    before: Sequence[Resource], after: Sequence[Resource]
) -> tuple[Sequence[Resource], Sequence[Resource]]:
    """The parts of one file's resources an edit replaced: what both share at the start
    and at the end is left out (an edit inside a file of thousands costs its own size)."""
    head = _first_change(before, after)
    room = min(len(before), len(after)) - head
    tail = min(_first_change(before[::-1], after[::-1]), room)
    return before[head : len(before) - tail], after[head : len(after) - tail]


def _unit_changes(
    before: tuple[Unit, ...], after: list[Unit]
) -> tuple[list[Resource], list[Resource]]:
    """The resources of the units that went and came; a file edited (one unit went and one
    came with its path) gives only the part of its resources the edit replaced."""
    kept = {id(u) for u in after}
    known = {id(u) for u in before}
    went = [u for u in before if id(u) not in kept]
    came = [u for u in after if id(u) not in known]
    gone: list[Resource] = []
    new: list[Resource] = []
    paths = {u.doc.path for u in went}
    if len(paths) == len(went):
        pair = {u.doc.path: u for u in came if u.doc.path in paths}
        if len(pair) == len([u for u in came if u.doc.path in paths]):
            for u in went:
                v = pair.pop(u.doc.path, None)
                if v is None:
                    gone.extend(u.resources)
                    continue
                out, came_in = _edited(u.resources, v.resources)
                gone.extend(out)
                new.extend(came_in)
            came = [u for u in came if u.doc.path not in paths]
            went = []
    for u in went:
        gone.extend(u.resources)
    for u in came:
        new.extend(u.resources)
    return gone, new


def _translated_changes(
    before: Sequence[Resource], after: Sequence[Resource]
) -> tuple[list[Resource], list[Resource]]:
    """The translated resources that went (in ``before``'s order) and came (in ``after``'s):
    the objects of each list not in the other. Both lists come in the translation's order
    and an edit replaces a few in place, so what they share at the start and at the end is
    left out first (C-speed scans), and the rest is compared by identity.

    Exact since ``before`` is what a good build translated, where no object is twice (it
    would be a duplicate name): its middle shares no object with the shared ends. An object
    twice in ``after`` at most comes once more than it would by the whole lists, and a
    resource that came with the name of one still served makes ``rebuild`` give up."""
    out, came_in = _edited(before, after)
    old = set(map(id, out))
    new = set(map(id, came_in))
    return [r for r in out if id(r) not in new], [r for r in came_in if id(r) not in old]


def rebuild(
    state: GroupState, units: list[Unit], translated: list[Resource], refs_of: RefsOf
) -> GroupState | None:
    """The next state from ``state``, or None when a build from scratch must say why not."""
    gone, came = _unit_changes(state.units, units)
    went_t, came_t = _translated_changes(state.translated, translated)
    gone += went_t
    came += came_t
    removed, added = _changes(gone, came)
    if not removed and not added:
        snapshot = Snapshot(state.snapshot.resources, state.snapshot, ())
        return GroupState(
            state.scope,
            tuple(units),
            tuple(translated),
            snapshot,
            state.refcount,
            state.lines,
        )
    # What is served is what was merged: one mapping per type, only changed types copied.
    current = state.snapshot.resources
    empty: dict[str, Resource] = {}
    by_type: dict[ResourceType, tuple[dict[str, Resource], dict[str, Resource]]] = {}
    for r in removed.values():
        if current.get(r.type, empty).get(r.name) is not r:
            return None  # not what was served: build from scratch
        by_type.setdefault(r.type, ({}, {}))[0][r.name] = r
    for r in added:
        out, came_in = by_type.setdefault(r.type, ({}, {}))
        if r.name in came_in or (r.name in current.get(r.type, empty) and r.name not in out):
            return None  # a duplicate: build from scratch for the error
        came_in[r.name] = r
    resources = dict(current)
    inserted: set[ResourceType] = set()
    for rtype, (out, came_in) in by_type.items():
        named = dict(current.get(rtype, empty))
        for name, r in came_in.items():  # replaced in place: the order (by name) stays
            if name not in named:
                inserted.add(rtype)
            named[name] = r
        for name in out:
            if name not in came_in:
                del named[name]
        resources[rtype] = named
    # A resource replaced by one with the same references (a route's prefix edited) leaves
    # the counts as they were: both are left out. Its references resolved before; one to a
    # name gone now is still counted, and found by the check of the removed names below.
    unref: list[Resource] = []
    ref: list[Resource] = []
    for r in removed.values():
        new = by_type[r.type][1].get(r.name)
        if new is None or refs_of(new) != refs_of(r):
            unref.append(r)
            if new is not None:
                ref.append(new)
    ref += [r for r in added if r.name not in by_type[r.type][0]]
    refcount = _count(state, refs_of)
    if unref or ref:
        refcount = dict(refcount)  # (the last good state keeps its own)
    for r in unref:
        for t, name, _ in refs_of(r):
            refcount[(t, name)] -= 1
    for r in ref:
        for t, name, _ in refs_of(r):
            if name not in resources.get(t, empty):
                return None  # dangling: build from scratch for the error
            refcount[(t, name)] = refcount.get((t, name), 0) + 1
    for r in removed.values():
        if r.name not in resources[r.type] and refcount.get((r.type, r.name), 0) > 0:
            return None  # still referred to: build from scratch for the error
    lines = dict(state.lines)
    versions: dict[ResourceType, str] = {}
    for rtype, (out, came_in) in by_type.items():
        named = resources[rtype]  # type: ignore[assignment]
        if rtype in inserted:
            resources[rtype] = named = dict(sorted(named.items()))
        lines[rtype] = _lines(named, out, came_in, lines.get(rtype))
        versions[rtype] = lines_hash(lines[rtype][1])
    snapshot = Snapshot(resources, state.snapshot, by_type.keys(), versions)
    return GroupState(state.scope, tuple(units), tuple(translated), snapshot, refcount, lines)


def _lines(
    named: dict[str, Resource],
    out: dict[str, Resource],
    came_in: dict[str, Resource],
    before: tuple[list[str], list[str]] | None,
) -> tuple[list[str], list[str]]:
    """A type's names in order and their version lines, now that ``out`` went and
    ``came_in`` came (copies: the last good state keeps its own)."""
    if before is None:
        names = sorted(named)
        return names, [f"{n}\0{named[n].version}\n" for n in names]
    names, lines = list(before[0]), list(before[1])
    for name in out:
        if name not in came_in:
            i = bisect_left(names, name)
            del names[i]
            del lines[i]
    for name, r in came_in.items():
        i = bisect_left(names, name)
        line = f"{name}\0{r.version}\n"
        if i < len(names) and names[i] == name:
            lines[i] = line
        else:
            names.insert(i, name)
            lines.insert(i, line)
    return names, lines


def _count(state: GroupState, refs_of: RefsOf) -> dict[Key, int]:
    if state.refcount is None:
        counts: dict[Key, int] = {}
        for named in state.snapshot.resources.values():
            for r in named.values():
                for t, name, _ in refs_of(r):
                    counts[(t, name)] = counts.get((t, name), 0) + 1
        state.refcount = counts
    return state.refcount
