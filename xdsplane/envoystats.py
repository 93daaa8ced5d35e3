"""Per-host client-certificate counts read from Envoys' admin (``serve --envoy-admin``).

Envoys connect to the control plane over ADS; their admin listener is theirs, so ``serve``
knows none of them unless told. ``--envoy-admin [NAME=]HOST:PORT`` names one (``xdsplane up``
names the Envoy it starts). Every few seconds the poller reads that Envoy's
``/stats?format=json&filter=...`` for the counters of the per-host missing-certificate RBAC
(docs/observability.md, "Envoy stats, per host"):

    http.<listener>/<host>.rbac.client_certificate_missing.shadow_denied   (no certificate)
    http.<listener>/<host>.rbac.client_certificate_missing.shadow_allowed  (a certificate)

and keeps the counts per host for ``/status``, the status page and ``xdsplane status``.

The admin is plain HTTP and powerful (it can quit Envoy), so only loopback addresses are
accepted unless ``serve --insecure``; only ``GET /stats`` is ever sent. An Envoy's answer is
untrusted input: its size is capped, its types checked, its names matched by pattern, and
what is shown is escaped by the page. An Envoy that does not answer is shown as such; it
never stops the control plane."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from xdsplane import logs
from xdsplane.bootstrap import split_address
from xdsplane.exposure import is_loopback

STAT_FILTER = r"rbac\.client_certificate_missing\.shadow_(denied|allowed)$"
_STAT = re.compile(
    r"^http\.(?P<prefix>[^\s]{1,200})\.rbac\.client_certificate_missing\."
    r"shadow_(?P<which>denied|allowed)$"
)
MAX_BYTES = 1024 * 1024  # the filtered answer is a few lines; a larger one is refused
MAX_HOSTS = 1000
INTERVAL_SECONDS = 5.0
TIMEOUT_SECONDS = 2.0
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


@dataclass(frozen=True)
class EnvoyAdmin:
    name: str
    host: str
    port: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_admin(value: str) -> EnvoyAdmin:
    """``[NAME=]HOST:PORT``; the name defaults to the address. Raises ValueError."""
    name, sep, address = value.partition("=")
    if not sep:
        name, address = "", value
    if name and not _NAME.match(name):
        raise ValueError(f"{value!r}: the name must be letters, digits, '.', '_' or '-'")
    try:
        host, port = split_address(address)
    except ValueError as e:
        raise ValueError(f"{value!r}: {e}") from None
    admin = EnvoyAdmin(name, host, port)
    return EnvoyAdmin(name or admin.address, host, port)


def exposure(admins: list[EnvoyAdmin]) -> list[str]:
    """One sentence per Envoy admin off this host (plain HTTP that can quit Envoy)."""
    return [
        f"--envoy-admin {a.address} is not on loopback: an Envoy admin is plain HTTP, and "
        "anyone between the two hosts reads and can change what it answers; scrape its "
        "/stats/prometheus with Prometheus instead (docs/observability.md)"
        for a in admins
        if not is_loopback(a.host)
    ]


def parse_stats(body: bytes) -> dict[str, dict[str, int]]:
    """Per ``<listener>/<host>``: ``{"without_certificate": n, "with_certificate": m}``.
    Raises ValueError on an answer that is not Envoy's JSON stats."""
    if len(body) > MAX_BYTES:
        raise ValueError(f"the answer is larger than {MAX_BYTES} bytes")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise ValueError("the answer is not JSON") from None
    stats = data.get("stats") if isinstance(data, dict) else None
    if not isinstance(stats, list):
        raise ValueError('the answer has no "stats" list')
    hosts: dict[str, dict[str, int]] = {}
    for stat in stats:
        if not isinstance(stat, dict):
            continue
        name, value = stat.get("name"), stat.get("value")
        if not isinstance(name, str) or not isinstance(value, int) or isinstance(value, bool):
            continue
        m = _STAT.match(name)
        if m is None or value < 0:
            continue
        if m["prefix"] not in hosts and len(hosts) >= MAX_HOSTS:
            continue
        key = "without_certificate" if m["which"] == "denied" else "with_certificate"
        hosts.setdefault(m["prefix"], {"without_certificate": 0, "with_certificate": 0})[key] = (
            value
        )
    return hosts


@dataclass
class Reading:
    admin: EnvoyAdmin
    ok: bool = False
    error: str = "not read yet"
    read_at: float | None = None
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.admin.name,
            "address": self.admin.address,
            "ok": self.ok,
            "error": self.error,
            "read_at": self.read_at,
            "hosts": [{"host": h, **counts} for h, counts in sorted(self.hosts.items())],
        }


class EnvoyStats:
    """Reads every named Envoy's counters on a timer; ``status()`` is what /status shows."""

    def __init__(
        self,
        admins: list[EnvoyAdmin],
        interval: float = INTERVAL_SECONDS,
        timeout: float = TIMEOUT_SECONDS,
    ) -> None:
        self.readings = [Reading(a) for a in admins]
        self.interval = interval
        self.timeout = timeout
        self._log = logs.get("xdsplane.envoystats")

    def status(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self.readings]

    async def read_once(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self._read(session, r) for r in self.readings))

    async def _read(self, session: aiohttp.ClientSession, reading: Reading) -> None:
        url = f"http://{reading.admin.address}/stats"
        params = {"format": "json", "filter": STAT_FILTER}
        try:
            async with session.get(url, params=params, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_BYTES + 1)
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
            hosts = parse_stats(body)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as e:
            error = str(e) or type(e).__name__
            if reading.ok or reading.error != error:
                self._log.warning(
                    "envoy admin not read", envoy=reading.admin.name, error=error[:200]
                )
            reading.ok, reading.error = False, error[:200]
            return
        reading.ok, reading.error, reading.hosts = True, "", hosts
        reading.read_at = time.time()

    async def run(self, stop: asyncio.Event) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout)
        async with aiohttp.ClientSession(timeout=timeout, trust_env=False) as session:
            while not stop.is_set():
                await self.read_once(session)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
