"""Envoy messages from proto3 JSON mappings, with errors located in the YAML source.

``fastjson`` converts plain input; the rest goes through ``json_format.ParseDict``, which
only resolves an ``Any``'s ``@type`` when that message's ``_pb2`` module has been imported
(``prototypes.find_message`` imports them on demand).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from xdsplane.config import fastjson
from xdsplane.config.errors import ConfigError, Location
from xdsplane.config.prototypes import _type_name, find_message
from xdsplane.config.yamlsrc import Document
from xdsplane.redact import SECRET_PROTO_FIELDS, hide_value

__all__ = ["find_message", "parse_message", "prepare_types"]


def _type_urls(value: Any) -> Iterator[str]:
    if isinstance(value, dict):
        t = value.get("@type")
        if isinstance(t, str):
            yield t
        for v in value.values():
            yield from _type_urls(v)
    elif isinstance(value, list):
        for v in value:
            yield from _type_urls(v)


def prepare_types(value: Any) -> None:
    """Make every ``@type`` in ``value`` resolvable by json_format."""
    for url in set(_type_urls(value)):
        find_message(_type_name(url))


def parse_message(
    value: Any, cls: Any, doc: Document, keys: tuple[str | int, ...]
) -> tuple[Message | None, list[ConfigError]]:
    """Parse ``value`` (found at ``keys`` in ``doc``) into a new ``cls`` message.

    Plain input takes ``fastjson``; anything it does not convert, errors included, takes
    ``json_format.ParseDict`` (the same message, or the error located below)."""
    try:
        return fastjson.parse(value, cls), []
    except Exception:  # json_format decides, and words any error
        pass
    prepare_types(value)
    msg = cls()
    try:
        json_format.ParseDict(value, msg)
    except (json_format.ParseError, TypeError, ValueError, AttributeError) as exc:
        return None, [_locate_error(value, msg.DESCRIPTOR, doc, keys, exc)]
    except RecursionError:
        return None, [ConfigError(doc.locate(keys), "resource nested too deeply")]
    return msg, []


def _innermost(exc: Exception) -> str:
    text = str(exc).split("\n", 1)[0]
    while text.startswith("Failed to parse ") and ": " in text:
        text = text.split(": ", 1)[1]
    text = text.split(' at "', 1)[0].rstrip(".")
    if " at " in text and "type_url" in text:
        text = text.split(" at ", 1)[0]
    return text


def _locate_error(
    value: Any, desc: Any, doc: Document, keys: tuple[str | int, ...], exc: Exception
) -> ConfigError:
    """Find the deepest part of ``value`` that fails on its own, for a precise location."""
    where, message = _descend(value, desc, doc, keys)
    return ConfigError(where, message or _innermost(exc))


def _field(desc: Any, key: str) -> Any | None:
    for f in desc.fields:
        if key in (f.name, f.json_name):
            return f
    return None


def _fails(value: Any, desc: Any) -> str | None:
    from google.protobuf import message_factory

    try:
        json_format.ParseDict(value, message_factory.GetMessageClass(desc)())
    except Exception as exc:
        return _innermost(exc)
    return None


_INTEGER_TYPES = frozenset(
    {
        "TYPE_INT32",
        "TYPE_INT64",
        "TYPE_UINT32",
        "TYPE_UINT64",
        "TYPE_SINT32",
        "TYPE_SINT64",
        "TYPE_FIXED32",
        "TYPE_FIXED64",
        "TYPE_SFIXED32",
        "TYPE_SFIXED64",
    }
)


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "nothing (null)"
    return repr(value)


def _type_name_of(field: Any) -> str:
    for name in _INTEGER_TYPES:
        if field.type == getattr(field, name):
            return name
    return ""


def _shape_problem(field: Any, value: Any) -> str | None:
    """A value of the wrong shape for its field, said plainly (json_format's words mislead:
    a string where a mapping belongs is iterated as characters)."""
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return None if isinstance(value, dict) else f"expected a mapping, got {_kind(value)}"
    if field.is_repeated:
        if not isinstance(value, list):
            return f"expected a list, got {_kind(value)}"
        items = value
    else:
        items = [value]
    for item in items:
        if field.message_type is not None:
            if field.message_type.full_name.startswith("google.protobuf."):
                continue  # well-known types take scalars: "1s", 5, "a.b"
            if not isinstance(item, dict):
                return f"expected a mapping, got {_kind(item)}"
        elif _type_name_of(field):
            ok = (isinstance(item, int) and not isinstance(item, bool)) or (
                isinstance(item, str) and item.lstrip("-").isdigit()
            )
            if not ok:
                return f"expected an integer, got {_kind(item)}"
    return None


_SECRET_SUFFIXES = ("secret", "secrets", "password", "token", "credentials", "private_key")


def _secret(key: str) -> bool:
    """A proto field holding a secret (not every "*_key": runtime_key, hash_key are names)."""
    snake = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", key).lower()
    return snake in SECRET_PROTO_FIELDS or snake.endswith(_SECRET_SUFFIXES)


def _descend(
    value: Any, desc: Any, doc: Document, keys: tuple[str | int, ...], secret: bool = False
) -> tuple[Location, str | None]:
    """The deepest failing part of ``value`` and what is wrong with it. Under a secret field
    (``secret``: a password, a private key...) the message never quotes the value."""
    if not isinstance(value, dict):
        return doc.locate(keys), None
    if desc.full_name == "google.protobuf.Any":
        url = value.get("@type")
        if not isinstance(url, str):
            return doc.locate(keys), "an Any needs a string '@type'"
        cls = find_message(_type_name(url))
        if cls is None:
            return doc.locate((*keys, "@type")), f"unknown type {url!r}"
        inner = {k: v for k, v in value.items() if k != "@type"}
        if (
            "value" in inner
            and len(inner) == 1
            and cls.DESCRIPTOR.full_name.startswith("google.protobuf.")
        ):
            return doc.locate(keys), None
        return _descend(inner, cls.DESCRIPTOR, doc, keys, secret)
    for key, sub in value.items():
        if not isinstance(key, str):
            return doc.locate(keys), f"field names must be strings, not {key!r}"
        f = _field(desc, key)
        if f is None:
            if key.startswith("[") or key == "@type":
                continue
            return doc.locate_key((*keys, key)), f"{desc.full_name} has no field {key!r}"
        hide = secret or _secret(key)
        shape = _shape_problem(f, sub)
        if shape is not None:
            return doc.locate((*keys, key)), _hidden(f"{key}: {shape}", sub, hide)
        if f.message_type is None:
            problem = _fails({key: sub}, desc)
            if problem is not None:
                return doc.locate((*keys, key)), _hidden(f"{key}: {problem}", sub, hide)
            continue
        sub_desc = f.message_type
        if sub_desc.GetOptions().map_entry:
            vf = sub_desc.fields_by_name["value"]
            if vf.message_type is None or not isinstance(sub, dict):
                continue
            for mk, mv in sub.items():
                if _fails(mv, vf.message_type):
                    return _descend(mv, vf.message_type, doc, (*keys, key, mk), hide)
            continue
        items = list(enumerate(sub)) if isinstance(sub, list) else [(None, sub)]
        for i, item in items:
            here = (*keys, key) if i is None else (*keys, key, i)
            if _fails(item, sub_desc) is not None:
                loc, msg = _descend(item, sub_desc, doc, here, hide)
                if msg is None and hide:
                    return loc, f"{key}: not a valid {sub_desc.name} (value not shown: a secret)"
                return loc, msg or _fails(item, sub_desc)
    return doc.locate(keys), None


def _hidden(message: str, value: Any, hide: bool) -> str:
    return hide_value(message, value) if hide else message
