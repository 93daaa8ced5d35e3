"""Host check results kept from one check of a group to the next, with a reverse index.

After an edit only the hosts that changed, and those that refer to a table entry that
changed, are checked again (``check_hosts.py`` records what each check read).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xdsplane.policy.check_hosts import (
    HOST_PLACE,
    TABLES,
    HostCheck,
    HostKey,
    HostResult,
    Rel,
    Segment,
)
from xdsplane.policy.check_tables import TableMemo, same_objects
from xdsplane.policy.jsonmemo import JsonMemo
from xdsplane.policy.merge import GroupPolicy, Part
from xdsplane.policy.model import Host, Listener


class HostChecks:
    """Host results kept from one check of a group to the next, keyed by content.

    Before a check, ``invalidate`` compares the group's tables with those of the last
    check: a name added, removed or given a different value drops, through the reverse index,
    every result that looked it up; a name added or removed drops the results whose errors
    quote the list of names; a guard changed (or moved) drops the results that read it.
    A result not used by a check is dropped with it (``sweep``).
    """

    def __init__(self) -> None:
        self.where: str | None = None
        self._results: dict[HostKey, HostResult] = {}
        self._used: dict[HostKey, HostResult] = {}
        # table -> name -> the keys of the results that looked it up
        self._index: dict[str, dict[str, set[HostKey]]] = {t: {} for t in TABLES}
        self._lists: dict[str, set[HostKey]] = {t: set() for t in TABLES}
        self._guarded: set[HostKey] = set()
        # what the last check saw: table -> name -> the value (by identity)
        self._tables: dict[str, dict[str, object]] = {t: {} for t in TABLES}
        self._guard: tuple[object, object] = (None, None)  # (value, its document)
        # a host's JSON by the identity of the (frozen) model, kept alive with it
        self._dumps: JsonMemo[Host] = JsonMemo()
        # a listener's hosts checked, by its identity: (listener, its name, host keys, them)
        self._listeners: dict[int, tuple[Listener, str, list[HostKey], Checked]] = {}
        self._listeners_used: dict[int, tuple[Listener, str, list[HostKey], Checked]] = {}
        # table -> its parts (the very objects) at the last check
        self._parts: dict[str, tuple[object, ...]] = {t: () for t in TABLES}
        # what the group's checks read of whole tables (check_tables.py)
        self.tables = TableMemo()
        self.hits = 0
        self.misses = 0

    def invalidate(self, policy: GroupPolicy, where: str) -> None:
        self._used = {}  # (a check that did not finish may have left some)
        self._listeners_used = {}
        if where != self.where:
            for key in list(self._results):
                self._forget(key)
            self.where = where
            self._parts = {t: () for t in TABLES}
        drop: set[HostKey] = set()
        for table in TABLES:
            parts: dict[str, Part[object]] = getattr(policy, table)
            values = tuple(parts.values())
            if same_objects(values, self._parts[table]):
                continue  # the very parts of the last check (merge.py): nothing changed
            self._parts[table] = values
            before = self._tables[table]
            now = {name: part.value for name, part in parts.items()}
            self._tables[table] = now
            index = self._index[table]
            names: Iterable[str] = now
            if before.keys() != now.keys():
                drop |= self._lists[table]
                names = before.keys() | now.keys()
            for name in names:
                if name in index:
                    old, new = before.get(name), now.get(name)
                    # A file parsed again gives new objects: equal ones changed nothing.
                    if old is not new and (old is None or new is None or old != new):
                        drop |= index[name]
        guard = policy.guard
        seen = (guard.value, guard.origin.doc) if guard is not None else (None, None)
        last = self._guard
        if seen[0] is not last[0] or seen[1] is not last[1]:
            drop |= self._guarded
        self._guard = seen
        for key in drop:
            self._forget(key)

    def _forget(self, key: HostKey) -> None:
        result = self._results.pop(key, None)
        if result is None:
            return
        result.live = False
        for table in TABLES:
            index = self._index[table]
            for name in result.refs[table]:
                keys = index.get(name)
                if keys is not None:
                    keys.discard(key)
                    if not keys:
                        del index[name]
            self._lists[table].discard(key)
        self._guarded.discard(key)

    def _json(self, host: Host) -> str:
        return self._dumps.json(host)

    def listener(self, policy: GroupPolicy, lname: str, listener: Listener) -> Checked:
        """Each host of ``listener`` checked (``host_segments``); for the very listener of
        the last check, whose hosts' results are all still kept, as it was."""
        ident = id(listener)
        hit = self._listeners_used.get(ident) or self._listeners.get(ident)
        if (
            hit is not None
            and hit[0] is listener
            and hit[1] == lname
            and all(result.live for result in hit[3].results)
        ):
            self._used.update(zip(hit[2], hit[3].results, strict=True))
            self.hits += len(hit[2])
        else:
            assert self.where is not None
            keys: list[HostKey] = []
            segments = host_segments(policy, self.where, lname, listener, self, keys)
            hit = (listener, lname, keys, Checked.of(segments))
        self._listeners_used[ident] = hit
        return hit[3]

    def host(
        self, policy: GroupPolicy, lname: str, listener: Listener, h: Host
    ) -> tuple[HostKey, HostResult]:
        key = (self._json(h), lname, listener.tls is not None)
        result = self._used.get(key) or self._results.get(key)
        if result is not None:
            self.hits += 1
            self._used[key] = result
            return key, result
        self.misses += 1
        assert self.where is not None
        result = HostCheck(policy, self.where).host(lname, listener, h)
        self._results[key] = self._used[key] = result
        for table in TABLES:
            index = self._index[table]
            for name in result.refs[table]:
                index.setdefault(name, set()).add(key)
            if table in result.lists:
                self._lists[table].add(key)
        if result.guard:
            self._guarded.add(key)
        return key, result

    def sweep(self) -> None:
        """Keep only the results the latest check used."""
        for key in self._results.keys() - self._used.keys():
            self._forget(key)
        self._used = {}
        self._dumps.next_load()
        self._listeners, self._listeners_used = self._listeners_used, {}


