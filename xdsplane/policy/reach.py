"""Which route of a host a request reaches: Envoy's first match, simulated on the access
matrix's rows (``weaken.py`` compares the route a path reached before with the one it
reaches now).

The simulation follows the match the translator gives Envoy (``matrix.Match``): prefix,
segment-aware path_prefix, exact path, RE2 regex (Python's ``re``; a pattern Python cannot
compile matches nothing), case sensitivity, methods. A route's header matchers are taken
as satisfied or not by the caller's ``headers`` flag: a client sends any header it likes.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from xdsplane.policy.matrix import Match, RouteAccess

_REGEX_LITERAL = re.compile(r"\^?((?:[^\\.^$*+?()\[\]{}|]|\\[./-])*)")


def matches(m: Match, path: str, method: str, headers: bool) -> bool:
    if m.methods and method not in m.methods:
        return False
    if m.headers and not headers:
        return False
    value, probe = (m.value, path) if m.case_sensitive else (m.value.lower(), path.lower())
    if m.kind == "prefix":
        return probe.startswith(value)
    if m.kind == "path_prefix":
        return probe == value or probe.startswith(value + "/")
    if m.kind == "path":
        return probe == value
    try:
        return re.fullmatch(m.value, path, 0 if m.case_sensitive else re.IGNORECASE) is not None
    except re.error:
        return False


def probes(m: Match) -> set[str]:
    """Paths that reach a route with match ``m``: its value, a path under it, its bare
    form, and each in upper case; a regex gives its literal prefix only."""
    if m.kind == "regex":
        literal = _REGEX_LITERAL.match(m.value)
        base = literal.group(1).replace("\\", "") if literal else ""
        paths = {base, base + "x"} if base.startswith("/") else set()
    elif m.kind == "path":
        paths = {m.value}
    elif m.kind == "path_prefix":
        paths = {m.value, m.value + "/x"}
    else:
        paths = {m.value, m.value + "x"}
        if m.value.endswith("/") and len(m.value) > 1:
            paths.add(m.value.rstrip("/"))
    return paths | {p.upper() for p in paths}


class HostRoutes:
    """A host's routes indexed by match, so that finding the first route a path takes
    costs its candidates, not every route (hosts of thousands of routes)."""

    def __init__(self, rows: Sequence[RouteAccess]) -> None:
        self.rows = rows
        self.keyed: dict[tuple[str, bool, str], list[int]] = {}
        self.regex: list[int] = []
        for i, r in enumerate(rows):
            m = r.match
            if m is None:
                continue
            if m.kind == "regex":
                self.regex.append(i)
                continue
            value = m.value if m.case_sensitive else m.value.lower()
            self.keyed.setdefault((m.kind, m.case_sensitive, value), []).append(i)

    def _candidates(self, path: str) -> set[int]:
        found = set(self.regex)
        for sensitive, probe in ((True, path), (False, path.lower())):
            found.update(self.keyed.get(("path", sensitive, probe), ()))
            for k in range(len(probe) + 1):
                head = probe[:k]
                found.update(self.keyed.get(("prefix", sensitive, head), ()))
                if k == len(probe) or probe[k] == "/":
                    found.update(self.keyed.get(("path_prefix", sensitive, head), ()))
        return found

    def first(self, path: str, method: str, headers: bool) -> RouteAccess | None:
        for i in sorted(self._candidates(path)):
            m = self.rows[i].match
            if m is not None and matches(m, path, method, headers):
                return self.rows[i]
        return None
