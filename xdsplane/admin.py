"""The control plane's own HTTP endpoints: /healthz, /readyz, /status (JSON), /metrics
(Prometheus) and / (a status page for people).

Hardened for a browser on the same machine (``adminhttp.protect``): a request whose Host
header does not name this server (its address, loopback names on loopback, or
``--admin-allowed-hosts``) gets 421, so a web page cannot read /status through DNS
rebinding; every response carries a tight Content-Security-Policy, X-Frame-Options: DENY and
X-Content-Type-Options: nosniff."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from xdsplane import statuspage
from xdsplane.adminhttp import protect
from xdsplane.cache import SnapshotCache
from xdsplane.metrics import CONTENT_TYPE, Metrics
from xdsplane.policy.matrix import access_matrix
from xdsplane.redact import MAX_TEXT, cut, scrub
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
        # Why this server is reachable in plaintext off the host (serve --insecure), if it is.
        self.insecure: list[str] = []
        # Per-host client-certificate counts read from Envoys' admin (serve --envoy-admin).
        self.envoys: Callable[[], list[dict[str, Any]]] | None = None
        # The ADS write gate's limits and counters (server/gate.py, serve --write-budget).
        self.write_gate: Callable[[], dict[str, int | float]] | None = None
        # Giving freed heap back after bursts of responses (mallocopts.py), for /status.
        self.malloc: Callable[[], dict[str, object]] | None = None
        # Garbage-collector thresholds and pauses (gctune.py), for /status.
        self.gc: Callable[[], dict[str, object]] | None = None
        # The access matrix of each served group's policy, kept while that policy is served.
        self._access: dict[int, tuple[object, list[dict[str, Any]]]] = {}

    def access(self, policy: object) -> list[dict[str, Any]]:
        """The access matrix (policy/matrix.py) of a served group's policy, as JSON rows;
        computed once per policy, not per request of the page."""
        if policy is None:
            return []
        hit = self._access.get(id(policy))
        if hit is None or hit[0] is not policy:
            rows = [r.as_json() for r in access_matrix(policy)]  # type: ignore[arg-type]
            if len(self._access) > 64:
                self._access.clear()
            hit = self._access[id(policy)] = (policy, rows)
        return hit[1]

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
                        "access": self.access(g.policy),
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
                "warnings": list(r.warnings),
                "last_duration_ms": round(r.last_duration * 1000, 3),
            },
            "groups": groups,
            "certificates": self.certificates(),
            "xds_tls": self.xds_tls() if self.xds_tls is not None else None,
            "streams": [s.as_dict() for s in self.registry.streams.values()],
            "nacks": self.registry.nacks(),
            "refused": dict(self.registry.refused),
            "insecure": list(self.insecure),
            "envoys": self.envoys() if self.envoys is not None else None,
            "write_gate": self.write_gate() if self.write_gate is not None else None,
            "malloc": self.malloc() if self.malloc is not None else None,
            "gc": self.gc() if self.gc is not None else None,
        }


def _scrubbed(value: Any) -> Any:
    """Key material out of client-sent texts (a NACK may quote a resource) and errors."""
    if isinstance(value, str):
        if "-----BEGIN " in value or "eyJ" in value:
            value = scrub(value, blobs=False)
        return cut(value, MAX_TEXT)  # a NACK text may be megabytes
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
    # Gathered on the event loop (one consistent view), scrubbed and encoded in a thread: at
    # 5,000 streams that is ~4 MB of JSON and ~0.2 s of CPU, which would otherwise hold
    # every ADS stream for as long (the thread takes turns with the loop, GIL switches).
    status = request.app[STATE_KEY].status()
    text = await asyncio.to_thread(lambda: _dumps(_scrubbed(status)))
    return web.Response(text=text, content_type="application/json")


async def _metrics(request: web.Request) -> web.Response:
    body = request.app[STATE_KEY].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _page(request: web.Request) -> web.Response:
    state = request.app[STATE_KEY]
    status, days = state.status(), state.cert_warn_days
    html = await asyncio.to_thread(lambda: statuspage.render(_scrubbed(status), days))
    return web.Response(text=html, content_type="text/html", charset="utf-8")


def _dumps(value: Any) -> str:
    import json

    return json.dumps(value, indent=2, sort_keys=False)


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
