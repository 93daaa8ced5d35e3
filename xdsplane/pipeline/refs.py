"""Consistency checks on a snapshot before it may be served.

Every RDS, EDS, SDS and ECDS name a listener, cluster or route references over ADS must exist,
and every cluster a route sends traffic to must exist. References are found by walking
each message (``Any`` values unpacked) once per resource version.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from google.protobuf.message import Message

from xdsplane.config.errors import ConfigError, Location
from xdsplane.config.protos import find_message
from xdsplane.redact import SECRET_PROTO_FIELDS
from xdsplane.snapshot import Resource, Snapshot
from xdsplane.types import ResourceType

Ref = tuple[ResourceType, str, str]  # (type, name, what refers to it)

_SDS = "envoy.extensions.transport_sockets.tls.v3.SdsSecretConfig"
_RDS = "envoy.extensions.filters.network.http_connection_manager.v3.Rds"
_CLUSTER = "envoy.config.cluster.v3.Cluster"
_ROUTE_ACTION = "envoy.config.route.v3.RouteAction"
_ANY = "google.protobuf.Any"


def _is_ads(config_source: Message) -> bool:
    return bool(config_source.WhichOneof("config_source_specifier") == "ads")


def _discovered(msg: Message) -> bool:
    """A filter (HTTP, network or listener) whose configuration comes over ECDS from ADS."""
    if "config_discovery" not in msg.DESCRIPTOR.fields_by_name:
        return False
    m: Any = msg
    return bool(m.HasField("config_discovery") and _is_ads(m.config_discovery.config_source))


_DIRECT = frozenset({_ANY, _SDS, _RDS, _CLUSTER, _ROUTE_ACTION})
_MATTERS: dict[str, bool] = {}  # message type -> may it hold a reference or a secret field


def _matters(desc: Any) -> bool:
    """Whether a message of type ``desc`` may hold, at any depth, something ``_walk`` looks
    for: a reference, a secret field, an ``Any``. The others are not walked into (most of a
    ClusterLoadAssignment, matchers, addresses...); the answer is the same either way."""
    found = _MATTERS.get(desc.full_name)
    if found is not None:
        return found
    seen = {desc.full_name}
    todo = [desc]
    result = False
    while todo and not result:
        d = todo.pop()
        if d.full_name in _DIRECT or "config_discovery" in d.fields_by_name:
            result = True
            break
        for f in d.fields:
            if f.name in SECRET_PROTO_FIELDS:
                result = True
                break
            sub = f.message_type
            if sub is not None and sub.full_name not in seen:
                known = _MATTERS.get(sub.full_name)
                if known:
                    result = True
                    break
                seen.add(sub.full_name)
                if known is None:
                    todo.append(sub)
    _MATTERS[desc.full_name] = result
    return result


# message type -> (does it need the checks by name: an Any, a reference-holding type, an
# ECDS filter), its secret-named fields, and its fields worth walking into (name -> 0 a map,
# 1 a list, 2 one message)
_Plan = tuple[bool, frozenset[str], dict[str, int]]
_PLANS: dict[str, _Plan] = {}


def _plan(desc: Any) -> _Plan:
    found = _PLANS.get(desc.full_name)
    if found is None:
        walk: dict[str, int] = {}
        for f in desc.fields:
            if f.message_type is not None and _matters(f.message_type):
                walk[f.name] = (
                    0 if f.message_type.GetOptions().map_entry else (1 if f.is_repeated else 2)
                )
        special = desc.full_name in _DIRECT or "config_discovery" in desc.fields_by_name
        secrets = frozenset(f.name for f in desc.fields if f.name in SECRET_PROTO_FIELDS)
        found = _PLANS[desc.full_name] = (special, secrets, walk)
    return found


def _walk(msg: Message, secret: list[bool] | None = None) -> Iterator[Ref]:
    """The references in ``msg``; ``secret`` (when given) gets True appended if a field that
    holds key material is set (``redact.SECRET_PROTO_FIELDS``) or an ``Any`` cannot be read."""
    out: list[Ref] = []
    _collect(msg, out, secret)
    yield from out


# Messages met again and again whose walk is kept by their bytes: a VirtualHost (a route
# edit changes one of a RouteConfiguration's hosts; the others are found by their bytes,
# serialized in C, rather than walked again route by route in Python).
_MEMO_TYPES = frozenset({"envoy.config.route.v3.VirtualHost"})
_MEMO: dict[bytes, tuple[tuple[Ref, ...], bool]] = {}
_MEMO_MAX = 4096  # entries (a VirtualHost's bytes each): cleared when full


def _collect(msg: Message, out: list[Ref], secret: list[bool] | None) -> None:
    desc = msg.DESCRIPTOR
    special, secrets, walk = _plan(desc)
    if desc.full_name in _MEMO_TYPES:
        key = msg.SerializeToString(deterministic=True)
        hit = _MEMO.get(key)
        if hit is None:
            found: list[Ref] = []
            flags: list[bool] = []
            _fields(msg, found, flags, secrets, walk)
            hit = (tuple(found), bool(flags))
            if len(_MEMO) >= _MEMO_MAX:
                _MEMO.clear()
            _MEMO[key] = hit
        out.extend(hit[0])
        if hit[1] and secret is not None:
            secret.append(True)
        return
    if special:
        name = msg.DESCRIPTOR.full_name
        if name == _ANY:
            cls = find_message(msg.type_url.rsplit("/", 1)[-1])
            if cls is not None:
                inner = cls()
                try:
                    msg.Unpack(inner)
                except Exception:
                    if secret is not None:
                        secret.append(True)
                    return
                _collect(inner, out, secret)
            elif secret is not None:
                secret.append(True)
            return
        if name == _SDS and msg.HasField("sds_config") and _is_ads(msg.sds_config):
            out.append((ResourceType.SECRET, msg.name, "secret"))
        elif name == _RDS and _is_ads(msg.config_source):
            out.append((ResourceType.ROUTE, msg.route_config_name, "route configuration"))
        elif _discovered(msg):
            # A filter configured over ECDS: Envoy asks for the configuration by its name.
            f: Any = msg
            out.append((ResourceType.EXTENSION, f.name, "filter configuration"))
        elif name == _CLUSTER:
            c: Any = msg
            if c.type == c.EDS and _is_ads(c.eds_cluster_config.eds_config):
                out.append(
                    (
                        ResourceType.ENDPOINT,
                        c.eds_cluster_config.service_name or c.name,
                        "endpoints (ClusterLoadAssignment)",
                    )
                )
        elif name == _ROUTE_ACTION:
            a: Any = msg
            if a.cluster:
                out.append((ResourceType.CLUSTER, a.cluster, "cluster"))
            for wc in a.weighted_clusters.clusters:
                out.append((ResourceType.CLUSTER, wc.name, "cluster"))
    _fields(msg, out, secret, secrets, walk)


def _fields(
    msg: Message,
    out: list[Ref],
    secret: list[bool] | None,
    secrets: frozenset[str],
    walk: dict[str, int],
) -> None:
    """The walk into ``msg``'s fields (after its own checks by type, in ``_collect``)."""
    if not walk and not (secrets and secret is not None):
        return
    for field, value in msg.ListFields():
        fname = field.name
        if secret is not None and fname in secrets:
            secret.append(True)
        kind = walk.get(fname)
        if kind is None:
            continue
        if kind == 2:
            _collect(value, out, secret)
        elif kind == 1:
            for v in value:
                _collect(v, out, secret)
        else:
            for v in value.values():
                if isinstance(v, Message):
                    _collect(v, out, secret)


