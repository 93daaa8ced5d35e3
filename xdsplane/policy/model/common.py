"""The policy schema's shared pieces: the base ``Model`` (unknown keys refused, strict
types), names, durations, addresses, regexes, TLS versions and their checks.
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from typing import Annotated, Literal, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
)

NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62}[a-z0-9])?$"
DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?)(ms|s|m|h)$"
_DURATION = re.compile(DURATION_PATTERN)
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

Name = Annotated[
    str,
    Field(
        pattern=NAME_PATTERN,
        description="lower-case letters, digits, '.', '_' and '-'; at most 64 characters",
    ),
]


def duration_seconds(value: str) -> float:
    """'1.5s' -> 1.5; '250ms' -> 0.25; '5m' -> 300.0."""
    m = _DURATION.match(value)
    if m is None:
        raise ValueError(f"not a duration: {value!r} (use e.g. 250ms, 5s, 1m, 1h)")
    return float(m.group(1)) * _UNITS[m.group(3)]


def _check_duration(value: str) -> str:
    seconds = duration_seconds(value)
    if seconds <= 0:
        raise ValueError(f"a duration must be more than 0 (got {value!r})")
    if seconds > 315_576_000_000:
        raise ValueError(f"a duration must be at most 10,000 years (got {value!r})")
    return value


Duration = Annotated[
    str,
    Field(pattern=DURATION_PATTERN, description="a duration: 250ms, 5s, 1m, 1h", examples=["5s"]),
    AfterValidator(_check_duration),
]


def is_duration_field(model: type[BaseModel], name: str) -> bool:
    """Is ``model.name`` a Duration (maybe optional)? For error messages."""
    field = model.model_fields.get(name)
    if field is None:
        return False
    found = [*field.metadata]
    todo = [field.annotation]
    while todo:
        t = todo.pop()
        found.extend(getattr(t, "__metadata__", ()))
        todo.extend(get_args(t))
    return any(isinstance(m, AfterValidator) and m.func is _check_duration for m in found)


def split_host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {value!r}")
    if len(port) > 5:
        raise ValueError(f"port out of range 1-65535 in {value!r}")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} out of range 1-65535 in {value!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", host):
            raise ValueError(f"not an IP address or host name: {host!r}") from None
    return host, number


def _check_address(value: str) -> str:
    split_host_port(value)
    return value


def _check_ip_address(value: str) -> str:
    host, _ = split_host_port(value)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"a listener binds an IP address, not {host!r}") from None
    return value


Address = Annotated[
    str,
    Field(description="HOST:PORT (IPv6 as [::1]:PORT)", examples=["10.0.0.12:9443"]),
    AfterValidator(_check_address),
]
ListenAddress = Annotated[
    str,
    Field(description="IP:PORT to listen on", examples=["0.0.0.0:8443"]),
    AfterValidator(_check_ip_address),
]
# What Python's re accepts and RE2 does not: lookarounds, backreferences, atomic groups.
_RE2_UNSUPPORTED = re.compile(r"\(\?<?[=!]|\(\?P=|\(\?>|(?<!\\)(?:\\\\)*\\[1-9]")
# What RE2 accepts and Python's re does not: Unicode classes, \z, \Q...\E, \C.
_RE2_ONLY = re.compile(r"\\[pPzQEC]")


def _check_regex(value: str) -> str:
    """Envoy's regexes are RE2: catch what RE2 would reject before Envoy does."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            re.compile(value)
    except re.error as e:
        if not _RE2_ONLY.search(value):  # else let Envoy judge
            raise ValueError(f"not a valid regex: {value!r} ({e})") from None
    bad = _RE2_UNSUPPORTED.search(value)
    if bad is not None:
        raise ValueError(
            f"not an RE2 regex: {value!r} (lookarounds, backreferences and atomic groups "
            f"such as {bad.group(0)!r} are not supported)"
        )
    return value


Regex = Annotated[
    str,
    Field(description="an RE2 regular expression (no lookarounds, no backreferences)"),
    AfterValidator(_check_regex),
]
TlsVersion = Literal["1.0", "1.1", "1.2", "1.3"]
HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "CONNECT", "TRACE"]
_TLS_ORDER = {"1.0": 0, "1.1": 1, "1.2": 2, "1.3": 3}


def _check_versions(low: TlsVersion, high: TlsVersion) -> None:
    if _TLS_ORDER[low] > _TLS_ORDER[high]:
        raise ValueError(f"min_version {low} is above max_version {high}")


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _one_of(obj: BaseModel, fields: tuple[str, ...], required: bool = True) -> None:
    given = [f for f in fields if getattr(obj, f) is not None]
    if len(given) > 1:
        raise ValueError(f"give only one of {', '.join(fields)} (got {', '.join(given)})")
    if required and not given:
        raise ValueError(f"give one of {', '.join(fields)}")
