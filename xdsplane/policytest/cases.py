"""A cases file (YAML) -> ``Case`` objects, or every problem found with its file:line.

    cases:
      - name: alice reaches the admin API
        request: {host: billing.example.com, path: /billing/admin/audit,
                  client_certificate: {uri: spiffe://example.com/ops/alice}}
        expect: {status: 200, upstream: billing}

docs/testing.md documents every key. Nothing here runs a request: ``run.py`` does.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xdsplane.config.errors import ConfigError, ConfigErrors, Location
from xdsplane.config.yamlsrc import Document, YamlError, parse

REFUSED = "refused"  # an expected status: the connection closed without an HTTP answer
NO_UPSTREAM = "none"  # an expected upstream: no upstream received the request
MAX_REPEAT = 1000
MAX_BYTES = 4 * 1024 * 1024
_RELATIVE = re.compile(r"^([+-]?)(\d+)(s|m|h|d)$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_REPEATED = re.compile(r"^(\d{3})\s*[*x]\s*(\d+)$")  # "403*59": 59 times 403

Status = int | str  # an HTTP status, or REFUSED


@dataclass(frozen=True)
class ClientCertificate:
    uris: tuple[str, ...] = ()
    dns: tuple[str, ...] = ()


@dataclass(frozen=True)
class JwtSpec:
    """A token to mint: ``None`` fields take the provider's issuer, first audience, etc."""

    provider: str | None
    sub: str
    aud: str | list[str] | None = None
    iss: str | None = None
    exp: int | None = None  # seconds relative to now (e.g. -3600), None: the default
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Request:
    host: str
    path: str
    method: str = "GET"
    headers: Mapping[str, str] = field(default_factory=dict)
    sni: str | None = None  # None: the host
    listener: str | None = None
    client_certificate: ClientCertificate | None = None
    jwt: JwtSpec | None = None
    repeat: int = 1


@dataclass(frozen=True)
class Expect:
    statuses: tuple[Status, ...]  # one per request sent (repeat)
    upstream: str | None = None  # None: not checked; NO_UPSTREAM: none reached
    headers_to_upstream: Mapping[str, str | None] = field(default_factory=dict)
    response_headers: Mapping[str, str | None] = field(default_factory=dict)


@dataclass(frozen=True)
class Case:
    file: str
    line: int
    name: str
    request: Request
    expect: Expect
    doc: Document = field(compare=False, repr=False)
    index: int = 0  # its position in the file's ``cases`` list

    def where(self, *keys: str | int) -> Location:
        """The location of a key of this case (for errors found when the case runs)."""
        return self.doc.locate(("cases", self.index, *keys))


class _Problems:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        self.errors: list[ConfigError] = []

    def add(self, keys: tuple[str | int, ...], message: str) -> None:
        self.errors.append(ConfigError(self.doc.locate(keys), message))


def _keys(v: Mapping[str, Any], allowed: set[str], at: tuple[str | int, ...], p: _Problems) -> None:
    for k in v:
        if k not in allowed:
            known = ", ".join(sorted(allowed))
            what = ".".join(str(x) for x in at[2:]) or "case"
            p.add((*at, str(k)), f"{what}: unknown key {k!r} (known: {known})")


def _str(v: Any, at: tuple[str | int, ...], what: str, p: _Problems, empty: bool = False) -> str:
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        p.add(at, f"{what}: expected a string, got {type(v).__name__}")
        return ""
    text = str(v)
    if not text and not empty:
        p.add(at, f"{what}: must not be empty")
    return text


def _strs(v: Any, at: tuple[str | int, ...], what: str, p: _Problems) -> tuple[str, ...]:
    items = v if isinstance(v, list) else [v]
    return tuple(
        _str(x, (*at, i) if isinstance(v, list) else at, what, p) for i, x in enumerate(items)
    )


