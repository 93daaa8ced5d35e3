"""Hardening for the admin HTTP servers (``serve``'s and any other aiohttp admin app).

A web page in the operator's browser can reach a loopback admin port through DNS rebinding
(its own name re-resolved to 127.0.0.1): ``protect`` answers only a Host header that names
the server (the address the request came in on, loopback names on loopback, or a configured
list) and 421 otherwise, and puts a tight Content-Security-Policy, X-Frame-Options: DENY and
X-Content-Type-Options: nosniff on every response, errors included. Light on imports, so the
guard can use it too: ``protect(web.Application(), allowed_hosts)``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Any

from aiohttp import web

from xdsplane.statuspage import STYLE_HASH

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})

SECURITY_HEADERS = {
    # The page is one document with one inline <style> (allowed by its hash): no script, no
    # image, no frame, no form, no fetch. A meta refresh and plain links need nothing.
    "Content-Security-Policy": (
        f"default-src 'none'; style-src '{STYLE_HASH}'; base-uri 'none'; "
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
    bare = host[:-1] if host.endswith(".") else host  # "localhost." is "localhost"
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
            host = host[:-1] if host.endswith(".") else host
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
