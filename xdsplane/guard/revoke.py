"""Revocation: tokens (``jti``), subjects (``sub``) and client certificates (SHA-256
fingerprint or serial) the guard refuses until an expiry, each with a reason.

Entries live in the guard's store (memory, or the Redis every guard shares: one key per
entry, ``{prefix}revoked:{kind}:{sha256(value)}``, whose TTL is the expiry) and in an
optional watched file (a YAML or JSON list) for deployments without Redis. The guard looks
them up on every ext_authz Check (one ``MGET``), caching nothing, so a revocation applies to
the next request of every Envoy, on connections opened before it too.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import yaml

from xdsplane.guard.store import Store

KINDS = ("jti", "sub", "cert_sha256", "cert_serial")
_FIELDS = {"kind", "value", "until", "reason"}
_HEX = re.compile(r"^[0-9a-f]+$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNIT = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_REASON = 200
CERT_CACHE = 4096  # client certificates whose identity is remembered (cert_identity)


class RevocationError(ValueError):
    """A bad entry, file or flag (the message names which)."""


@dataclass(frozen=True)
class Revocation:
    kind: str  # one of KINDS
    value: str
    until: float | None  # seconds since the epoch; None: never expires
    reason: str

    def live(self, now: float) -> bool:
        return self.until is None or self.until > now

    def to_json(self) -> dict[str, Any]:
        until = None if self.until is None else _iso(self.until)
        return {"kind": self.kind, "value": self.value, "until": until, "reason": self.reason}


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def normalize(kind: str, value: str) -> str:
    """The one spelling of ``value`` (fingerprints and serials: lower-case hex, no colons or
    leading zeros of a serial), so that another spelling cannot slip past an entry."""
    if kind not in KINDS:
        raise RevocationError(f"kind {kind!r}: expected one of {', '.join(KINDS)}")
    if not isinstance(value, str) or not value:
        raise RevocationError(f"{kind}: expected a non-empty string")
    if kind in ("cert_sha256", "cert_serial"):
        v = value.strip().lower().replace(":", "")
        v = v.removeprefix("0x")
        if not v or not _HEX.match(v):
            raise RevocationError(f"{kind} {value!r}: expected hexadecimal")
        if kind == "cert_sha256" and len(v) != 64:
            raise RevocationError(f"cert_sha256 {value!r}: expected 64 hex digits")
        if kind == "cert_serial":
            v = v.lstrip("0") or "0"
        return v
    return value


def parse_until(text: str | None, now: float) -> float | None:
    """``never``, a duration (``90s``, ``30m``, ``12h``, ``7d``) or an ISO 8601 time (UTC
    unless it says otherwise); None for never."""
    if text is None or text == "never":
        return None
    m = _DURATION.match(text)
    if m:
        return now + float(m.group(1)) * _UNIT[m.group(2)]
    try:
        t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise RevocationError(
            f"until {text!r}: expected never, a duration (90s, 30m, 12h, 7d) or an ISO 8601 time"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    return t.timestamp()


def entry(kind: str, value: str, until: float | None, reason: str) -> Revocation:
    if not isinstance(reason, str):
        raise RevocationError("reason: expected a string")
    if until is not None and not math.isfinite(until):
        raise RevocationError("until: expected a finite time")
    return Revocation(kind, normalize(kind, value), until, reason[:MAX_REASON])


@functools.lru_cache(maxsize=CERT_CACHE)
def cert_identity(pem: str) -> tuple[str, str] | None:
    """(SHA-256 fingerprint of the DER, serial) of a PEM certificate, lower-case hex; None
    when it does not parse. Envoy's ext_authz sends the peer certificate URL-encoded.
    Remembered for the last CERT_CACHE certificates: parsing one costs ~40 µs, and every
    Check from a client with a certificate asks."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    text = unquote(pem) if "%" in pem else pem
    try:
        cert = x509.load_pem_x509_certificate(text.encode())
    except ValueError:
        return None
    der = cert.public_bytes(Encoding.DER)
    return hashlib.sha256(der).hexdigest(), format(cert.serial_number, "x")


def cert_file_identity(path: Path) -> tuple[str, str]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise RevocationError(f"--cert {path}: {e}") from None
    found = cert_identity(text)
    if found is None:
        raise RevocationError(f"--cert {path}: not a PEM certificate")
    return found


