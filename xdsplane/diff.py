"""What changes for Envoy between two policy folders: resources added, changed and removed.

Resources are compared by version (a hash of their serialized bytes). A changed resource is
shown as the field paths that differ, each with its old and new value, computed on the JSON
that ``render`` prints: key material is redacted there, so a diff never shows it. A change
inside a redacted field is reported as ``[redacted] (changed)``, found by comparing the raw
values without ever formatting them.

List items that all carry a unique ``name`` (filter chains, virtual hosts, routes, ...) are
matched by name, other lists by content, so inserting a route does not show as every later
route changing.
"""

from __future__ import annotations

import base64
import binascii
import difflib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from xdsplane.policy.matrix import access_matrix
from xdsplane.policy.weaken import Weakening, weakenings
from xdsplane.render import REDACTED, SECRET_FIELDS, message_to_json
from xdsplane.snapshot import NodeGroup, Resource, Snapshot, SnapshotSet
from xdsplane.types import ORDER_INDEX, PUSH_ORDER, ResourceType

UNSET = "(unset)"
MAX_VALUE = 100  # characters of a value shown in a field line
MAX_FIELDS = 40  # field lines shown per changed resource

_Missing = object()


@dataclass(frozen=True, slots=True)
class FieldChange:
    """One leaf that differs; ``old`` or ``new`` is ``_Missing`` when the field is absent."""

    path: str
    old: Any
    new: Any

    def render(self) -> str:
        return f"{self.path}: {_show(self.old)} -> {_show(self.new)}"


@dataclass(frozen=True, slots=True)
class Change:
    kind: str  # "added", "changed" or "removed"
    type: ResourceType
    name: str
    old: Resource | None
    new: Resource | None
    fields: tuple[FieldChange, ...] = ()

    @property
    def source(self) -> str:
        r = self.new if self.new is not None else self.old
        return r.source if r is not None else ""


@dataclass(frozen=True, slots=True)
class GroupDiff:
    """The changes for one node group; ``old_name``/``new_name`` are None when absent."""

    old_name: str | None
    new_name: str | None
    changes: tuple[Change, ...]

    @property
    def title(self) -> str:
        if self.old_name == self.new_name:
            return f"nodes {self.old_name}"
        if self.old_name is None:
            return f"nodes {self.new_name} (new group)"
        if self.new_name is None:
            return f"nodes {self.old_name} (group removed)"
        return f"nodes {self.old_name} -> {self.new_name}"


@dataclass
class Summary:
    changed: int = 0
    added: int = 0
    removed: int = 0
    groups: list[GroupDiff] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not (self.changed or self.added or self.removed)

    def line(self) -> str:
        return f"{self.changed} changed, {self.added} added, {self.removed} removed"


# -- comparing -------------------------------------------------------------------------------


def diff_snapshots(old: Snapshot | None, new: Snapshot | None) -> list[Change]:
    """Every resource added, changed or removed, by type (in push order) and name."""
    out: list[Change] = []
    for rtype in PUSH_ORDER:
        before = old.of(rtype) if old is not None else {}
        after = new.of(rtype) if new is not None else {}
        for name in sorted(set(before) | set(after)):
            a, b = before.get(name), after.get(name)
            if a is None and b is not None:
                out.append(Change("added", rtype, name, None, b))
            elif b is None and a is not None:
                out.append(Change("removed", rtype, name, a, None))
            elif a is not None and b is not None and a.version != b.version:
                out.append(Change("changed", rtype, name, a, b, tuple(resource_fields(a, b))))
    out.sort(key=lambda c: (ORDER_INDEX[c.type], c.name))
    return out


def resource_fields(old: Resource, new: Resource) -> list[FieldChange]:
    """The field paths that differ between two versions of a resource (key material hidden)."""
    a, b = message_to_json(old.message), message_to_json(new.message)
    changes = list(json_changes(a, b))
    shown = {c.path for c in changes}
    raw_a = json_format.MessageToDict(old.message, preserving_proto_field_name=True)
    raw_b = json_format.MessageToDict(new.message, preserving_proto_field_name=True)
    for path in _secret_changes(raw_a, raw_b):
        if path not in shown:
            changes.append(FieldChange(path, REDACTED, f"{REDACTED} (changed)"))
    return changes


