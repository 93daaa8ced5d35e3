"""Proto3 JSON mappings -> messages, fast: one converter compiled per message type.

``json_format.ParseDict`` walks each value in Python, field by field, setting attributes one
at a time. Here each message type gets a table (JSON name and proto name -> field
converter) built once; a mapping becomes the keyword arguments of the message's constructor
(upb builds nested messages from nested dicts in C), and each ``Any`` is built and
serialized as json_format does.

Only plain, valid input is converted here: the exact Python types json_format takes without
conversion (str for strings, int for integers, enum names, "1.5s" durations...), each field
once, no null, no extension, no well-known type but wrappers, ``Duration`` and ``Any``.
Anything else raises ``Fallback`` and the caller uses ``json_format.ParseDict``, which gives
the same message or its error. That the two agree byte for byte is tested on the corpus,
the golden policies and generated inputs (tests/test_fastjson.py).
"""

from __future__ import annotations

import base64
import math
from collections.abc import Callable
from typing import Any

from google.protobuf import descriptor, json_format
from google.protobuf.duration_pb2 import Duration

from xdsplane.config.prototypes import find_message

Converter = Callable[..., Any]  # (value) or, for a _Nested, (value, depth)

_FD = descriptor.FieldDescriptor
_INTS = frozenset({_FD.CPPTYPE_INT32, _FD.CPPTYPE_INT64, _FD.CPPTYPE_UINT32, _FD.CPPTYPE_UINT64})
_FLOAT_MAX = 3.4028234663852886e38  # json_format refuses larger values for float fields
_MAX_DEPTH = 60  # json_format refuses 100 levels; deeper input takes its path
_SURROGATE = json_format._UNPAIRED_SURROGATE_PATTERN  # refused as json_format does


class Fallback(Exception):
    """Input this module does not convert: json_format decides."""


def _string(value: Any) -> Any:
    if value.__class__ is not str or (not value.isascii() and _SURROGATE.search(value)):
        raise Fallback
    return value


def _integer(value: Any) -> Any:
    if value.__class__ is not int:  # a bool's class is bool
        raise Fallback
    return value


def _double(value: Any) -> Any:
    cls = value.__class__
    if cls is int:
        return float(value)
    if cls is not float or not math.isfinite(value):
        raise Fallback
    return value


def _single(value: Any) -> Any:
    out = _double(value)
    if not -_FLOAT_MAX <= out <= _FLOAT_MAX:
        raise Fallback
    return out


def _boolean(value: Any) -> Any:
    if value.__class__ is not bool:
        raise Fallback
    return value


def _bytes(value: Any) -> Any:
    if value.__class__ is not str:
        raise Fallback
    encoded = value.encode("utf-8")
    try:
        return base64.urlsafe_b64decode(encoded + b"=" * (4 - len(encoded) % 4))
    except ValueError:
        raise Fallback from None


def _enum(enum_type: Any) -> Converter:
    numbers = {v.name: v.number for v in enum_type.values}

    def convert(value: Any) -> Any:
        if value.__class__ is not str:
            raise Fallback
        number = numbers.get(value)
        if number is None:
            raise Fallback
        return number

    return convert


_DURATIONS: dict[str, tuple[int, int]] = {}


def _duration(value: Any) -> Any:
    if value.__class__ is not str:
        raise Fallback
    found = _DURATIONS.get(value)
    if found is None:
        d = Duration()
        try:
            d.FromJsonString(value)
        except ValueError:
            raise Fallback from None
        found = (d.seconds, d.nanos)
        if len(_DURATIONS) > 10_000:
            _DURATIONS.clear()
        _DURATIONS[value] = found
    return {"seconds": found[0], "nanos": found[1]}


def _scalar(field: Any) -> Converter:
    cpp = field.cpp_type
    if cpp in _INTS:
        return _integer
    if cpp == _FD.CPPTYPE_DOUBLE:
        return _double
    if cpp == _FD.CPPTYPE_FLOAT:
        return _single
    if cpp == _FD.CPPTYPE_BOOL:
        return _boolean
    if cpp == _FD.CPPTYPE_ENUM:
        return _enum(field.enum_type)
    if field.type == _FD.TYPE_BYTES:
        return _bytes
    return _string


def _refuse(value: Any) -> Any:
    raise Fallback