def references(resource: Resource) -> tuple[Ref, ...]:
    """What ``resource`` refers to over ADS (each reference once, in order found)."""
    out: list[Ref] = []
    _collect(resource.message, out, None)
    return tuple(dict.fromkeys(out))


def scan(resource: Resource) -> tuple[tuple[Ref, ...], bool]:
    """``references``, and whether the resource may hold key material (a Secret, a field
    such as ``private_key`` set, an ``Any`` that cannot be read): never written to disk."""
    secret: list[bool] = []
    out: list[Ref] = []
    _collect(resource.message, out, secret)
    refs = tuple(dict.fromkeys(out))
    return refs, bool(secret) or resource.type is ResourceType.SECRET


def check_snapshot(
    snapshot: Snapshot,
    group: str = "",
    refs_of: Callable[[Resource], tuple[Ref, ...]] = references,
) -> list[ConfigError]:
    """Every reference resolves; returns one error per dangling reference.

    ``refs_of`` lets a caller that keeps resources across reloads cache the walk.
    """
    errors: list[ConfigError] = []
    scope = f" (for nodes {group})" if group else ""
    for rtype, named in snapshot.resources.items():
        for resource in named.values():
            for ref_type, ref_name, what in refs_of(resource):
                if ref_name not in snapshot.of(ref_type):
                    errors.append(
                        ConfigError(
                            Location.parse(resource.source),
                            f"{rtype.short} {resource.name!r} references {what} "
                            f"{ref_name!r}, which no file defines{scope}",
                        )
                    )
    return errors