def json_changes(old: Any, new: Any, path: str = "") -> Iterator[FieldChange]:
    """Leaf differences between two JSON values, as paths like ``virtual_hosts[web].domains``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            here = _join(path, key)
            if key not in new:
                yield FieldChange(here, old[key], _Missing)
            elif key not in old:
                yield FieldChange(here, _Missing, new[key])
            else:
                yield from json_changes(old[key], new[key], here)
    elif isinstance(old, list) and isinstance(new, list):
        yield from _list_changes(old, new, path)
    elif old != new or type(old) is not type(new):
        yield FieldChange(path or "(value)", old, new)


def _names(items: list[Any]) -> list[str] | None:
    names = [i.get("name") if isinstance(i, dict) else None for i in items]
    if all(isinstance(n, str) and n for n in names) and len(set(names)) == len(names):
        return names  # type: ignore[return-value]
    return None


def _list_changes(old: list[Any], new: list[Any], path: str) -> Iterator[FieldChange]:
    old_names, new_names = _names(old), _names(new)
    if old and new and old_names is not None and new_names is not None:
        by_old = dict(zip(old_names, old, strict=True))
        by_new = dict(zip(new_names, new, strict=True))
        for name in old_names + [n for n in new_names if n not in by_old]:
            here = f"{path}[{name}]"
            if name not in by_new:
                yield FieldChange(here, by_old[name], _Missing)
            elif name not in by_old:
                yield FieldChange(here, _Missing, by_new[name])
            else:
                yield from json_changes(by_old[name], by_new[name], here)
        if [n for n in old_names if n in by_new] != [n for n in new_names if n in by_old]:
            yield FieldChange(f"{path} (order)", old_names, new_names)
        return
    keys_a = [json.dumps(x, sort_keys=True) for x in old]
    keys_b = [json.dumps(x, sort_keys=True) for x in new]
    matcher = difflib.SequenceMatcher(a=keys_a, b=keys_b, autojunk=False)
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op == "equal":
            continue
        if op == "replace" and i2 - i1 == j2 - j1:
            for k in range(i2 - i1):
                yield from json_changes(old[i1 + k], new[j1 + k], f"{path}[{j1 + k}]")
            continue
        for i in range(i1, i2):
            yield FieldChange(f"{path}[{i}]", old[i], _Missing)
        for j in range(j1, j2):
            yield FieldChange(f"{path}[{j}]", _Missing, new[j])


def _secret_changes(old: Any, new: Any, path: str = "") -> Iterator[str]:
    """Paths of redacted fields whose content differs. Yields paths only, never values."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            here = _join(path, key)
            if key in SECRET_FIELDS:
                if old.get(key, _Missing) != new.get(key, _Missing):
                    yield here
            elif key in old and key in new:
                yield from _secret_changes(old[key], new[key], here)
    elif isinstance(old, list) and isinstance(new, list):
        old_names, new_names = _names(old), _names(new)
        if old_names is not None and new_names is not None:
            by_new = dict(zip(new_names, new, strict=True))
            for name, item in zip(old_names, old, strict=True):
                if name in by_new:
                    yield from _secret_changes(item, by_new[name], f"{path}[{name}]")
        elif len(old) == len(new):
            for i, (a, b) in enumerate(zip(old, new, strict=True)):
                yield from _secret_changes(a, b, f"{path}[{i}]")


_IDENT = re.compile(r"[A-Za-z_@][A-Za-z0-9_]*")


def _join(path: str, key: str) -> str:
    if _IDENT.fullmatch(key):
        return f"{path}.{key}" if path else key
    return f"{path}[{json.dumps(key)}]"


def _decoded(value: str) -> bytes:
    """A string as the bytes it stands for: base64 (how JSON holds bytes fields) or text."""
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return value.encode("utf-8", errors="replace")


def _certificates(data: bytes) -> str | None:
    """``CN=edge, serial 4d..., until 2027-01-01`` for PEM certificates, else None."""
    try:
        from cryptography import x509

        certs = x509.load_pem_x509_certificates(data)
    except Exception:
        return None
    if not certs:
        return None
    c = certs[0]
    text = (
        f"certificate {c.subject.rfc4514_string() or '(no subject)'}, "
        f"serial {c.serial_number:x}, until {c.not_valid_after_utc:%Y-%m-%d}"
    )
    return text + (f" (+{len(certs) - 1} more)" if len(certs) > 1 else "")


def _show_string(value: str) -> str:
    data = _decoded(value)
    if b"PRIVATE KEY" in data or "PRIVATE KEY" in value:
        return REDACTED  # key material outside the fields render redacts: never show it
    if b"-----BEGIN CERTIFICATE-----" in data:
        described = _certificates(data)
        if described is not None:
            return f"<{described}>"
    if len(value) <= MAX_VALUE:
        return json.dumps(value, ensure_ascii=False)
    tag = hashlib.blake2b(value.encode(), digest_size=4).hexdigest()
    return json.dumps(value[:40] + "...", ensure_ascii=False) + f" ({len(value)} chars, #{tag})"


def _safe(value: Any) -> Any:
    """A JSON value with any string that holds a private key replaced."""
    if isinstance(value, dict):
        return {k: _safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_safe(v) for v in value]
    if isinstance(value, str) and (b"PRIVATE KEY" in _decoded(value) or "PRIVATE KEY" in value):
        return REDACTED
    return value


