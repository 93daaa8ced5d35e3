"""Narrowing a rejection down to one resource of the policy.

``_judge`` is a generator: it yields the next ``Trial`` and is sent its ``Outcome``, so the
same search runs with blocking or asyncio Envoy runs (``run.py``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass

from xdsplane.config.errors import Location
from xdsplane.envoycheck.bootstrap import Trial, envoy_names
from xdsplane.pipeline.refs import references
from xdsplane.snapshot import Resource, Snapshot
from xdsplane.types import ResourceType

MAX_RUNS = 40  # Envoy runs spent narrowing down one rejected group
KIND = {
    ResourceType.SECRET: "secret",
    ResourceType.CLUSTER: "cluster",
    ResourceType.ENDPOINT: "endpoints",
    ResourceType.LISTENER: "listener",
    ResourceType.ROUTE: "route configuration",
    ResourceType.EXTENSION: "filter configuration",
}


@dataclass(frozen=True, slots=True)
class Outcome:
    accepted: bool
    message: str = ""
    broken: bool = False  # no verdict: Envoy could not be run, crashed or timed out


@dataclass(frozen=True, slots=True)
class Rejection:
    """Envoy refuses a group: ``resource`` is what it is about, when that could be told."""

    group: str
    message: str
    resource: Resource | None = None
    broken: bool = False

    def describe(self, label: str, scope: str = "") -> str:
        suffix = f" (for nodes {scope})" if scope else ""
        if self.broken:
            return f"{label}: envoy could not check nodes {scope or self.group}: {self.message}"
        if self.resource is None:
            return f"{label}: envoy rejects the configuration{suffix}: {self.message}"
        r = self.resource
        where = Location.parse(r.source) if r.source else Location(label)
        return f"{where}: envoy rejects {KIND[r.type]} {r.name!r}{suffix}: {self.message}"


Judgement = Generator[Trial, Outcome, tuple[Resource | None, str]]


def _bisect(
    names: Sequence[str], make: Callable[[tuple[str, ...]], Trial], message: str
) -> Generator[Trial, Outcome, tuple[str, str] | None]:
    """One name whose trial alone fails (``make(names)`` is known to fail), or None."""
    items = list(names)
    while len(items) > 1:
        half = len(items) // 2
        for part in (items[:half], items[half:]):
            out = yield make(tuple(part))
            if not out.accepted:
                items, message = part, out.message
                break
        else:
            return None  # each half passes alone: a conflict between them
    return (items[0], message) if items else None


def _refs(resource: Resource, rtype: ResourceType, snapshot: Snapshot) -> list[str]:
    have = snapshot.of(rtype)
    return [n for t, n, _ in references(resource) if t is rtype and n in have]


def _narrow_secrets(
    suspects: list[str], make: Callable[[frozenset[str]], Trial], message: str
) -> Generator[Trial, Outcome, tuple[str, str] | None]:
    """With ``suspects`` (secrets, or filter configurations) all stood in for, ``make``
    passes: which one is it?"""
    if len(suspects) == 1:
        return suspects[0], message
    for s in suspects:
        out = yield make(frozenset(suspects) - {s})
        if not out.accepted:
            return s, out.message
    return None


def _blame_refs(
    snapshot: Snapshot,
    resource: Resource,
    rtype: ResourceType,
    make: Callable[[frozenset[str]], Trial],
    message: str,
) -> Generator[Trial, Outcome, tuple[Resource, str] | None]:
    """The one ``rtype`` resource that ``resource`` references and Envoy refuses: ``make``
    with all of them stood in for must pass, then ``_narrow_secrets`` names it. None when
    there are none, standing in does not help, or no single one is to blame."""
    suspects = _refs(resource, rtype, snapshot)
    if not suspects:
        return None
    out = yield make(frozenset(suspects))
    if not out.accepted:
        return None
    found = yield from _narrow_secrets(suspects, make, message)
    if found is None:
        return None
    return snapshot.of(rtype)[found[0]], found[1]


def _judge(snapshot: Snapshot) -> Judgement:
    """Yields trials, is sent their outcomes; returns the resource to blame and the message."""
    listeners = envoy_names(snapshot, ResourceType.LISTENER)
    clusters = envoy_names(snapshot, ResourceType.CLUSTER)
    full = yield Trial(listeners, clusters)
    if full.accepted:
        return None, ""
    message = full.message
    alone = full
    if listeners:
        alone = yield Trial((), clusters)
    if not alone.accepted:
        found = yield from _bisect(clusters, lambda sub: Trial((), sub), alone.message)
        if found is None:
            return _hint(snapshot, alone.message), alone.message
        return (yield from _refine_cluster(snapshot, *found))
    found = yield from _bisect(listeners, lambda sub: Trial(sub, clusters), message)
    if found is None:
        return _hint(snapshot, message), message
    return (yield from _refine_listener(snapshot, clusters, *found))


def _refine_cluster(snapshot: Snapshot, name: str, message: str) -> Judgement:
    cluster = snapshot.of(ResourceType.CLUSTER)[name]
    eds = _refs(cluster, ResourceType.ENDPOINT, snapshot)
    if eds:
        out = yield Trial((), (name,), stub_endpoints=frozenset(eds))
        if out.accepted:
            return snapshot.of(ResourceType.ENDPOINT)[eds[0]], message
    found = yield from _blame_refs(
        snapshot,
        cluster,
        ResourceType.SECRET,
        lambda d: Trial((), (name,), dummy_secrets=d),
        message,
    )
    if found is not None:
        return found
    return cluster, message


def _refine_listener(
    snapshot: Snapshot, clusters: tuple[str, ...], name: str, message: str
) -> Judgement:
    listener = snapshot.of(ResourceType.LISTENER)[name]
    routes = _refs(listener, ResourceType.ROUTE, snapshot)
    stubbed = frozenset(routes)
    if routes:
        out = yield Trial((name,), clusters, stub_routes=stubbed)
        if out.accepted:
            if len(routes) == 1:
                return snapshot.of(ResourceType.ROUTE)[routes[0]], message
            for r in routes:
                out = yield Trial((name,), clusters, stub_routes=stubbed - {r})
                if not out.accepted:
                    return snapshot.of(ResourceType.ROUTE)[r], out.message
            return listener, message
    stand_ins: list[tuple[ResourceType, Callable[[frozenset[str]], Trial]]] = [
        (
            ResourceType.EXTENSION,
            lambda d: Trial((name,), clusters, stub_routes=stubbed, stub_extensions=d),
        ),
        (
            ResourceType.SECRET,
            lambda d: Trial((name,), clusters, stub_routes=stubbed, dummy_secrets=d),
        ),
    ]
    for rtype, make in stand_ins:
        found = yield from _blame_refs(snapshot, listener, rtype, make, message)
        if found is not None:
            return found
    return listener, message


def _hint(snapshot: Snapshot, message: str) -> Resource | None:
    """The listener or cluster a message names in quotes (by name, or a listener's address)."""
    by_token: dict[str, Resource] = {}
    for rtype in (ResourceType.CLUSTER, ResourceType.LISTENER):
        for name, r in snapshot.of(rtype).items():
            by_token.setdefault(name, r)
    for r in snapshot.of(ResourceType.LISTENER).values():
        sock = r.message.address.socket_address
        by_token.setdefault(f"{sock.address}:{sock.port_value}", r)
    for token in re.findall(r"'([^']+)'", message):
        if token in by_token:
            return by_token[token]
    return None


class Narrowing:
    """Drives ``_judge`` for one group: ask ``trial``, ``feed`` it the outcome, repeat."""

    def __init__(self, group: str, snapshot: Snapshot) -> None:
        self.group = group
        self.snapshot = snapshot
        self.judge = _judge(snapshot)
        self.trial: Trial | None = next(self.judge)
        self.rejection: Rejection | None = None
        self.first = ""  # Envoy's message on the whole group
        self.runs = 0

    def feed(self, outcome: Outcome) -> None:
        self.runs += 1
        self.first = self.first or outcome.message
        if outcome.broken:
            self.judge.close()
            self.trial, self.rejection = None, Rejection(self.group, outcome.message, broken=True)
            return
        if self.runs == MAX_RUNS:  # a bound on the time spent; the whole group is blamed
            self.judge.close()
            self.trial, self.rejection = None, Rejection(self.group, self.first)
            return
        try:
            self.trial = self.judge.send(outcome)
        except StopIteration as stop:
            resource, message = stop.value
            self.trial = None
            self.rejection = Rejection(self.group, message, resource) if message else None


def for_each_group(rejection: Rejection | None, groups: list[str]) -> list[Rejection]:
    """The rejection of one snapshot, for every group that has that very snapshot."""
    if rejection is None:
        return []
    return [dataclasses.replace(rejection, group=g) for g in groups]
