"""The control plane's own HTTP endpoints: /healthz, /readyz, /status (JSON), /metrics
(Prometheus) and / (a status page for people).

Hardened for a browser on the same machine (``protect``): a request whose Host header does
not name this server (its address, loopback names on loopback, or ``--admin-allowed-hosts``)
gets 421, so a web page cannot read /status through DNS rebinding; every response carries a
tight Content-Security-Policy, X-Frame-Options: DENY and X-Content-Type-Options: nosniff."""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from xdsplane import statuspage
from xdsplane.cache import SnapshotCache
from xdsplane.metrics import CONTENT_TYPE, Metrics
from xdsplane.redact import scrub
from xdsplane.server.registry import Registry
from xdsplane.watch import ReloadState


class AdminState:
    def __init__(
        self,
        config: str,
        cache: SnapshotCache,
        registry: Registry,
        reload: ReloadState,
        cert_warn_days: float = 14.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.cert_warn_days = cert_warn_days
        self.metrics = metrics if metrics is not None else Metrics(lambda: cache.current)
        self.config = config
        self.cache = cache
        self.registry = registry
        self.reload = reload
        self.started_at = time.time()
        # The xDS server's own certificate and client CA (serve over mTLS), for /status.
        self.xds_tls: Callable[[], dict[str, object]] | None = None

    def certificates(self) -> list[dict[str, object]]:
        current = self.cache.current
        if current is None:
            return []
        out = []
        for cert in current.certificates:
            entry = cert.as_dict()
            entry["expiring"] = cert.seconds_left() < self.cert_warn_days * 86400
            out.append(entry)
        return out

    def status(self) -> dict[str, Any]:
        current = self.cache.current
        groups = []
        if current is not None:
            for g in current.groups:
                groups.append(
                    {
                        "name": g.name,
                        "nodes": list(g.globs) if g.globs is not None else None,
                        "digest": g.snapshot.digest,
                        "versions": {t.short: v for t, v in g.snapshot.versions.items()},
                        "resources": {t.short: len(r) for t, r in g.snapshot.resources.items()},
                    }
                )
        r = self.reload
        return {
            "ready": r.loaded,
            "config": self.config,
            "started_at": self.started_at,
            "reload": {
                "loaded_at": r.loaded_at,
                "attempts": r.attempts,
                "successes": r.successes,
                "failures": r.failures,
                "failed_at": r.failed_at,
                "errors": list(r.errors),
                "last_duration_ms": round(r.last_duration * 1000, 3),
            },
            "groups": groups,
            "certificates": self.certificates(),
            "xds_tls": self.xds_tls() if self.xds_tls is not None else None,
            "streams": [s.as_dict() for s in self.registry.streams.values()],
            "nacks": self.registry.nacks(),
            "refused": dict(self.registry.refused),
        }


def _scrubbed(value: Any) -> Any:
    """Key material out of client-sent texts (a NACK may quote a resource) and errors."""
    if isinstance(value, str):
        return scrub(value, blobs=False) if "-----BEGIN " in value or "eyJ" in value else value
    if isinstance(value, list):
        return [_scrubbed(v) for v in value]
    if isinstance(value, dict):
        return {k: _scrubbed(v) for k, v in value.items()}
    return value


STATE_KEY: web.AppKey[AdminState] = web.AppKey("state", AdminState)


async def _healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok\n")


async def _readyz(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    if state.reload.loaded:
        return web.Response(text="ready\n")
    return web.Response(status=503, text="no snapshot loaded yet\n")


async def _status(request: web.Request) -> web.Response:
    return web.json_response(_scrubbed(request.app[STATE_KEY].status()), dumps=_dumps)


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _page(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    html = statuspage.render(_scrubbed(state.status()), state.cert_warn_days)
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=False)


# -- hardening: Host check and security headers ---------------------------------------------

LOOPBACK_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})

