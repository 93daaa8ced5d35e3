"""The policy files of one node group, merged into one policy with each part's origin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

from xdsplane.config.errors import ConfigError, Location
from xdsplane.config.yamlsrc import Document
from xdsplane.policy.model import (
    AccessLog,
    GrpcServer,
    GrpcService,
    Guard,
    IntrospectionProvider,
    JwtProvider,
    Listener,
    PolicyFile,
    Secret,
    Upstream,
)

T = TypeVar("T")
UseKey = tuple[int, tuple[str | int, ...]]  # a definition's document (its id) and keys


@dataclass(frozen=True, slots=True, eq=False)
class Origin:
    """Where a part of the policy was written: a document and the keys leading to it."""

    doc: Document
    keys: tuple[str | int, ...]

    def at(self, *more: str | int) -> Location:
        return self.doc.locate((*self.keys, *more))

    def key(self, *more: str | int) -> Location:
        return self.doc.locate_key((*self.keys, *more))

    @property
    def folder(self) -> Path:
        return Path(self.doc.path).parent

    @property
    def source(self) -> str:
        return str(self.at())


@dataclass(frozen=True, slots=True)
class Part(Generic[T]):
    value: T
    origin: Origin


@dataclass
class Fragment:
    """One policy document."""

    doc: Document
    policy: PolicyFile
    _parts: FragmentParts | None = field(default=None, init=False, repr=False, compare=False)

    def parts(self) -> FragmentParts:
        """Its parts with their origins, made on the first merge that needs them and kept:
        a document that did not change gives the very same Part objects to every merge (a
        merge costs the tables it fills, in C, and what reads the parts can tell an
        unchanged one by its identity)."""
        if self._parts is None:
            self._parts = FragmentParts.of(self.doc, self.policy)
        return self._parts


# (kind, key) of the named parts (mappings in a file) and of the listed ones (lists of
# parts with a ``name``), in the order a merge adds them (and reports duplicates).
_NAMED = (
    ("secret", "secrets"),
    ("upstream", "upstreams"),
    ("jwt provider", "jwt_providers"),
    ("introspection provider", "introspection_providers"),
)
_LISTED = (
    ("listener", "listeners"),
    ("gRPC server", "grpc_servers"),
    ("gRPC service", "grpc_services"),
)


@dataclass(frozen=True, slots=True)
class FragmentParts:
    """One document's parts: for each named table its parts by name; for each listed one
    its (name, part) pairs in order, and the same by name when no name is given twice."""

    named: dict[str, dict[str, Part[Any]]]
    listed: dict[str, tuple[list[tuple[str, Part[Any]]], dict[str, Part[Any]] | None]]
    access_log: Part[AccessLog] | None
    guard: Part[Guard] | None
    # named table -> the use keys (``check.use_key``) of its parts: what must be used
    defined: dict[str, frozenset[UseKey]]

    @staticmethod
    def of(doc: Document, p: PolicyFile) -> FragmentParts:
        named: dict[str, dict[str, Part[Any]]] = {}
        for _, key in _NAMED:
            items: Mapping[str, Any] = getattr(p, key)
            named[key] = {name: Part(v, Origin(doc, (key, name))) for name, v in items.items()}
        listed: dict[str, tuple[list[tuple[str, Part[Any]]], dict[str, Part[Any]] | None]] = {}
        for _, key in _LISTED:
            values: list[Any] = getattr(p, key)
            pairs = [(v.name, Part(v, Origin(doc, (key, i)))) for i, v in enumerate(values)]
            by_name = dict(pairs)
            listed[key] = (pairs, by_name if len(by_name) == len(pairs) else None)
        log = p.access_log
        log_part = Part(log, Origin(doc, ("access_log",))) if log is not None else None
        guard = Part(p.guard, Origin(doc, ("guard",))) if p.guard is not None else None
        defined: dict[str, frozenset[UseKey]] = {}
        for _, key in _NAMED:
            # (the Origin's own keys tuple: compared with a use key's by identity)
            defined[key] = frozenset((id(doc), p.origin.keys) for p in named[key].values())
        return FragmentParts(named, listed, log_part, guard, defined)


@dataclass
class GroupPolicy:
    secrets: dict[str, Part[Secret]] = field(default_factory=dict)
    listeners: dict[str, Part[Listener]] = field(default_factory=dict)
    upstreams: dict[str, Part[Upstream]] = field(default_factory=dict)
    access_log: Part[AccessLog] | None = None
    jwt_providers: dict[str, Part[JwtProvider]] = field(default_factory=dict)
    introspection_providers: dict[str, Part[IntrospectionProvider]] = field(default_factory=dict)
    guard: Part[Guard] | None = None
    grpc_servers: dict[str, Part[GrpcServer]] = field(default_factory=dict)
    grpc_services: dict[str, Part[GrpcService]] = field(default_factory=dict)


def merge(fragments: list[Fragment]) -> tuple[GroupPolicy, list[ConfigError]]:
    out = GroupPolicy()
    errors: list[ConfigError] = []

    def dup(kind: str, name: str, first: Origin, again: Origin, where: Location) -> None:
        first_at = first.at()
        errors.append(
            ConfigError(
                where,
                f"duplicate {kind} name {name!r}, first defined at {first_at.path}:{first_at.line}",
            )
        )

    for f in fragments:
        fp = f.parts()
        for kind, key in _NAMED:
            items = fp.named[key]
            if not items:
                continue
            into: dict[str, Part[Any]] = getattr(out, key)
            if into and not into.keys().isdisjoint(items):
                for name, part in items.items():
                    if name in into:
                        dup(kind, name, into[name].origin, part.origin, part.origin.key())
                    else:
                        into[name] = part
            else:
                into.update(items)  # (the common case: no name taken, added in C)
        for kind, key in _LISTED:
            pairs, by_name = fp.listed[key]
            if not pairs:
                continue
            into = getattr(out, key)
            if by_name is not None and not (into and not into.keys().isdisjoint(by_name)):
                into.update(by_name)
                continue
            for name, part in pairs:
                if name in into:
                    dup(kind, name, into[name].origin, part.origin, part.origin.at("name"))
                else:
                    into[name] = part
        if fp.access_log is not None:
            origin = fp.access_log.origin
            if out.access_log is not None:
                first = out.access_log.origin.at()
                errors.append(
                    ConfigError(
                        origin.key(),
                        f"access_log is already set at {first.path}:{first.line}",
                    )
                )
            else:
                out.access_log = fp.access_log
        if fp.guard is not None:
            origin = fp.guard.origin
            if out.guard is not None:
                first = out.guard.origin.at()
                errors.append(
                    ConfigError(origin.key(), f"guard is already set at {first.path}:{first.line}")
                )
            else:
                out.guard = fp.guard
    return out, errors
