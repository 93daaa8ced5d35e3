"""Raw snapshot files re-parsed per entry: an edit inside a big file costs about one entry.

A raw file (only ``nodes`` and ``resources``, ``resources`` last, a block list) is laid out
once, from the YAML parser's own positions of its entries (``Layout.of``). When the file
changes, the text both versions share at the start and at the end is found (``memcmp``-fast
slice comparisons), and only the entries that overlap the changed part are parsed again,
alone, at their place (their line numbers and nesting as in the file). Entries before it are
reused as they are; entries after it are reused with their line moved, without parsing.

Only what is certain to read the same alone as in the file is done here; anything else
returns None and the caller parses the whole file (``folder.py``), which also gives the
errors: the changed part must parse alone as a block list at the entries' indentation, with
nothing that may be an anchor or an alias (``&``, ``*`` starting a token) in the file, no
line break YAML knows but ``\\n`` (``\\r``, NEL, LS, PS), the header (``nodes``)
unchanged, every entry giving one resource with no error, and the file's value count within
``yamlsrc.MAX_VALUES``.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from typing import Any

import yaml

from xdsplane.config.errors import ConfigError, Location
from xdsplane.config.yamlsrc import MAX_VALUES, Document, YamlError, parse
from xdsplane.pipeline.raw import parse_resources
from xdsplane.policy import tlsrules
from xdsplane.snapshot import Resource

_BREAKS = ("\r", "\x85", "\u2028", "\u2029")
_BLOCK = 4096


def _safe(text: str) -> bool:
    """No line break but "\\n", and nothing that may be an anchor or an alias: "&" or "*"
    starting a token (after a space, a line start, "[", "{" or ","). A "*" inside a quoted
    string ("*.example.com") is fine; one after a space inside a string is taken for an
    alias all the same (the file is then parsed whole: slower, never wrong)."""
    if any(c in text for c in _BREAKS):
        return False
    for mark in ("&", "*"):
        i = text.find(mark)
        while i >= 0:
            before = text[i - 1] if i else "\n"
            after = text[i + 1 : i + 2]
            if before in " \t\n[{," and after not in ("", " ", "\t", "\n", ",", "]", "}"):
                return False
            i = text.find(mark, i + 1)
    return True


@dataclass(frozen=True, slots=True)
class Layout:
    """Where each entry of a raw file's ``resources`` starts, and what it gave."""

    text: str
    indent: int  # column of the entries' "-"
    starts: tuple[int, ...]  # offset of each entry's line
    lines: tuple[int, ...]  # 0-based line of each entry
    columns: tuple[int, ...]  # 1-based column of each entry's value (its source)
    sizes: tuple[int, ...]  # values each entry expands to (yamlsrc.MAX_VALUES)
    resources: tuple[Resource, ...]  # one per entry
    others: int  # values of the file outside the entries
    where: str  # the path as sources show it, up to the line

    @classmethod
    def of(
        cls, text: str, doc: Document, sizes: dict[int, int], resources: tuple[Resource, ...]
    ) -> Layout | None:
        """The layout of a file parsed whole (one document ``doc``), or None if it is not a
        raw file this module can re-parse in parts."""
        root = doc.top
        if not isinstance(root, yaml.MappingNode) or not _safe(text):
            return None
        keys = [k.value if isinstance(k, yaml.ScalarNode) else None for k, _ in root.value]
        if not keys or keys[-1] != "resources" or not set(keys) <= {"nodes", "resources"}:
            return None
        seq = root.value[-1][1]
        if not isinstance(seq, yaml.SequenceNode) or seq.flow_style or not seq.value:
            return None
        if len(resources) != len(seq.value):
            return None
        found = _entries(text, seq, 0)
        if found is None:
            return None
        starts, lines, columns = found
        item_sizes = tuple(sizes[id(n)] for n in seq.value)
        others = sizes[id(root)] - sum(item_sizes)
        where = str(Location(doc.path, 1, 1))[: -len(":1:1")]
        return cls(
            text,
            seq.start_mark.column,
            starts,
            lines,
            columns,
            item_sizes,
            resources,
            others,
            where,
        )

    def to_json(self) -> dict[str, Any]:
        """What ``from_json`` needs besides the text and the resources (``diskcache.py``)."""
        return {
            "indent": self.indent,
            "starts": self.starts,
            "lines": self.lines,
            "columns": self.columns,
            "sizes": self.sizes,
            "others": self.others,
            "where": self.where,
        }

    @classmethod
    def from_json(
        cls, text: str, data: dict[str, Any], resources: tuple[Resource, ...]
    ) -> Layout | None:
        try:
            out = cls(
                text,
                int(data["indent"]),
                tuple(int(x) for x in data["starts"]),
                tuple(int(x) for x in data["lines"]),
                tuple(int(x) for x in data["columns"]),
                tuple(int(x) for x in data["sizes"]),
                resources,
                int(data["others"]),
                str(data["where"]),
            )
        except (KeyError, TypeError, ValueError):
            return None
        n = len(resources)
        if not (len(out.starts) == len(out.lines) == len(out.columns) == len(out.sizes) == n):
            return None
        if any(text[s : s + out.indent + 1] != " " * out.indent + "-" for s in out.starts):
            return None
        return out

    def update(self, text: str, path: str) -> Layout | None:
        """The layout of ``text`` (this file edited), parsing only the entries that changed;
        None when that cannot be done with certainty (the caller parses the whole file)."""
        old = self.text
        p = _common_prefix(old, text)
        s = min(_common_suffix(old, text), min(len(old), len(text)) - p)
        i0 = bisect_right(self.starts, p) - 1
        if i0 < 0:
            return None  # the header changed
        i1 = bisect_left(self.starts, max(p, len(old) - s))
        a = self.starts[i0]
        b = self.starts[i1] if i1 < len(self.starts) else len(old)
        delta = len(text) - len(old)
        region = text[a : b + delta]
        if not _safe(region):
            return None
        if region and not (
            region.startswith(" " * self.indent + "-")
            and region[self.indent + 1 : self.indent + 2] in (" ", "\n")
        ):
            return None
        if b < len(old) and region and not region.endswith("\n"):
            return None
        line = self.lines[i0]
        parsed = _parse_region(region, path, line, self.indent, a, self.where)
        if parsed is None:
            return None
        starts, lines, columns, sizes, resources = parsed
        count = len(self.starts) - (i1 - i0) + len(starts)
        total = self.others + sum(self.sizes) - sum(self.sizes[i0:i1]) + sum(sizes)
        if count == 0 or total > MAX_VALUES:
            return None
        old_lines = (self.lines[i1] if i1 < len(self.starts) else old.count("\n")) - line
        moved = region.count("\n") - old_lines
        tail = range(i1, len(self.starts))
        if moved:
            where = self.where
            shifted = tuple(
                _moved(self.resources[i], f"{where}:{self.lines[i] + moved + 1}:{self.columns[i]}")
                for i in tail
            )
        else:
            shifted = self.resources[i1:]
        after_starts = self.starts[i1:]
        if delta:
            after_starts = tuple(map(delta.__add__, after_starts))
        after_lines = self.lines[i1:]
        if moved:
            after_lines = tuple(map(moved.__add__, after_lines))
        return Layout(
            text,
            self.indent,
            self.starts[:i0] + starts + after_starts,
            self.lines[:i0] + lines + after_lines,
            self.columns[:i0] + columns + self.columns[i1:],
            self.sizes[:i0] + sizes + self.sizes[i1:],
            self.resources[:i0] + resources + shifted,
            self.others,
            self.where,
        )