@dataclass(frozen=True, slots=True)
class Checked:
    """A listener's hosts checked: each host's segment, and what the group's check takes
    from them all, found once (a listener kept from the last check gives it again)."""

    segments: list[Segment]
    results: list[HostResult]
    quiet: bool  # no host has anything to report (no local error, no item)
    found: dict[str, set[str]]  # table -> the names the hosts found in it

    @staticmethod
    def of(segments: list[Segment]) -> Checked:
        results = [result for _, result in segments]
        quiet = not any(local or result.items for local, result in segments)
        found = {t: set().union(*(r.found[t] for r in results)) for t in TABLES}
        return Checked(segments, results, quiet, found)


def host_segments(
    policy: GroupPolicy,
    where: str,
    lname: str,
    listener: Listener,
    checks: HostChecks | None,
    keys: list[HostKey] | None = None,
) -> list[Segment]:
    """Each host of ``listener``: what the listener's checks find at it, and its result
    (from ``checks`` when given, the key of each appended to ``keys``)."""
    out: list[Segment] = []
    seen_hosts: dict[str, int] = {}
    seen_domains: dict[str, str] = {}
    for hi, h in enumerate(listener.hosts):
        local: list[tuple[Rel, str]] = []
        if h.name in seen_hosts:
            local.append(
                (HOST_PLACE.at("name"), f"duplicate host name {h.name!r} in listener {lname!r}")
            )
        seen_hosts[h.name] = hi
        for di, d in enumerate(h.domains):
            key = d.lower()
            if key in seen_domains:
                local.append(
                    (
                        HOST_PLACE.at("domains", di),
                        f"domain {d!r} is already served by host {seen_domains[key]!r} "
                        f"of listener {lname!r}",
                    )
                )
            seen_domains.setdefault(key, h.name)
        if checks is not None and keys is not None:
            hkey, result = checks.host(policy, lname, listener, h)
            keys.append(hkey)
        else:
            result = HostCheck(policy, where).host(lname, listener, h)
        out.append((local, result))
    return out