def _show(value: Any) -> str:
    if value is _Missing:
        return UNSET
    if isinstance(value, str):
        return _show_string(value)
    value = _safe(value)
    text = json.dumps(value, ensure_ascii=False, separators=(", ", ": "))
    if len(text) > MAX_VALUE:
        text = text[: MAX_VALUE - 3] + "..."
    return text


# -- node groups -----------------------------------------------------------------------------


def diff_sets(
    old: SnapshotSet, new: SnapshotSet, node: str | None = None, cluster: str = ""
) -> Summary:
    """Per node group (paired by name), or for one node's group on each side."""
    pairs: list[tuple[NodeGroup | None, NodeGroup | None]] = []
    if node is not None:
        pairs.append((old.group_for(node, cluster or node), new.group_for(node, cluster or node)))
    else:
        new_by_name = {g.name: g for g in new.groups}
        old_names = {g.name for g in old.groups}
        pairs.extend((g, new_by_name.get(g.name)) for g in old.groups)
        pairs.extend((None, g) for g in new.groups if g.name not in old_names)
    summary = Summary()
    for a, b in pairs:
        changes = diff_snapshots(
            a.snapshot if a is not None else None, b.snapshot if b is not None else None
        )
        for c in changes:
            setattr(summary, c.kind, getattr(summary, c.kind) + 1)
        summary.groups.append(
            GroupDiff(
                a.name if a is not None else None, b.name if b is not None else None, tuple(changes)
            )
        )
    return summary


def weakened(
    old: SnapshotSet, new: SnapshotSet, node: str | None = None, cluster: str = ""
) -> list[tuple[str, Weakening]]:
    """(group title, weakening) for every way NEW asks less of a request than OLD
    (policy/weaken.py over the groups' access matrices). Groups pair by name, or for one
    node on each side; a group whose nodes changed pairs with the new groups its globs fall
    in, so a change of ``nodes`` does not hide what it weakens."""
    pairs: list[tuple[NodeGroup, NodeGroup]] = []
    if node is not None:
        a, b = old.group_for(node, cluster or node), new.group_for(node, cluster or node)
        pairs += [(a, b)] if a is not None and b is not None else []
    else:
        new_by_name = {g.name: g for g in new.groups}
        for g in old.groups:
            if g.name in new_by_name:
                pairs.append((g, new_by_name[g.name]))
                continue
            for glob in g.globs or ():
                b = new.group_for(glob, None)
                if b is not None and (g, b) not in pairs:
                    pairs.append((g, b))
    out = []
    for a, b in pairs:
        if a.policy is None or b.policy is None:
            continue
        title = f"nodes {a.name}" if a.name == b.name else f"nodes {a.name} -> {b.name}"
        found = weakenings(access_matrix(a.policy), access_matrix(b.policy))
        out += [(title, w) for w in found]
    return out


_MARK = {"added": "+", "changed": "~", "removed": "-"}


def diff_lines(summary: Summary, unified: bool = False) -> list[str]:
    """Readable lines; ``unified`` shows changed resources as a unified diff of their JSON."""
    lines: list[str] = []
    for g in summary.groups:
        if not g.changes and g.old_name == g.new_name:
            continue
        lines.append(f"{g.title}:")
        if not g.changes:
            lines.append("  (no resources)")
        for c in g.changes:
            where = f"  ({c.source})" if c.source else ""
            lines.append(f"  {_MARK[c.kind]} {c.type.short} {c.name}{where}")
            if c.kind != "changed":
                continue
            if unified and c.old is not None and c.new is not None:
                lines.extend("      " + ln for ln in _unified(c.old, c.new, c.type, c.name))
                extra = [f for f in c.fields if f.new == f"{REDACTED} (changed)"]
                lines.extend(f"      {f.render()}" for f in extra)
                continue
            for f in c.fields[:MAX_FIELDS]:
                lines.append(f"      {f.render()}")
            if len(c.fields) > MAX_FIELDS:
                lines.append(f"      ... and {len(c.fields) - MAX_FIELDS} more fields")
            if not c.fields:
                lines.append("      (serialized form differs, JSON is the same)")
    return lines


def _unified(old: Resource, new: Resource, rtype: ResourceType, name: str) -> list[str]:
    a = json.dumps(_safe(message_to_json(old.message)), indent=2).splitlines()
    b = json.dumps(_safe(message_to_json(new.message)), indent=2).splitlines()
    label = f"{rtype.short}/{name}"
    return [
        ln.rstrip("\n")
        for ln in difflib.unified_diff(a, b, f"old {label}", f"new {label}", n=2, lineterm="")
    ]
