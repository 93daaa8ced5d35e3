"""A YAML document -> a PolicyFile, with pydantic's errors turned into ``path:line:col``."""

from __future__ import annotations

import difflib
import marshal
import re
from types import UnionType
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from xdsplane.config.errors import ConfigError
from xdsplane.config.yamlsrc import Document
from xdsplane.policy.model import Host, PolicyFile, is_duration_field
from xdsplane.redact import hide_value, is_path_field, is_secret_field


def _unwrap(t: Any) -> Any:
    """Strip Optional, unions of one model, and Annotated from a type."""
    while True:
        origin = get_origin(t)
        if origin is Annotated:
            t = get_args(t)[0]
        elif origin in (Union, UnionType):
            args = [a for a in get_args(t) if a is not type(None)]
            models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
            if len(args) == 1:
                t = args[0]
            elif models:
                t = models[0]
            else:
                return t
        else:
            return t


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class whose fields the last element of ``loc`` names (for suggestions)."""
    current: Any = PolicyFile
    for part in loc[:-1]:
        current = _unwrap(current)
        origin = get_origin(current)
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(str(part))
            if field is None:
                return None
            current = field.annotation
        elif origin is list and isinstance(part, int):
            current = get_args(current)[0]
        elif origin is dict:
            current = get_args(current)[1]
        else:
            return None
    current = _unwrap(current)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _closest(loc: tuple[Any, ...], value: Any) -> str | None:
    """The known key closest to the unknown one at ``loc`` (pydantic's location)."""
    keys = _keys(tuple(loc), value)
    model = _model_at(keys)
    if model is None or not keys:
        return None
    close = difflib.get_close_matches(str(keys[-1]), list(model.model_fields), n=1)
    return close[0] if close else None


def _suggest(key: str, loc: tuple[Any, ...]) -> str:
    model = _model_at(loc)
    if model is None:
        return ""
    close = difflib.get_close_matches(key, list(model.model_fields), n=1)
    known = ", ".join(model.model_fields)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (known keys: {known})"


def _message(err: dict[str, Any], loc: tuple[Any, ...]) -> str:
    """The message for one pydantic error; the value of a secret field (password, token,
    secret...) is never quoted, only its fingerprint (key material in any other field is
    replaced by ConfigError itself)."""
    text = _describe(err, loc)
    field = next((p for p in reversed(loc) if isinstance(p, str) and p != "[key]"), "")
    got = err.get("input")
    if is_secret_field(field) and not is_path_field(field):
        text = hide_value(text, got)
    return text


def _describe(err: dict[str, Any], loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, ") :]
    if kind == "extra_forbidden":
        key = str(loc[-1]) if loc else ""
        return f"unknown key {key!r}" + _suggest(key, loc)
    if kind == "missing":
        return f"missing required key {str(loc[-1])!r}"
    if kind == "string_pattern_mismatch" and "NAME" not in msg:
        pattern = err.get("ctx", {}).get("pattern", "")
        if "ms|s|m|h" in pattern:
            return f"not a duration: {err.get('input')!r} (use e.g. 250ms, 5s, 1m, 1h)"
        if pattern.startswith("^[a-z0-9]"):
            return (
                f"not a valid name: {err.get('input')!r} (lower-case letters, digits, '.', '_' "
                "and '-', starting and ending with a letter or digit)"
            )
    field = next((str(p) for p in reversed(loc) if isinstance(p, str) and p != "[key]"), "")
    got = err.get("input")
    number = isinstance(got, (int, float)) and not isinstance(got, bool)
    if kind == "string_type" and number and _is_duration(loc):
        return f"{field}: not a duration: {got!r} (give a unit: {got}s, {got}ms, {got}m or {got}h)"
    # pydantic speaks Python; say it in YAML's words.
    msg = re.sub(r" or instance of \w+", "", msg).replace(" after validation", "")
    msg = msg.replace("a valid dictionary", "a mapping")
    if kind.endswith("_type") or kind in ("literal_error", "int_parsing", "bool_parsing"):
        shown = _shown(got)
        quoted = kind == "string_type" or (kind == "literal_error" and f"'{got}'" in msg)
        if number:
            hint = f'; write it in quotes: "{got}"' if quoted else ""
            shown = f" (got the number {got!r}{hint})"
        return f"{field}: {msg}{shown}" if field else f"{msg}{shown}"
    return f"{field}: {msg}" if field and kind != "value_error" else msg


def _shown(got: Any) -> str:
    """What the value was, in YAML's words: ' (got a list)', " (got 'x')"."""
    if isinstance(got, dict):
        return " (got a mapping)"
    if isinstance(got, list):
        return " (got a list)"
    if got is None:
        return " (got null)"
    if isinstance(got, bool):
        return f" (got {str(got).lower()})"
    return f" (got {got!r})"


def _is_duration(loc: tuple[Any, ...]) -> bool:
    model = _model_at(loc)
    return model is not None and bool(loc) and is_duration_field(model, str(loc[-1]))


def _keys(loc: tuple[Any, ...], value: Any) -> tuple[str | int, ...]:
    """pydantic's location -> the keys of the YAML value.

    pydantic adds parts that are not keys (``[key]``, union tags such as ``str``, validator
    names such as ``function-after[...]``); a part is kept when the document has it at that
    place, so a user's key that happens to be named ``str`` or ``none`` is kept too.
    """
    out: list[str | int] = []
    current = value
    for part in loc:
        in_dict = isinstance(current, dict) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_dict or in_list:
            current = current[part]
        elif part == "[key]" or (
            isinstance(part, str) and (part.startswith("function-") or part in _UNION_TAGS)
        ):
            continue
        else:
            current = None  # not in the document (a missing key): keep it, stop following
        out.append(part)
    return tuple(out)


_UNION_TAGS = frozenset({"str", "int", "bool", "float", "list", "dict", "none"})


MAX_ERRORS = 200  # errors reported for one document


class HostModels:
    """The hosts a file's last parse validated, by their YAML value (``_value_key``):
    parsing the file again after an edit validates only the hosts that changed, the others
    are the very same (frozen) models, which the checks and the translation then recognise."""

    def __init__(self) -> None:
        self.hosts: dict[str | bytes, Host] = {}


def _value_key(value: Any) -> str | bytes:
    """What tells a YAML value from another, types included (1, 1.0 and true differ):
    its ``marshal`` bytes (format 2: by value alone, no back-references), 2.5x faster than
    its ``repr``, which stands in for a value marshal cannot write (none from our YAML)."""
    try:
        return marshal.dumps(value, 2)
    except ValueError:
        return repr(value)


def _reuse(
    value: dict[str, Any], known: dict[str | bytes, Host]
) -> tuple[dict[str, Any], list[tuple[int, int, str | bytes]]]:
    """``value`` with each host validated before in its place (copies along the way: the
    document is left as it is, for the errors' places), and where each host is."""
    listeners = value.get("listeners")
    if not isinstance(listeners, list):
        return value, []
    places: list[tuple[int, int, str | bytes]] = []
    out: list[Any] = []
    for i, listener in enumerate(listeners):
        hosts = listener.get("hosts") if isinstance(listener, dict) else None
        if isinstance(hosts, list):
            swapped: list[Any] = []
            for j, host in enumerate(hosts):
                if isinstance(host, dict):
                    key = _value_key(host)
                    places.append((i, j, key))
                    host = known.get(key, host)
                swapped.append(host)
            listener = {**listener, "hosts": swapped}
        out.append(listener)
    return {**value, "listeners": out}, places


def parse_policy(
    doc: Document, reuse: HostModels | None = None
) -> tuple[PolicyFile | None, list[ConfigError]]:
    """The document's policy, validated, or its errors. ``reuse``: the hosts of the last
    parse of the same file (a host whose value did not change is not validated again;
    pydantic takes a model instance as it is)."""
    if not isinstance(doc.value, dict):
        return None, [ConfigError(doc.locate(()), "expected a mapping of policy keys")]
    try:
        if reuse is None:
            return PolicyFile.model_validate(doc.value), []
        value, places = _reuse(doc.value, reuse.hosts)
        policy = PolicyFile.model_validate(value)
        reuse.hosts = {key: policy.listeners[i].hosts[j] for i, j, key in places}
        return policy, []
    except ValidationError as e:
        errors = []
        raw = e.errors(include_url=False)
        # Each error costs a lookup and a suggestion: past the first MAX_ERRORS, only count.
        more = len(raw) - MAX_ERRORS
        raw = raw[:MAX_ERRORS]
        # ``endpoint:`` gives "unknown key 'endpoint'; did you mean 'endpoints'?" and "missing
        # required key 'endpoints'" for the same mapping: the first says it all.
        implied = {
            (keys[:-1], close)
            for keys, close in (
                (_keys(tuple(err["loc"]), doc.value), _closest(err["loc"], doc.value))
                for err in raw
                if err["type"] == "extra_forbidden"
            )
            if close is not None
        }
        for err in raw:
            loc = tuple(err["loc"])
            keys = _keys(loc, doc.value)
            if err["type"] == "missing" and (keys[:-1], str(keys[-1])) in implied:
                continue
            if err["type"] == "extra_forbidden" or "[key]" in loc:
                where = doc.locate_key(keys)
            else:
                where = doc.locate(keys)
            errors.append(ConfigError(where, _message(dict(err), keys)))
        if more > 0:
            errors.append(
                ConfigError(
                    doc.locate(()),
                    f"{more} more errors in this file (the first {MAX_ERRORS} are shown)",
                )
            )
        return None, list(dict.fromkeys(errors))