class _Message:
    """The converter of one message type: a mapping -> its constructor's arguments."""

    __slots__ = ("desc", "fields", "oneofs")

    def __init__(self, desc: Any) -> None:
        self.desc = desc
        # JSON name and proto name -> (proto name, converter of the value, whether the
        # converter takes the depth too)
        self.fields: dict[str, tuple[str, Converter, bool]] = {}
        # proto name -> index of its oneof (fields in no oneof are absent)
        self.oneofs: dict[str, int] = {}

    def kwargs(self, value: Any, depth: int) -> dict[str, Any]:
        depth += 1
        if value.__class__ is not dict or depth > _MAX_DEPTH:
            raise Fallback
        out: dict[str, Any] = {}
        fields = self.fields
        for key, item in value.items():
            spec = fields.get(key)
            if spec is None:  # unknown, an extension "[...]", a non-string key
                raise Fallback
            name, convert, nested = spec
            out[name] = convert(item, depth) if nested else convert(item)
        if len(out) != len(value):
            raise Fallback  # the same field twice (its proto and JSON names)
        if self.oneofs and len(out) > 1:
            members = out.keys() & self.oneofs.keys()  # a set operation in C: most are 0-1
            if len(members) > 1:
                seen = [self.oneofs[name] for name in members]
                if len(seen) != len(set(seen)):
                    raise Fallback
        return out


class _Nested:
    """A converter that needs the nesting depth (messages and what holds them)."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any, int], Any]) -> None:
        self.fn = fn

    def __call__(self, value: Any, depth: int) -> Any:
        return self.fn(value, depth)


_COMPILED: dict[str, _Message] = {}


def _message_converter(desc: Any) -> Converter:
    """The converter of a message-typed value (one element, not a list)."""
    name = desc.full_name
    if desc.file.name == "google/protobuf/wrappers.proto":
        inner = _scalar(desc.fields_by_name["value"])
        return lambda value: {"value": inner(value)}
    if name == "google.protobuf.Duration":
        return _duration
    if name == "google.protobuf.Any":
        return _Nested(_any)
    if name.startswith("google.protobuf.") and name in json_format._WKTJSONMETHODS:
        return _refuse  # Struct, Value, ListValue, Timestamp, FieldMask
    return _Nested(_compile(desc).kwargs)


def _field_converter(field: Any) -> Converter:
    if field.is_extension:
        return _refuse
    msg = field.message_type
    if msg is not None and msg.GetOptions().map_entry:
        key_field = msg.fields_by_name["key"]
        if key_field.cpp_type != _FD.CPPTYPE_STRING:
            return _refuse
        vf = msg.fields_by_name["value"]
        value_conv = _message_converter(vf.message_type) if vf.message_type else _scalar(vf)
        nested_value = value_conv.fn if isinstance(value_conv, _Nested) else None

        def convert_map(value: Any, depth: int) -> Any:
            if value.__class__ is not dict:
                raise Fallback
            if nested_value is not None:
                return {_string(k): nested_value(v, depth) for k, v in value.items()}
            return {_string(k): value_conv(v) for k, v in value.items()}

        return _Nested(convert_map)
    one = _message_converter(msg) if msg is not None else _scalar(field)
    if not field.is_repeated:
        return one
    if isinstance(one, _Nested):
        each = one.fn

        def convert_nested_list(value: Any, depth: int) -> Any:
            if value.__class__ is not list:
                raise Fallback
            return [each(v, depth) for v in value]

        return _Nested(convert_nested_list)

    def convert_list(value: Any) -> Any:
        if value.__class__ is not list:
            raise Fallback
        return [one(v) for v in value]

    return convert_list


def _compile(desc: Any) -> _Message:
    found = _COMPILED.get(desc.full_name)
    if found is not None and found.desc is desc:
        return found
    out = _Message(desc)
    _COMPILED[desc.full_name] = out  # before the fields: a type may contain itself
    for field in desc.fields:
        conv = _field_converter(field)
        spec = (
            (field.name, conv.fn, True) if isinstance(conv, _Nested) else (field.name, conv, False)
        )
        out.fields[field.json_name] = spec
        out.fields[field.name] = spec
        if field.containing_oneof is not None:
            out.oneofs[field.name] = field.containing_oneof.index
    return out


def _any(value: Any, depth: int) -> Any:
    if value.__class__ is not dict or not value:
        raise Fallback  # an empty Any: json_format's own path
    url = value.get("@type")
    if url.__class__ is not str:
        raise Fallback
    cls = find_message(url.split("/")[-1])
    if cls is None or cls.DESCRIPTOR.full_name.startswith("google.protobuf."):
        raise Fallback
    body = {k: v for k, v in value.items() if k != "@type"}
    kwargs = _compile(cls.DESCRIPTOR).kwargs(body, depth)
    try:
        inner = cls(**kwargs)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise Fallback from None
    return {"type_url": url, "value": inner.SerializeToString()}


def parse(value: Any, cls: Any) -> Any:
    """A new ``cls`` message from the proto3 JSON mapping ``value``; raises Fallback."""
    kwargs = _compile(cls.DESCRIPTOR).kwargs(value, 0)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError, KeyError, AttributeError):
        raise Fallback from None