def _moved(r: Resource, source: str) -> Resource:
    return Resource(r.type, r.name, r.version, source, r.size, r.sotw_entry, r.delta_entry)


def _entries(
    text: str, seq: yaml.SequenceNode, offset: int
) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]] | None:
    """Each entry's line start (in ``text``, less ``offset``), line and value column; None
    unless every entry starts on its own "- " line at the list's column."""
    indent = seq.start_mark.column
    marker = " " * indent + "-"
    starts, lines, columns = [], [], []
    for item in seq.value:
        mark = item.start_mark
        start = mark.index - mark.column
        if text[start : start + indent + 1] != marker or mark.column <= indent:
            return None
        if text[start + indent + 1 : mark.index].strip(" "):
            return None
        starts.append(start - offset)
        lines.append(mark.line)
        columns.append(mark.column + 1)
    return tuple(starts), tuple(lines), tuple(columns)


def _parse_region(
    region: str, path: str, line: int, indent: int, at: int, where: str
) -> (
    tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[int, ...], tuple[Resource, ...]]
    | None
):
    """The entries of ``region`` (text starting at ``at`` on line ``line``), parsed alone.

    The region is parsed as it is (not after ``line`` empty lines: scanning those cost
    more than the entry for an edit deep in a big file); its lines are then moved to their
    place, and so are the resources' sources (``where``: the path as sources show it)."""
    if not region.strip():
        return (), (), (), (), ()
    sizes: list[dict[int, int]] = []
    try:
        docs = parse(region, path, sizes=sizes, depth=1)
    except YamlError:
        return None
    if len(docs) != 1:
        return None
    doc = docs[0]
    seq = doc.top
    if (
        not isinstance(seq, yaml.SequenceNode)
        or seq.flow_style
        or seq.start_mark.column != indent
        or not isinstance(doc.value, list)
    ):
        return None
    found = _entries(region, seq, -at)
    if found is None:
        return None
    errors: list[ConfigError] = []
    parsed = parse_resources(doc, doc.value, (), errors)
    if errors or len(parsed) != len(seq.value):
        return None
    if tlsrules.check_raw(doc, doc.value, ()):
        return None
    starts, relative, columns = found
    lines = tuple(map(line.__add__, relative))
    resources = tuple(
        _moved(r, f"{where}:{n + 1}:{c}") for r, n, c in zip(parsed, lines, columns, strict=True)
    )
    item_sizes = tuple(sizes[0][id(n)] for n in seq.value)
    return starts, lines, columns, item_sizes, resources


def _common_prefix(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` share at the start (C-speed slice compares)."""
    n = min(len(a), len(b))
    lo = 0
    while lo + _BLOCK <= n and a[lo : lo + _BLOCK] == b[lo : lo + _BLOCK]:
        lo += _BLOCK
    hi = min(n, lo + _BLOCK)
    if a[lo:hi] == b[lo:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo], a[lo:hi] != b[lo:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _common_suffix(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` share at the end."""
    la, lb = len(a), len(b)
    n = min(la, lb)
    lo = 0
    while lo + _BLOCK <= n and a[la - lo - _BLOCK : la - lo] == b[lb - lo - _BLOCK : lb - lo]:
        lo += _BLOCK
    hi = min(n, lo + _BLOCK)
    if a[la - hi : la - lo] == b[lb - hi : lb - lo]:
        return hi
    while hi - lo > 1:  # the last lo are equal, the last hi are not
        mid = (lo + hi) // 2
        if a[la - mid : la - lo] == b[lb - mid : lb - lo]:
            lo = mid
        else:
            hi = mid
    return lo