SECURITY_HEADERS = {
    # The page is one document with one inline <style> (allowed by its hash): no script, no
    # image, no frame, no form, no fetch. A meta refresh and plain links need nothing.
    "Content-Security-Policy": (
        f"default-src 'none'; style-src '{statuspage.STYLE_HASH}'; base-uri 'none'; "
        "form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def split_host(value: str) -> tuple[str, int | None] | None:
    """``(host, port)`` of a Host header (``name``, ``name:port``, ``[v6]:port``), host
    lower-cased; None when malformed."""
    value = value.strip().lower()
    port: str | None = None
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port = value.split(":")
    elif ":" in value:
        host = value  # a bare IPv6 address (not valid in Host, but unambiguous)
    else:
        host = value
    if not host or any(c.isspace() or c in "/@?#\\" for c in host):
        return None
    if port is None:
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        return None
    return host, int(port)


def _ip(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def host_allowed(header: str, local: tuple[str, int] | None, allowed: frozenset[str]) -> bool:
    """Whether a Host header names this server: the address the request came in on (any
    port spelling of it), a loopback name when that address is loopback, or an entry of
    ``allowed`` (``name`` for any port, ``name:port``, ``*`` for any Host)."""
    if "*" in allowed:
        return True
    parsed = split_host(header)
    if parsed is None:
        return False
    host, port = parsed
    bare = host.rstrip(".") if not host.endswith("..") else host
    if bare in allowed or (port is not None and f"{bare}:{port}" in allowed):
        return True
    if local is None:
        return False
    local_ip, local_port = _ip(local[0]), local[1]
    if port is not None and port != local_port:
        return False
    ip = _ip(host)
    if ip is not None and local_ip is not None and ip == local_ip:
        return True
    return (
        local_ip is not None
        and local_ip.is_loopback
        and (bare in LOOPBACK_NAMES or (ip is not None and ip.is_loopback))
    )


def normalize_allowed(hosts: Iterable[str]) -> frozenset[str]:
    """``--admin-allowed-hosts`` entries (comma-separated allowed), as host_allowed wants."""
    out = set()
    for entry in hosts:
        for part in entry.split(","):
            part = part.strip().lower()
            if not part:
                continue
            if part == "*":
                out.add(part)
                continue
            parsed = split_host(part)
            if parsed is None:
                raise ValueError(f"not a host name or host:port: {part!r}")
            host, port = parsed
            host = host.rstrip(".")
            out.add(host if port is None else f"{host}:{port}")
    return frozenset(out)


ALLOWED_KEY: web.AppKey[frozenset[str]] = web.AppKey("allowed_hosts", frozenset)


@web.middleware
async def _check_host(request: web.Request, handler: Any) -> web.StreamResponse:
    hosts = request.headers.getall("Host", [])
    local = request.transport.get_extra_info("sockname") if request.transport else None
    where = (str(local[0]), int(local[1])) if isinstance(local, tuple) else None
    if len(hosts) != 1 or not host_allowed(hosts[0], where, request.app[ALLOWED_KEY]):
        return web.Response(
            status=421,
            text="421 Misdirected Request: the Host header does not name this server "
            "(see --admin-allowed-hosts)\n",
        )
    response: web.StreamResponse = await handler(request)
    return response


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers[name] = value


def protect(app: web.Application, allowed_hosts: Iterable[str] = ()) -> web.Application:
    """Add the Host check and the security headers to an admin app (serve's, the guard's)."""
    app[ALLOWED_KEY] = normalize_allowed(allowed_hosts)
    app.middlewares.append(_check_host)
    app.on_response_prepare.append(_security_headers)
    return app


def make_app(state: AdminState, allowed_hosts: Iterable[str] = ()) -> web.Application:
    app = protect(web.Application(), allowed_hosts)
    app[STATE_KEY] = state
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    app.router.add_get("/status", _status)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/", _page)
    return app


async def start(
    state: AdminState, host: str, port: int, allowed_hosts: Iterable[str] = ()
) -> web.AppRunner:
    runner = web.AppRunner(make_app(state, allowed_hosts), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_port=False)
    await site.start()
    return runner