def relative_seconds(v: Any) -> int | None:
    """``-1h``, ``+5m``, ``30s``, ``2d`` or a number of seconds -> seconds; None if not one."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    m = _RELATIVE.match(str(v).strip())
    if m is None:
        return None
    n = int(m.group(2)) * _UNIT[m.group(3)]
    return -n if m.group(1) == "-" else n


def _header_map(
    v: Any, at: tuple[str | int, ...], what: str, p: _Problems, nulls: bool
) -> dict[str, str | None]:
    if not isinstance(v, dict):
        p.add(at, f"{what}: expected a mapping of header names to values")
        return {}
    out: dict[str, str | None] = {}
    for k, x in v.items():
        name = str(k).lower()
        if x is None and nulls:
            out[name] = None  # the header must be absent
        else:
            out[name] = _str(x, (*at, str(k)), f"{what}.{k}", p, empty=True)
    return out


def _client_cert(v: Any, at: tuple[str | int, ...], p: _Problems) -> ClientCertificate | None:
    if not isinstance(v, dict):
        p.add(at, "request.client_certificate: expected {uri: ..., dns: ...}")
        return None
    _keys(v, {"uri", "dns"}, at, p)
    uris = _strs(v["uri"], (*at, "uri"), "client_certificate.uri", p) if "uri" in v else ()
    dns = _strs(v["dns"], (*at, "dns"), "client_certificate.dns", p) if "dns" in v else ()
    if not uris and not dns:
        p.add(at, "request.client_certificate: give its SANs: uri, dns or both")
    return ClientCertificate(uris, dns)


def _jwt(v: Any, at: tuple[str | int, ...], p: _Problems) -> JwtSpec | None:
    if not isinstance(v, dict):
        p.add(at, "request.jwt: expected claims such as {provider: idp, sub: alice}")
        return None
    provider = (
        _str(v["provider"], (*at, "provider"), "jwt.provider", p) if "provider" in v else None
    )
    sub = _str(v.get("sub", "xdsplane-test"), (*at, "sub"), "jwt.sub", p)
    aud = v.get("aud")
    if aud is not None and not (
        isinstance(aud, str) or (isinstance(aud, list) and all(isinstance(a, str) for a in aud))
    ):
        p.add((*at, "aud"), "jwt.aud: expected a string or a list of strings")
    iss = _str(v["iss"], (*at, "iss"), "jwt.iss", p) if "iss" in v else None
    exp = None
    if "exp" in v:
        exp = relative_seconds(v["exp"])
        if exp is None:
            p.add((*at, "exp"), "jwt.exp: expected a time from now such as -1h, 5m or 30s")
    reserved = {"provider", "sub", "aud", "iss", "exp"}
    extra = {str(k): x for k, x in v.items() if k not in reserved}
    return JwtSpec(provider, sub, aud, iss, exp, extra)


def _statuses(v: Any, repeat: int, at: tuple[str | int, ...], p: _Problems) -> tuple[Status, ...]:
    def one(x: Any, where: tuple[str | int, ...]) -> list[Status]:
        if x == REFUSED:
            return [REFUSED]
        if isinstance(x, int) and not isinstance(x, bool) and 100 <= x <= 599:
            return [x]
        m = _REPEATED.match(str(x)) if isinstance(x, str) else None
        if m is not None and int(m.group(2)) >= 1:
            return [int(m.group(1))] * int(m.group(2))
        p.add(where, f"expect.status: expected an HTTP status (100-599) or {REFUSED!r}, got {x!r}")
        return []

    if not isinstance(v, list):
        return tuple(one(v, at) * repeat)
    out = [s for i, x in enumerate(v) for s in one(x, (*at, i))]
    if len(out) != repeat:
        p.add(at, f"expect.status: {len(out)} statuses for {repeat} requests (repeat: {repeat})")
    return tuple(out)


def _request(v: Any, at: tuple[str | int, ...], p: _Problems) -> Request | None:
    if not isinstance(v, dict):
        p.add(at, "request: expected a mapping with host and path")
        return None
    allowed = {"host", "path", "method", "headers", "sni", "listener"}
    _keys(v, allowed | {"client_certificate", "jwt", "repeat"}, at, p)
    for k in ("host", "path"):
        if k not in v:
            p.add(at, f"request: {k} is required")
    host = _str(v.get("host", "x"), (*at, "host"), "request.host", p)
    path = _str(v.get("path", "/"), (*at, "path"), "request.path", p)
    if path and (any(c in path for c in " \r\n\t") or not path.startswith(("/", "*"))):
        p.add((*at, "path"), "request.path: must start with / and hold no spaces")
    repeat = v.get("repeat", 1)
    if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
        p.add((*at, "repeat"), f"request.repeat: expected a number from 1 to {MAX_REPEAT}")
        repeat = 1
    headers = _header_map(v.get("headers", {}), (*at, "headers"), "request.headers", p, False)
    cert = (
        _client_cert(v["client_certificate"], (*at, "client_certificate"), p)
        if ("client_certificate" in v)
        else None
    )
    return Request(
        host=host,
        path=path,
        method=_str(v.get("method", "GET"), (*at, "method"), "request.method", p).upper(),
        headers={k: x or "" for k, x in headers.items()},
        sni=_str(v["sni"], (*at, "sni"), "request.sni", p) if v.get("sni") is not None else None,
        listener=_str(v["listener"], (*at, "listener"), "request.listener", p)
        if "listener" in v
        else None,
        client_certificate=cert,
        jwt=_jwt(v["jwt"], (*at, "jwt"), p) if "jwt" in v else None,
        repeat=repeat,
    )


def _expect(v: Any, repeat: int, at: tuple[str | int, ...], p: _Problems) -> Expect | None:
    if not isinstance(v, dict):
        p.add(at, "expect: expected a mapping with status")
        return None
    _keys(v, {"status", "upstream", "headers_to_upstream", "response_headers"}, at, p)
    if "status" not in v:
        p.add(at, "expect: status is required")
        return None
    upstream = (
        _str(v["upstream"], (*at, "upstream"), "expect.upstream", p)
        if (v.get("upstream") is not None)
        else None
    )
    return Expect(
        statuses=_statuses(v["status"], repeat, (*at, "status"), p),
        upstream=upstream,
        headers_to_upstream=_header_map(
            v.get("headers_to_upstream", {}),
            (*at, "headers_to_upstream"),
            "expect.headers_to_upstream",
            p,
            True,
        ),
        response_headers=_header_map(
            v.get("response_headers", {}),
            (*at, "response_headers"),
            "expect.response_headers",
            p,
            True,
        ),
    )


def parse_document(doc: Document) -> list[Case]:
    """The cases of one document; raises ConfigErrors naming file:line and the key."""
    p = _Problems(doc)
    value = doc.value
    if not isinstance(value, dict) or not isinstance(value.get("cases"), list):
        p.add((), "a cases file holds a list under 'cases:' (see docs/testing.md)")
        raise ConfigErrors(p.errors)
    for k in value:
        if k != "cases":
            p.add((str(k),), f"unknown top-level key {k!r} (a cases file holds only 'cases')")
    out: list[Case] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(value["cases"]):
        at: tuple[str | int, ...] = ("cases", i)
        if not isinstance(item, dict):
            p.add(at, "a case is a mapping with name, request and expect")
            continue
        _keys(item, {"name", "request", "expect"}, at, p)
        for k in ("name", "request", "expect"):
            if k not in item:
                p.add(at, f"case {i + 1}: {k} is required")
        name = _str(item.get("name", f"case {i + 1}"), (*at, "name"), "name", p)
        line = doc.locate(at).line
        if name in seen:
            p.add((*at, "name"), f"case name {name!r} is used twice (first on line {seen[name]})")
        seen.setdefault(name, line)
        request = _request(item.get("request"), (*at, "request"), p)
        expect = _expect(item.get("expect"), request.repeat if request else 1, (*at, "expect"), p)
        if request is not None and expect is not None:
            out.append(Case(doc.path, line, name, request, expect, doc, i))
    if p.errors:
        raise ConfigErrors(p.errors)
    return out


def load_cases(path: Path) -> list[Case]:
    """Every case of the file ``path``; raises ConfigErrors (file:line: field: problem)."""
    shown = str(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigErrors(
            [ConfigError(Location(shown), f"cannot read: {e.strerror or e}")]
        ) from None
    if len(data) > MAX_BYTES:
        raise ConfigErrors([ConfigError(Location(shown), "larger than 4 MiB")])
    try:
        docs = parse(data.decode("utf-8"), shown)
    except UnicodeDecodeError:
        raise ConfigErrors([ConfigError(Location(shown), "not UTF-8 text")]) from None
    except YamlError as e:
        raise ConfigErrors([e.error]) from None
    if len(docs) != 1:
        raise ConfigErrors([ConfigError(Location(shown), "expected one YAML document")])
    return parse_document(docs[0])