# -- the file ---------------------------------------------------------------------------


def parse_entries(data: Any, where: str) -> list[Revocation]:
    """A list of ``{kind, value, until, reason}``; errors name ``where`` and the item."""
    if data is None:
        return []
    if not isinstance(data, list):
        raise RevocationError(f"{where}: expected a list of revocations")
    out: list[Revocation] = []
    for i, item in enumerate(data):
        at = f"{where}: item {i + 1}"
        if not isinstance(item, dict):
            raise RevocationError(f"{at}: expected a mapping with kind, value, until, reason")
        unknown = set(item) - _FIELDS
        if unknown:
            raise RevocationError(f"{at}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        for f in ("kind", "value"):
            if f not in item:
                raise RevocationError(f"{at}: field {f} is required")
        until = item.get("until")
        u: float | None
        try:
            if isinstance(until, datetime):
                u = (until if until.tzinfo else until.replace(tzinfo=UTC)).timestamp()
            elif isinstance(until, int | float) and not isinstance(until, bool):
                u = float(until)
            else:
                u = parse_until(None if until is None else str(until), time.time())
            out.append(entry(str(item["kind"]), item["value"], u, str(item.get("reason", ""))))
        except RevocationError as e:
            raise RevocationError(f"{at}: {e}") from None
    return out


def read_file(path: Path) -> list[Revocation]:
    """The entries of ``path`` (absent: none); RevocationError names the file and item."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise RevocationError(f"{path}: {e}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RevocationError(f"{path}{line}: not YAML/JSON: {getattr(e, 'problem', e)}") from None
    return parse_entries(data, str(path))


def dump_file(entries: Iterable[Revocation]) -> bytes:
    return (json.dumps([e.to_json() for e in entries], indent=2) + "\n").encode()


# -- the store --------------------------------------------------------------------------


def store_key(prefix: str, kind: str, value: str) -> str:
    return f"{prefix}revoked:{kind}:{hashlib.sha256(value.encode()).hexdigest()}"


def encode(r: Revocation) -> bytes:
    return json.dumps(r.to_json() | {"until_ts": r.until}).encode()


def decode(blob: bytes) -> Revocation | None:
    try:
        d = json.loads(blob)
        until = d.get("until_ts")
        return Revocation(str(d["kind"]), str(d["value"]), until, str(d.get("reason", "")))
    except (ValueError, KeyError, TypeError):
        return None


async def put(store: Store, prefix: str, r: Revocation, now: float) -> None:
    ttl_ms = None if r.until is None else max(1, math.ceil((r.until - now) * 1000))
    await store.put(store_key(prefix, r.kind, r.value), encode(r), ttl_ms)


async def remove(store: Store, prefix: str, kind: str, value: str) -> bool:
    return await store.delete(store_key(prefix, kind, value))


async def listing(store: Store, prefix: str) -> list[Revocation]:
    blobs = await store.scan(f"{prefix}revoked:")
    found = [decode(b) for b in blobs]
    return sorted((r for r in found if r is not None), key=lambda r: (r.kind, r.value))


class Revocations:
    """What the guard checks on every Check: the file's entries (swapped in by a reload)
    and the store's (looked up each time)."""

    def __init__(self, prefix: str, clock: Callable[[], float] = time.time) -> None:
        self.prefix = prefix
        self.clock = clock
        self.from_file: dict[tuple[str, str], Revocation] = {}

    def set_file(self, entries: Iterable[Revocation]) -> None:
        self.from_file = {(r.kind, r.value): r for r in entries}

    async def find(self, store: Store, wanted: list[tuple[str, str]]) -> Revocation | None:
        """The first live entry for one of ``wanted`` (kind, normalized value); raises
        StoreUnavailable when the store cannot answer."""
        now = self.clock()
        for k in wanted:
            r = self.from_file.get(k)
            if r is not None and r.live(now):
                return r
        if not wanted:
            return None
        blobs = await store.get_many([store_key(self.prefix, k, v) for k, v in wanted])
        for blob in blobs:
            r = decode(blob) if blob is not None else None
            if r is not None and r.live(now):
                return r
        return None
