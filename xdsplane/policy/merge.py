"""The policy files of one node group, merged into one policy with each part's origin."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

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

    def add_named(
        kind: str, key: str, f: Fragment, items: Mapping[str, T], into: dict[str, Part[T]]
    ) -> None:
        """Named parts (secrets, upstreams, ...): unique across the group's files."""
        for name, value in items.items():
            origin = Origin(f.doc, (key, name))
            if name in into:
                dup(kind, name, into[name].origin, origin, origin.key())
            else:
                into[name] = Part(value, origin)

    for f in fragments:
        p = f.policy
        add_named("secret", "secrets", f, p.secrets, out.secrets)
        add_named("upstream", "upstreams", f, p.upstreams, out.upstreams)
        add_named("jwt provider", "jwt_providers", f, p.jwt_providers, out.jwt_providers)
        add_named(
            "introspection provider",
            "introspection_providers",
            f,
            p.introspection_providers,
            out.introspection_providers,
        )
        for i, listener in enumerate(p.listeners):
            origin = Origin(f.doc, ("listeners", i))
            if listener.name in out.listeners:
                dup(
                    "listener",
                    listener.name,
                    out.listeners[listener.name].origin,
                    origin,
                    origin.at("name"),
                )
            else:
                out.listeners[listener.name] = Part(listener, origin)
        for i, server in enumerate(p.grpc_servers):
            origin = Origin(f.doc, ("grpc_servers", i))
            if server.name in out.grpc_servers:
                earlier = out.grpc_servers[server.name].origin
                dup("gRPC server", server.name, earlier, origin, origin.at("name"))
            else:
                out.grpc_servers[server.name] = Part(server, origin)
        for i, service in enumerate(p.grpc_services):
            origin = Origin(f.doc, ("grpc_services", i))
            if service.name in out.grpc_services:
                earlier = out.grpc_services[service.name].origin
                dup("gRPC service", service.name, earlier, origin, origin.at("name"))
            else:
                out.grpc_services[service.name] = Part(service, origin)
        if p.access_log is not None:
            origin = Origin(f.doc, ("access_log",))
            if out.access_log is not None:
                first = out.access_log.origin.at()
                errors.append(
                    ConfigError(
                        origin.key(),
                        f"access_log is already set at {first.path}:{first.line}",
                    )
                )
            else:
                out.access_log = Part(p.access_log, origin)
        if p.guard is not None:
            origin = Origin(f.doc, ("guard",))
            if out.guard is not None:
                first = out.guard.origin.at()
                errors.append(
                    ConfigError(origin.key(), f"guard is already set at {first.path}:{first.line}")
                )
            else:
                out.guard = Part(p.guard, origin)
    return out, errors
